"""Fused MoE for a few tokens (decode at batch 1) in Triton: two matrix-vector kernels, no alignment.

With one token the tiled kernels (kernels/triton_moe.py) spend a launch aligning k pairs by expert, use
one row of each 16-row tile, and need a third launch to sum the k outputs. Here each (token, expert) pair
is a row of its own: the gate+up kernel computes silu(gate . x) * (up . x) for a band of intermediate
columns, and the down kernel walks a token's k experts for a band of output columns, weighting and summing
them as it goes, so the result is written once. Shared experts whose width is a multiple of the routed
one ride along as extra rows with weight 1: a shared SwiGLU of width S*I is S experts of width I, read
in place with their own strides. Everything is bound by streaming weights; the tiles (kernels.tuning)
are sized so each SM has enough bytes in flight.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_gemv import band_dot
from kernels.tuning import GemvTuning, gemv_tuning


@triton.jit
def _swiglu_band(x_ptr, gate_ptrs, up_ptrs, dim, col_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """silu(gate . x) * (up . x) for BLOCK_N weight rows; gate_ptrs/up_ptrs [BN, 1] point at each row's
    first element (rows contiguous along dim). Accumulates [BN, BK] products, reduced once at the end."""
    ks = tl.arange(0, BLOCK_K)
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + ks                                                                    # [BK]
        k_ok = k < dim
        xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]          # [1, BK]
        mask = col_ok[:, None] & k_ok[None, :]
        acc_gate += tl.load(gate_ptrs + k[None, :], mask=mask, other=0.0).to(tl.float32) * xv
        acc_up += tl.load(up_ptrs + k[None, :], mask=mask, other=0.0).to(tl.float32) * xv
    gate = tl.sum(acc_gate, axis=1)                                                    # [BN]
    return gate * tl.sigmoid(gate) * tl.sum(acc_up, axis=1)


@triton.jit
def _gemv_gate_up_kernel(x_ptr, w_ptr, ws_ptr, ids_ptr, act_ptr,
                         num_pairs, top_k, num_shared, inter, inter_shared, dim,
                         stride_xt, stride_we, stride_wn, stride_wsn, stride_ar,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[row, band]: rows < num_pairs are (token row // top_k, expert ids[row]); row num_pairs +
    t * num_shared + j is slice j of token t's shared SwiGLU (gate rows j*I.., up rows I_s + j*I..)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BN]
    col_ok = cols < inter
    if row < num_pairs:
        token = row // top_k
        expert = tl.load(ids_ptr + row).to(tl.int64)
        gate_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[:, None] * stride_wn     # [BN, 1]
        up_ptrs = gate_ptrs + inter * stride_wn
    else:
        token = (row - num_pairs) // num_shared
        first = (row - num_pairs) % num_shared * inter
        gate_ptrs = ws_ptr + (first + cols).to(tl.int64)[:, None] * stride_wsn
        up_ptrs = gate_ptrs + inter_shared * stride_wsn
    h = _swiglu_band(x_ptr + token.to(tl.int64) * stride_xt, gate_ptrs, up_ptrs, dim, col_ok, BLOCK_N, BLOCK_K)
    tl.store(act_ptr + row.to(tl.int64) * stride_ar + cols, h.to(act_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_down_kernel(act_ptr, w_ptr, ws_ptr, ids_ptr, weights_ptr, out_ptr,
                      num_pairs, top_k, num_shared, inter, dim,
                      stride_ar, stride_we, stride_wn, stride_wsn, stride_ot,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[token, band] = sum_j weight_j * (act[pair j] . w2[e_j, band]) + sum_s act[shared s] . w2s[band, s]."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BN]
    col_ok = cols < dim
    col_rows = cols.to(tl.int64)[:, None]                                              # [BN, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for j in range(0, top_k):
        pair = token * top_k + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        w_ptrs = w_ptr + expert * stride_we + col_rows * stride_wn
        acc += weight * band_dot(act_ptr + pair.to(tl.int64) * stride_ar, w_ptrs, inter, col_ok, BLOCK_N, BLOCK_K)
    for s in range(0, num_shared):
        row = num_pairs + token * num_shared + s
        w_ptrs = ws_ptr + col_rows * stride_wsn + s * inter
        acc += band_dot(act_ptr + row.to(tl.int64) * stride_ar, w_ptrs, inter, col_ok, BLOCK_N, BLOCK_K)
    out = tl.sum(acc, axis=1)                                                          # [BN]
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_down_stacked_kernel(act_ptr, w_ptr, ws_ptr, ids_ptr, weights_ptr, out_ptr,
                              num_pairs, top_k, num_shared, inter, dim,
                              stride_ar, stride_we, stride_wn, stride_wsn, stride_ot,
                              SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_gemv_down_kernel's result with the token's routed and shared experts read together: a
    [SLOTS, BN, BK] tile a step, so every expert's weights are in flight at once. (One expert at a time,
    a program keeps too few bytes in flight: with one token there are only dim / block_n programs.)"""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BN]
    col_ok = cols < dim
    slots = tl.arange(0, SLOTS)                                                        # [S]
    routed = slots < top_k
    used = slots < top_k + num_shared
    pair = token * top_k + slots                                                       # routed slots' pairs
    shared_slice = slots - top_k                                                       # shared slots' slices
    act_rows = tl.where(routed, pair, num_pairs + token * num_shared + shared_slice).to(tl.int64)
    expert = tl.load(ids_ptr + pair, mask=routed, other=0).to(tl.int64)
    weight = tl.load(weights_ptr + pair, mask=routed, other=0.0).to(tl.float32)
    weight = tl.where(routed, weight, tl.where(used, 1.0, 0.0))                        # shared: 1, padding: 0
    bases = tl.where(routed, w_ptr + expert * stride_we, ws_ptr + shared_slice.to(tl.int64) * inter)   # [S]
    row_stride = tl.where(routed, stride_wn, stride_wsn).to(tl.int64)                  # [S]
    w_ptrs = bases[:, None, None] + cols.to(tl.int64)[None, :, None] * row_stride[:, None, None]   # [S, BN, 1]
    a_ptrs = act_ptr + act_rows[:, None] * stride_ar                                   # [S, 1]
    w_ok = used[:, None, None] & col_ok[None, :, None]
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([SLOTS, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + ks
        k_ok = k < inter
        a = tl.load(a_ptrs + k[None, :], mask=used[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [S, BK]
        w = tl.load(w_ptrs + k[None, None, :], mask=w_ok & k_ok[None, None, :], other=0.0).to(tl.float32)
        acc += w * a[:, None, :]
    out = tl.sum(tl.sum(acc, axis=2) * weight[:, None], axis=0)                        # [BN]
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def shared_slices(w13: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None) -> int:
    """How many routed-width slices the shared SwiGLU (w13s [2*I_s, D], w2s [D, I_s]) splits into: 0 when
    there is none, -1 when it cannot ride along (width not a multiple of I, another dtype or layout)."""
    if shared is None:
        return 0
    w13s, w2s = shared
    I, D = w13.shape[1] // 2, w13.shape[2]
    I_s = w2s.shape[1]
    fits = (I_s % I == 0 and tuple(w13s.shape) == (2 * I_s, D) and w2s.shape[0] == D
            and w13s.dtype == w2s.dtype == w13.dtype and w13s.stride(1) == 1 and w2s.stride(1) == 1)
    return I_s // I if fits else -1


def fused_moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
                   tuning: GemvTuning | None = None) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D], w2 [E, D, I], topk_* [T, k] -> [T, D], plus the shared SwiGLU
    (w13s [2*I_s, D], w2s [D, I_s]) if given; arguments checked by the caller, shared_slices(...) >= 0."""
    T, D = x.shape
    I = w2.shape[2]
    k = topk_ids.shape[1]
    num_shared = shared_slices(w13, shared)
    if num_shared < 0:
        raise ValueError("fused_moe_gemv: the shared experts do not split into routed-width slices")
    if T == 0:
        return torch.zeros_like(x)
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        w13, w2 = w13.contiguous(), w2.contiguous()
    w13s, w2s = shared if num_shared else (w13, w2)      # any valid pointer when there is nothing shared
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    tuning = tuning or gemv_tuning(x.device, D, I, w13.dtype)
    rows = T * k + T * num_shared
    act = x.new_empty(rows, I)                                                         # [rows, I]
    up = tuning.gate_up
    _gemv_gate_up_kernel[(rows, triton.cdiv(I, up.block_n))](
        x, w13, w13s, ids, act, T * k, k, num_shared, I, I * num_shared, D,
        x.stride(0), w13.stride(0), w13.stride(1), w13s.stride(0), act.stride(0),
        BLOCK_N=up.block_n, BLOCK_K=up.block_k, num_warps=up.num_warps, num_stages=up.num_stages)
    out = x.new_empty(T, D)
    down = tuning.down
    args = (act, w2, w2s, ids, topk_weights.reshape(-1).contiguous(), out, T * k, k, num_shared, I, D,
            act.stride(0), w2.stride(0), w2.stride(1), w2s.stride(0), out.stride(0))
    tiles = dict(BLOCK_N=down.block_n, BLOCK_K=down.block_k, num_warps=down.num_warps, num_stages=down.num_stages)
    if tuning.stacked_down:
        _gemv_down_stacked_kernel[(T, triton.cdiv(D, down.block_n))](
            *args, SLOTS=triton.next_power_of_2(k + num_shared), **tiles)
    else:
        _gemv_down_kernel[(T, triton.cdiv(D, down.block_n))](*args, **tiles)
    return out
