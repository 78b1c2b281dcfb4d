"""MLA's absorbed query: the key half of kv_b folded into q, and the rope part rotated beside it."""

import torch

from kernels.backend import use_triton
from kernels.pointwise import RotaryAngles, rotary, rotary_swapped
from kernels.tuning import absorb_tuning, enabled


def absorb_query(q: torch.Tensor, nope: int, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleave: bool, backend: str = "auto") -> torch.Tensor:
    """q [T, H, nope + R] = [q_nope, q_pe (not yet rotated)], w_uk [H, nope, L], angles cos/sin
    [T, 1, R/2] -> q_full [T, H, L + R] = [q_nope @ w_uk per head, rotary(q_pe)]. One kernel on CUDA in
    place of a rotary, a batched matmul and a concatenation, for up to the tuning's max_tokens tokens
    (kernels.tuning.absorb_tuning: the kernel reads w_uk once per token)."""
    if (use_triton(backend, q, w_uk, cos, sin) and q.dim() == 3 and q.stride(-1) == 1 and w_uk.stride(-1) == 1
            and cos.is_contiguous() and sin.is_contiguous() and q.dtype == w_uk.dtype
            and cos.shape == (q.shape[0], 1, (q.shape[2] - nope) // 2) and enabled("absorb_query")):
        tuning = absorb_tuning(q.device, q.shape[1], nope, w_uk.shape[2])
        if q.shape[0] <= tuning.max_tokens:
            from kernels.triton_mla import absorb_query_triton
            return absorb_query_triton(q, nope, w_uk, cos, sin, interleave, tuning.tile)
    return absorb_query_bmm(q, nope, w_uk, cos, sin, interleave, backend)


def absorbed_query(q: torch.Tensor, nope: int, w_uk: torch.Tensor, angles: RotaryAngles,
                   interleave: bool) -> torch.Tensor:
    """absorb_query with the step's angles (kernels.rotary_angles): where they were spread (the CPU),
    the few-call rotation of q_pe and latent_query; else absorb_query (one kernel on CUDA)."""
    if angles.spread is None:
        return absorb_query(q, nope, w_uk, angles.cos, angles.sin, interleave)
    q_nope, q_pe = q.split([nope, q.shape[2] - nope], -1)                 # [T, H, nope], [T, H, R]
    return latent_query(q_nope, rotary_swapped(q_pe, *angles.spread, interleave), w_uk)


def absorb_query_bmm(q: torch.Tensor, nope: int, w_uk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleave: bool, backend: str = "auto") -> torch.Tensor:
    """absorb_query's result as a batched matmul, the rotary and a concatenation: what serves batches
    above the kernel's max_tokens, other devices, and (backend 'torch') the reference."""
    q_nope, q_pe = q.split([nope, q.shape[2] - nope], -1)
    return latent_query(q_nope, rotary(q_pe, cos, sin, interleave, backend), w_uk)


def latent_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [T, H, nope] and the rotated q_pe [T, H, R] -> [q_nope @ w_uk per head, q_pe] [T, H, L + R]."""
    # bmm rather than einsum: the same products with a third of the per-call overhead.
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)                     # [H, T, L]
    return torch.cat([q_latent.transpose(0, 1), q_pe], -1)
