"""Top-k routing in one kernel on CUDA, in all the published variants (the torch formulation is
model_defs.moe.route)."""

import torch

from kernels.backend import triton_available
from kernels.tuning import enabled


def fused_route(logits: torch.Tensor, top_k: int, sigmoid: bool, bias: torch.Tensor | None, normalize: bool,
                scaling: float, method: str = "greedy", n_group: int = 1,
                topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights [T, k] float32, ids [T, k] int64, best first) from logits [T, E] float32 in one Triton
    program per token on CUDA; method "greedy", "group_limited_greedy" or "noaux_tc" (n_group groups, the
    topk_group best kept). None where that does not apply (the caller routes in torch)."""
    if not (logits.is_cuda and logits.dtype == torch.float32 and triton_available()) or not enabled("route"):
        return None
    from kernels.triton_gemv import route_triton
    return route_triton(logits, top_k, sigmoid, bias, normalize, scaling, method, n_group, topk_group)


def ranking_is_free(logits: torch.Tensor) -> bool:
    """Whether torch's top-k should return the experts ranked (sorted=True): on the CPU the ranking costs
    nothing and keeps the hooked and plain paths summing experts in the same order (bit-identical
    results); on CUDA, where the routing kernel does not serve (no Triton, or turned off), unranked saves a
    sort kernel per layer (the kernel itself ranks anyway)."""
    return not logits.is_cuda
