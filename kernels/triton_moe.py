"""Fused MoE in Triton: align (token, expert) pairs by expert, then one grouped GEMM for gate+up with SiLU*up
fused into its epilogue and one grouped GEMM for down with the routing weight applied."""

import torch
import triton
import triton.language as tl

from kernels.tuning import MoETuning, moe_tuning


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_pairs, padded_rows, num_blocks,
                  E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program: counts per expert, padded offsets, each block's expert, each pair's padded row."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pairs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)               # [CHUNK]
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M                                # [E_PAD]
    ends = tl.cumsum(padded, axis=0)                                                    # [E_PAD]
    total = tl.sum(padded, axis=0)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        first_row = blocks * BLOCK_M
        # Experts end in order, so the block's expert is the number of experts that end at or before it.
        owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)      # [CHUNK]
        owner = tl.where(first_row < total, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)
    for start in range(0, padded_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + rows, tl.full([CHUNK], 0, tl.int32) + num_pairs, mask=rows < padded_rows)
    tl.debug_barrier()   # the padding fill above must land before the scatter below overwrites it
    next_row = ends - padded                                                            # [E_PAD]
    for start in range(0, num_pairs, CHUNK):
        pairs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)                        # [CHUNK, E_PAD]
        rank = tl.cumsum(onehot, axis=0) - onehot + next_row[None, :]                   # [CHUNK, E_PAD]
        dest = tl.sum(onehot * rank, axis=1)                                            # [CHUNK]
        tl.store(sorted_ptr + dest, pairs, mask=pairs < num_pairs)
        next_row += tl.sum(onehot, axis=0)


def align_by_expert_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                          padded_rows: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as _align_kernel in a few torch ops, none of which waits for the device."""
    flat = topk_ids.reshape(-1).long()                                                  # [N]
    n, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m                                # [E]
    ends = torch.cumsum(padded, 0)                                                      # [E]
    order = torch.argsort(flat, stable=True)                                            # [N]
    sorted_ids = flat[order]
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_ids]  # [N] place within expert
    sorted_pairs = torch.full((padded_rows,), n, dtype=torch.int32, device=dev)
    sorted_pairs[(ends - padded)[sorted_ids] + rank] = order.int()
    first_row = torch.arange(num_blocks, device=dev) * block_m                          # [num_blocks]
    owner = torch.searchsorted(ends, first_row, right=True)
    block_expert = torch.where(first_row < ends[-1], owner, -1).int()
    return sorted_pairs, block_expert


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, tuning: MoETuning):
    """sorted_pairs [padded_rows]: the flat (token*k + j) index at each row, num_pairs for padding;
    block_expert [num_blocks]: the expert of each block of block_m rows, -1 past the last used block.

    Sized for the worst case (every used expert padded), so nothing here waits for the device."""
    n = topk_ids.numel()
    bm = tuning.block_m
    padded_rows = triton.cdiv(n + min(num_experts, n) * (bm - 1), bm) * bm
    num_blocks = padded_rows // bm
    if n > tuning.triton_align_max:
        return align_by_expert_torch(topk_ids, num_experts, bm, padded_rows, num_blocks)
    sorted_pairs = torch.empty(padded_rows, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=topk_ids.device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // e_pad))
    _align_kernel[(1,)](topk_ids.reshape(-1), sorted_pairs, block_expert, n, padded_rows, num_blocks,
                        E_PAD=e_pad, BLOCK_M=bm, CHUNK=chunk, num_warps=4)
    return sorted_pairs, block_expert


@triton.jit
def _tile_ids(num_blocks, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row blocks (mostly one expert) walk the same weight columns together."""
    pid = tl.program_id(0)
    pids_n = tl.cdiv(num_cols, BLOCK_N)
    in_group = GROUP_M * pids_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ptr, block_expert_ptr,
                    num_pairs, top_k, num_blocks, inter, dim,
                    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_hm, stride_hi,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """h[row, n] = silu(x[token] . w13[e, n]) * (x[token] . w13[e, inter + n]) for the rows of one block."""
    pid_m, pid_n = _tile_ids(num_blocks, inter, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                      # [BM]
    pairs = tl.load(sorted_ptr + rows)                                                  # [BM]
    row_ok = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                      # [BN]
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)                                                          # [BK]
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xd              # [BM, BK]
    g_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wd)       # [BK, BN]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k_ok = ks < dim - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_gate = tl.dot(a, tl.load(g_ptrs, mask=w_mask, other=0.0), acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, tl.load(u_ptrs, mask=w_mask, other=0.0), acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up                                        # [BM, BN]
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :] * stride_hi
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, weights_ptr,
                 num_pairs, num_blocks, dim, inter,
                 stride_hm, stride_hi, stride_we, stride_wn, stride_wi, stride_op, stride_od,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """out[pair, n] = weight[pair] * (h[row] . w2[e, n]) for the rows of one block."""
    pid_m, pid_n = _tile_ids(num_blocks, dim, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                      # [BM]
    pairs = tl.load(sorted_ptr + rows)
    row_ok = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                      # [BN]
    col_ok = cols < dim
    ks = tl.arange(0, BLOCK_K)
    # Padding rows of h were never written; masking them keeps garbage (NaN) out of the dot.
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + ks[None, :] * stride_hi  # [BM, BK]
    b_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wi)       # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_hi
        b_ptrs += BLOCK_K * stride_wi
    weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)        # [BM]
    out = acc * weight[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_op + cols[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, tuning: MoETuning | None = None) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D], w2 [E, D, I], topk_* [T, k] -> [T, D]; arguments checked by the caller."""
    T, D = x.shape
    E, I = w13.shape[0], w2.shape[2]
    k = topk_ids.shape[1]
    n = T * k
    if n == 0:
        return torch.zeros_like(x)
    tuning = tuning or moe_tuning(x.device, n, E, w13.dtype, D, I)
    bm = tuning.block_m
    sorted_pairs, block_expert = align_by_expert(topk_ids.contiguous(), E, tuning)
    num_blocks = block_expert.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"   # tf32 only matters for fp32; keep it exact

    h = x.new_empty(sorted_pairs.numel(), I)                                           # [padded_rows, I]
    up = tuning.gate_up
    grid = (num_blocks * triton.cdiv(I, up.block_n),)
    _gate_up_kernel[grid](x, w13, h, sorted_pairs, block_expert, n, k, num_blocks, I, D,
                          x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
                          h.stride(0), h.stride(1),
                          BLOCK_M=bm, BLOCK_N=up.block_n, BLOCK_K=up.block_k, GROUP_M=up.group_m,
                          PRECISION=precision, num_warps=up.num_warps, num_stages=up.num_stages)

    out = x.new_empty(n, D)                                                            # [T*k, D]
    down = tuning.down
    grid = (num_blocks * triton.cdiv(D, down.block_n),)
    _down_kernel[grid](h, w2, out, sorted_pairs, block_expert, topk_weights.reshape(-1).contiguous(),
                       n, num_blocks, D, I,
                       h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
                       out.stride(0), out.stride(1),
                       BLOCK_M=bm, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=down.group_m,
                       PRECISION=precision, num_warps=down.num_warps, num_stages=down.num_stages)
    return out if k == 1 else out.view(T, k, D).sum(dim=1)
