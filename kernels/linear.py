"""Matrix products for few-row inputs (decode): on CPUs where the default route is slow, on CUDA through
the Triton GEMV for the weights where it was measured faster (kernels.tuning.LINEAR_TABLE)."""

import torch
import torch.nn.functional as F

from kernels.backend import triton_available
from kernels.tuning import GemmTile, linear_tuning

# skinny_linear splits weights of at least this many elements (512 KiB in float32); smaller ones tend
# to stay in L2, where one F.linear is faster.
SKINNY_MIN_WEIGHT = 1 << 17


def skinny_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x [M, K] with few rows, w [N, K]: [M, N].

    On the CPU a large weight is cut into 4 row blocks and multiplied as one bmm, which torch spreads
    over its threads; MKL then streams the weight about twice as fast as F.linear's single GEMV
    (measured on 2 cores: a cold 4096x256 weight, 470 -> 240 us at M=1). Small weights, wide
    batches and other devices go to F.linear."""
    M, K = x.shape
    N = w.shape[0]
    if x.device.type != "cpu":
        return linear(x, w)
    if (M > 16 or N % 4 or w.numel() < SKINNY_MIN_WEIGHT
            or x.dtype != w.dtype or not w.is_contiguous()):
        return F.linear(x, w)
    out = row_block_matmul(w, x.t().expand(4, K, M))                     # [4, N/4, M]
    return out.view(N, M).t().contiguous()                               # [M, N]


def gemv_tile(x: torch.Tensor, w: torch.Tensor) -> GemmTile | None:
    """The Triton GEMV's tile for x [T, K] @ w.T on CUDA when the tuning lists w's shape for T rows."""
    if not (x.is_cuda and x.dim() == 2 and w.is_cuda and w.dim() == 2 and triton_available()):
        return None
    tuning = linear_tuning(x.device, w.shape[0], w.shape[1], w.dtype)
    return tuning.tile if tuning is not None and x.shape[0] <= tuning.max_tokens else None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias); decode rows on CUDA go to the Triton GEMV where it was measured faster."""
    tile = gemv_tile(x, w) if x.dtype == w.dtype else None
    if tile is None:
        return F.linear(x, w, bias)
    from kernels.triton_gemv import gemv_triton
    return gemv_triton(x, w, tile, bias)


def router_logits(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x [T, D] @ gate [E, D].T in float32 (x rounded as it is, then multiplied in float32): [T, E]."""
    tile = gemv_tile(x, gate) if gate.dtype == torch.float32 else None
    if tile is None:
        return F.linear(x if x.dtype == torch.float32 else x.float(), gate)
    from kernels.triton_gemv import gemv_triton
    return gemv_triton(x, gate, tile, out_dtype=torch.float32)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): x [T, D], w13 [2I, D] (gate rows, then up rows), w2 [D, I] -> [T, D]."""
    gate, up = skinny_linear(x, w13).chunk(2, dim=-1)       # [T, I] each
    return skinny_linear(F.silu(gate) * up, w2)              # [T, D]


def row_block_matmul(w: torch.Tensor, x_cols: torch.Tensor) -> torch.Tensor:
    """w [N, K] times x_cols [S, K, M] (x [M, K] transposed and expanded S times) as one bmm over S row
    blocks of w: [S, N/S, M], which .view(N, M) puts back in order. The split that skinny_linear and the
    single-token MoE use to let MKL stream a weight on both threads."""
    S, K, _ = x_cols.shape
    return torch.bmm(w.view(S, w.shape[0] // S, K), x_cols)
