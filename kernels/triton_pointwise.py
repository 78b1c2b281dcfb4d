"""Triton kernels for kernels.pointwise: RMSNorm with an optional residual add, and rotary embedding."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, dim, eps, stride_x, stride_r, stride_o, stride_s,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One row: total = x (+ residual), stored; out = weight * (total * rsqrt(mean(total^2) + eps)), the
    normalised row rounded to the run dtype before the scale, as the torch reference does."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)               # rounded like torch's add
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] (unit stride along D), weight [D] -> (norm(x + residual), x + residual)."""
    T, D = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    if T:
        block = triton.next_power_of_2(D)
        res = residual if residual is not None else x
        _rms_norm_kernel[(T,)](x, res, weight, out, total, D, eps, x.stride(0), res.stride(0), out.stride(0),
                               total.stride(0), HAS_RES=residual is not None, BLOCK=block,
                               num_warps=min(16, max(1, block // 256)))
    return out, total


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, half, stride_xt, stride_xh, stride_ot, stride_oh,
                   INTERLEAVE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (token, head block): rotate each channel pair (a, b) by the token's angle, in float32."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                        # [BH]
    i = tl.arange(0, BLOCK_R)                                                          # [BR] pair index
    ok = (heads < num_heads)[:, None] & (i < half)[None, :]
    if INTERLEAVE:
        a, b = 2 * i, 2 * i + 1
    else:
        a, b = i, i + half
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(src + a[None, :], mask=ok, other=0.0).to(tl.float32)                 # [BH, BR]
    x2 = tl.load(src + b[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * half + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * half + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + t * stride_ot + heads[:, None] * stride_oh
    tl.store(dst + a[None, :], (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + b[None, :], (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=ok)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, H, R] (unit stride along R), cos/sin [T, 1, R/2] contiguous -> rotated [T, H, R]."""
    T, H, R = x.shape
    out = torch.empty(T, H, R, dtype=x.dtype, device=x.device)
    if T:
        block_h = min(16, triton.next_power_of_2(H))
        _rotary_kernel[(T, triton.cdiv(H, block_h))](x, cos, sin, out, H, R // 2, x.stride(0), x.stride(1),
                                                     out.stride(0), out.stride(1), INTERLEAVE=interleave,
                                                     BLOCK_H=block_h, BLOCK_R=max(2, triton.next_power_of_2(R // 2)),
                                                     num_warps=1 if block_h * R <= 512 else 4)
    return out


@triton.jit
def rotate_pairs(src, dst, cos_row, sin_row, half, INTERLEAVE: tl.constexpr, BLOCK_R: tl.constexpr):
    """One rope vector: src's channel pairs rotated by the angles cos_row/sin_row [half] in float32,
    rounded to src's dtype (as the rotary kernel rounds), stored at dst in dst's dtype."""
    i = tl.arange(0, BLOCK_R)                                                          # pair index
    ok = i < half
    if INTERLEAVE:
        a, b = 2 * i, 2 * i + 1
    else:
        a, b = i, i + half
    x1 = tl.load(src + a, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + b, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_row + i, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_row + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst + a, (x1 * c - x2 * s).to(src.dtype.element_ty).to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + b, (x2 * c + x1 * s).to(src.dtype.element_ty).to(dst.dtype.element_ty), mask=ok)


@triton.jit
def _latent_cache_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slots_ptr, lora, half, eps,
                         stride_kv, stride_c, INTERLEAVE: tl.constexpr, BLOCK_L: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """One token of MLA: cache[slot] = [rms_norm(latent) * w, rotary(k_pe)] from kv = [latent, k_pe],
    each part rounded to kv's dtype as the separate norm and rotary kernels round it."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    src = kv_ptr + t * stride_kv
    dst = cache_ptr + slot * stride_c
    cols = tl.arange(0, BLOCK_L)
    ok = cols < lora
    x = tl.load(src + cols, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / lora + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst + cols, (w * y).to(x.dtype).to(cache_ptr.dtype.element_ty), mask=ok)
    rotate_pairs(src + lora, dst + lora, cos_ptr + t * half, sin_ptr + t * half, half, INTERLEAVE, BLOCK_R)


def latent_cache_triton(cache: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, interleave: bool, slot_mapping: torch.Tensor) -> None:
    """cache [S, L + R], kv [T, L + R] (unit stride along it), weight [L], cos/sin [T, 1, R/2] contiguous."""
    T, width = kv.shape
    lora = weight.shape[0]
    half = (width - lora) // 2
    if T:
        _latent_cache_kernel[(T,)](kv, weight, cos, sin, cache, slot_mapping, lora, half, eps,
                                   kv.stride(0), cache.stride(0), INTERLEAVE=interleave,
                                   BLOCK_L=triton.next_power_of_2(lora), BLOCK_R=max(2, triton.next_power_of_2(half)),
                                   num_warps=4 if lora >= 256 else 1)
