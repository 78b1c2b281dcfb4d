"""Row-wise ops that a decode step runs many times per layer: RMSNorm (optionally with the residual add
before it) and rotary embedding. On CUDA each is one Triton launch instead of 3-7 torch kernels, which
matters once a step is replayed from a CUDA graph and kernel count, not Python, sets its length."""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.backend import form, use_triton
from kernels.kv_quant import QuantizedCache
from kernels.tuning import enabled


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised in float32 (as the reference implementations do), then scaled by weight [D]
    in the run dtype."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)                    # one fused op
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps_cell: torch.Tensor) -> torch.Tensor:
    """float32 RMSNorm of x [T, D] for the CPU in six torch calls, eps given as a [1, 1] tensor. F.rms_norm's
    CPU composite makes ~12 and turns its scalars into tensors twice, which costs it nearly twice as much
    per decode-step norm; the arithmetic is the same (equal results, up to the last bit at most)."""
    mean_square = torch.add(eps_cell, (x * x).sum(-1, keepdim=True), alpha=1.0 / x.shape[-1])   # [T, 1]
    return x * mean_square.rsqrt_() * weight


@functools.cache
def eps_cell(eps: float) -> torch.Tensor:
    """eps as the [1, 1] float32 CPU tensor rms_norm_cpu adds, made once per value (never in a step: a
    tensor made on first use by a model would change between traces, and the compiled step be retraced)."""
    with torch.inference_mode(False):      # a plain tensor, usable inside and outside inference mode
        return torch.full((1, 1), eps, dtype=torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) for x [T, D]; without a residual, (norm(x), x). On CUDA one
    Triton kernel; a float32 norm on the CPU is rms_norm_cpu (the same result in about half the time)."""
    if residual is not None and x.shape != residual.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    f = form(backend, x, weight)
    if f == "triton" and x.dim() == 2 and x.stride(-1) == 1 and x.dtype == weight.dtype and (
            residual is None or (residual.stride(-1) == 1 and residual.dtype == x.dtype)):
        from kernels.triton_pointwise import rms_norm_triton   # lazily: the package works without triton
        return rms_norm_triton(x, weight, eps, residual)
    total = x if residual is None else x + residual
    if f in ("cpu", "compiled") and x.dim() == 2 and x.dtype == weight.dtype == torch.float32:
        # Traced, eps is a constant of the graph (a cached cell would be traced through functools.cache).
        cell = eps_cell(eps) if f == "cpu" else torch.full((1, 1), eps, dtype=torch.float32)
        return rms_norm_cpu(total, weight, cell), total
    return rms_norm_ref(total, weight, eps), total


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, H, R] rotated by angles cos/sin [T, 1, R/2]: channel pairs (2i, 2i+1) when interleave
    (DeepSeek's layout), else (i, i + R/2) (Llama/Mixtral's rotate-half layout)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def spread_angles(cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos/sin [T, 1, R/2] -> (cos_full, sin_swap) [T, 1, R] for rotary_swapped: each angle on both channels
    of its pair, sin signed (-sin on the channel whose partner comes after it). None where rotary() runs
    its kernel, which takes the half-width angles. Once a step."""
    if use_triton(backend, cos, sin):
        return None
    if interleave:
        return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def rotary_swapped(x: torch.Tensor, cos_full: torch.Tensor, sin_swap: torch.Tensor, interleave: bool) -> torch.Tensor:
    """rotary_ref's result (the same floating-point operations) in four torch calls instead of ten, for
    the CPU, where every call costs microseconds: x * cos + swap(x) * sin, swap exchanging the partners
    of each pair, with angles from spread_angles. x [T, H, R] -> a new [T, H, R]."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) if interleave else x.roll(x.shape[-1] // 2, -1)
    return x * cos_full + swapped * sin_swap


class RotaryAngles(NamedTuple):
    """A step's rotary angles as the device's rotation takes them (from rotary_angles): cos/sin
    [T, 1, R/2], and where torch rotates (the CPU), spread = (cos_full, sin_swap) [T, 1, R] too."""
    cos: torch.Tensor
    sin: torch.Tensor
    spread: tuple[torch.Tensor, torch.Tensor] | None


def rotary_angles(cos: torch.Tensor, sin: torch.Tensor, interleave: bool, backend: str = "auto") -> RotaryAngles:
    """The step's angles cos/sin [T, 1, R/2] in the form rotate, write_rotated_latent and
    absorbed_query need on this device: the spread ones computed here, once a step, where no kernel rotates."""
    return RotaryAngles(cos, sin, spread_angles(cos, sin, interleave, backend))


def rotate(x: torch.Tensor, angles: RotaryAngles, interleave: bool) -> torch.Tensor:
    """x [T, H, R] rotated by the step's angles: the few-call torch form where the angles were spread
    (rotary_angles decided that from the device), else rotary (the Triton kernel on CUDA)."""
    if angles.spread is not None:
        return rotary_swapped(x, *angles.spread, interleave)
    return rotary(x, angles.cos, angles.sin, interleave)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool,
           backend: str = "auto") -> torch.Tensor:
    """Rotary embedding (see rotary_ref); a new contiguous [T, H, R] tensor."""
    if (use_triton(backend, x, cos, sin) and x.dim() == 3 and x.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous() and cos.shape == (x.shape[0], 1, x.shape[2] // 2)):
        from kernels.triton_pointwise import rotary_triton
        return rotary_triton(x, cos, sin, interleave)
    return rotary_ref(x, cos, sin, interleave)


def write_latent_cache(cache: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, interleave: bool, slot_mapping: torch.Tensor,
                       backend: str = "auto") -> None:
    """MLA's cache write: kv [T, L + R] = [latent, k_pe] -> cache rows slot_mapping [T] get
    [rms_norm(latent) * weight [L], rotary(k_pe) by cos/sin [T, 1, R/2]]. On CUDA one kernel instead of
    four (norm, rotary, concatenation, scatter); a compressed cache (QuantizedCache) quantizes the latent as it
    takes the rows."""
    L = weight.shape[0]
    if (use_triton(backend, kv, cache, cos, sin) and not isinstance(cache, QuantizedCache) and kv.dim() == 2
            and kv.stride(-1) == 1 and cache.stride(-1) == 1
            and cos.is_contiguous() and sin.is_contiguous() and kv.dtype == weight.dtype
            and cos.shape == (kv.shape[0], 1, (kv.shape[1] - L) // 2) and enabled("latent_cache")):
        from kernels.triton_pointwise import latent_cache_triton
        latent_cache_triton(cache, kv, weight, eps, cos, sin, interleave, slot_mapping)
        return
    latent, k_pe = kv.split([L, kv.shape[1] - L], -1)
    rows = torch.cat([rms_norm(latent, weight, eps, backend=backend)[0],
                      rotary(k_pe[:, None, :], cos, sin, interleave, backend)[:, 0]], -1)   # [T, L + R]
    cache.index_copy_(0, slot_mapping, rows.to(cache.dtype))


def write_rotated_latent(cache: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float,
                         angles: RotaryAngles, interleave: bool, slot_mapping: torch.Tensor) -> None:
    """write_latent_cache with the step's angles: where they were spread (the CPU), the norm (rms_norm,
    its CPU form), the few-call rotation, one concatenation and the scatter; else write_latent_cache (one
    kernel on CUDA)."""
    if angles.spread is None:
        write_latent_cache(cache, kv, weight, eps, angles.cos, angles.sin, interleave, slot_mapping)
        return
    latent, k_pe = kv.split([weight.shape[0], kv.shape[1] - weight.shape[0]], -1)   # [T, L], [T, R]
    k_pe = rotary_swapped(k_pe[:, None, :], *angles.spread, interleave)[:, 0]        # [T, R]
    rows = torch.cat([rms_norm(latent, weight, eps)[0], k_pe], -1)   # [T, L + R]
    cache.index_copy_(0, slot_mapping, rows if rows.dtype == cache.dtype else rows.to(cache.dtype))
