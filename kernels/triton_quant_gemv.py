"""Decode-sized products with int8 / int4 weights in Triton, dequantised in registers (no dequantised copy).

One kernel serves both a quantized linear (one weight) and the experts of a few tokens (a weight per
(token, expert) pair, picked by id): each program takes one output row of x and a band of the weight's
output columns, loads BLOCK_K inputs a step (int4: BLOCK_K / 2 bytes, even k in the low nibble, odd k in
the high one, as kernels.quant.QuantizedWeight packs them), subtracts the zero point, multiplies by x and
scales the band's partial sums by its group's scale. A band never spans two groups: BLOCK_K divides the
group size (or the group is the whole row). No host round trip, so a CUDA graph could hold it.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, N, K, rows_per_x,
                       stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ot,
                       GROUP: tl.constexpr, INT4: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, band] = x[r // rows_per_x] . W[ids[r], band], W = (q - zero) * scale per group."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BN]
    col_ok = cols < N
    e = tl.load(ids_ptr + r).to(tl.int64)
    x_row = x_ptr + (r // rows_per_x).to(tl.int64) * stride_xt
    q_rows = q_ptr + e * stride_qe + cols.to(tl.int64)[:, None] * stride_qn            # [BN, 1]
    s_rows = e * stride_se + cols.to(tl.int64) * stride_sn                             # [BN]
    if INT4:
        HALF: tl.constexpr = BLOCK_K // 2
        js = tl.arange(0, HALF)
        acc = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    else:
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP
        scale = tl.load(s_ptr + s_rows + g, mask=col_ok, other=0.0).to(tl.float32)    # [BN]
        if HAS_ZERO:
            zero = tl.load(z_ptr + s_rows + g, mask=col_ok, other=0).to(tl.float32)[:, None]
        else:
            zero = 0.0
        if INT4:
            j = k0 // 2 + js                                                           # [BK/2] byte index
            j_ok = j < K // 2
            b = tl.load(q_rows + j[None, :], mask=col_ok[:, None] & j_ok[None, :], other=0).to(tl.int32)
            lo = ((b & 15) - 8).to(tl.float32) - zero                                  # k = 2j
            hi = ((b >> 4) - 8).to(tl.float32) - zero                                  # k = 2j + 1
            x_even = tl.load(x_row + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
            acc += (lo * x_even[None, :] + hi * x_odd[None, :]) * scale[:, None]
        else:
            k = k0 + ks
            k_ok = k < K
            q = tl.load(q_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
            xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            acc += (q - zero) * xv[None, :] * scale[:, None]
    out = tl.sum(acc, axis=1)                                                          # [BN]
    tl.store(out_ptr + r.to(tl.int64) * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def takes(w) -> bool:
    """Whether quant_gemv runs this kernels.quant.QuantizedWeight (int8 or int4 in row groups; not fp8)."""
    return w.format in ("int8", "int4") and w.block[0] == 1 and not getattr(w, "op_order", False)


def quant_gemv(x: torch.Tensor, w, ids: torch.Tensor | None = None, rows_per_x: int = 1,
               block_n: int = 32, block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """x [T, K] against w (a QuantizedWeight [N, K], or [E, N, K] with ids [R] choosing one per output row,
    output row r taking x row r // rows_per_x) -> [R, N] (R = T without ids) in x's dtype."""
    N, K = w.shape[-2:]
    group = w.block[1]
    q, scale, zero = w.qweight, w.scale, w.zero
    if ids is None:
        q, scale, zero = q[None], scale[None], None if zero is None else zero[None]
        ids = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    bk = min(block_k, group) if group < K else block_k
    if group < K and group % bk:
        raise ValueError(f"quant_gemv: group size {group} is not a multiple of the {bk}-wide band")
    x = x.contiguous()
    R = ids.numel()
    out = torch.empty(R, N, dtype=x.dtype, device=x.device)
    if R == 0:
        return out
    _quant_gemv_kernel[(R, triton.cdiv(N, block_n))](
        x, q, scale, scale if zero is None else zero, ids.reshape(-1).contiguous(), out, N, K, rows_per_x,
        x.stride(0), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        GROUP=group if group < K else K + bk, INT4=w.format == "int4", HAS_ZERO=zero is not None,
        BLOCK_N=block_n, BLOCK_K=bk, num_warps=num_warps)
    return out
