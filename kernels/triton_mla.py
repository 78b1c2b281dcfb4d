"""MLA's absorbed query in one Triton kernel: q_full = [q_nope . w_uk per head, rotary(q_pe)]."""

import torch
import triton
import triton.language as tl

from kernels.triton_pointwise import rotate_pairs
from kernels.tuning import GemmTile


@triton.jit
def _absorb_query_kernel(q_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, nope, half, lora,
                         stride_qt, stride_qh, stride_wh, stride_wk, stride_ot, stride_oh,
                         INTERLEAVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """Program (token, head, band of the latent): out[t, h, band] = q_nope[t, h] . w_uk[h, :, band]; the
    band-0 program also writes out[t, h, lora:] = q_pe rotated by the token's angles. Rounded to out's
    dtype as the separate product, rotary and concatenation round."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    band = tl.program_id(2)
    cols = band * BLOCK_N + tl.arange(0, BLOCK_N)                                      # [BN]
    col_ok = cols < lora
    q_row = q_ptr + t * stride_qt + h * stride_qh                                      # q_nope, then q_pe
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, nope, BLOCK_K):
        k = k0 + ks
        k_ok = k < nope
        q = tl.load(q_row + k, mask=k_ok, other=0.0).to(tl.float32)                   # [BK]
        w = tl.load(w_ptr + h * stride_wh + k[:, None] * stride_wk + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)    # [BK, BN]
        acc += w * q[:, None]
    out_row = out_ptr + t * stride_ot + h * stride_oh
    tl.store(out_row + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)
    if band == 0:
        rotate_pairs(q_row + nope, out_row + lora, cos_ptr + t * half, sin_ptr + t * half, half, INTERLEAVE, BLOCK_R)


def absorb_query_triton(q: torch.Tensor, nope: int, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        interleave: bool, tile: GemmTile) -> torch.Tensor:
    """q [T, H, nope + R] (unit stride along the last dim), w_uk [H, nope, L] (unit stride along L),
    cos/sin [T, 1, R/2] contiguous -> q_full [T, H, L + R]; tile: block_n of L, block_k of nope."""
    T, H, width = q.shape
    L = w_uk.shape[2]
    R = width - nope
    out = torch.empty(T, H, L + R, dtype=q.dtype, device=q.device)
    if T:
        _absorb_query_kernel[(T, H, triton.cdiv(L, tile.block_n))](
            q, w_uk, cos, sin, out, nope, R // 2, L, q.stride(0), q.stride(1), w_uk.stride(0), w_uk.stride(1),
            out.stride(0), out.stride(1), INTERLEAVE=interleave, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
            BLOCK_R=max(2, triton.next_power_of_2(R // 2)), num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out
