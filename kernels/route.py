"""Greedy top-k routing in one kernel on CUDA (the torch formulation is model_defs.moe.route)."""

import torch

from kernels.backend import triton_available
from kernels.tuning import disabled


def greedy_route(logits: torch.Tensor, top_k: int, sigmoid: bool, bias: torch.Tensor | None,
                 normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights [T, k] float32, ids [T, k] int64, best first) from logits [T, E] float32 in one Triton
    program per token on CUDA; None where that does not apply (the caller routes in torch)."""
    if not (logits.is_cuda and logits.dtype == torch.float32 and triton_available()) or disabled("route"):
        return None
    from kernels.triton_gemv import greedy_route_triton
    return greedy_route_triton(logits, top_k, sigmoid, bias, normalize, scaling)
