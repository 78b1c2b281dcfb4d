"""Matrix products for few-row inputs (decode): on CPUs where the default route is slow, on CUDA through
the Triton GEMV for the weights where it was measured faster (the "linear" entries of kernels/tuning_data)."""

import functools
import time

import torch
import torch.nn.functional as F

from kernels.backend import form, triton_available
from kernels.quant import QuantizedWeight
from kernels.tuning import GemmTile, linear_tuning

# Products of at most this many rows on the CPU go through column_split_linear.
COLUMN_SPLIT_MAX_ROWS = 8


def column_split_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x [M, K], w [N, K] (N even) as one bmm over the two halves of w's rows, i.e. of
    the output's columns: [M, N]. torch runs a bmm's batch on its threads, where MKL runs a few-row sgemm
    on one thread, so both cores of a decode step work (2 cores, 8 rows: a 4096x256 weight 340 -> 260 us,
    medians; 1 row 119 -> 100 us). Each output element is the same dot product as F.linear's."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.bmm(x.expand(2, M, K), w.view(2, N // 2, K).transpose(1, 2))     # [2, M, N/2]
    return out.transpose(0, 1).reshape(M, N)


# gathered_linear computes its product in this many row chunks of the weight.
GATHER_LINEAR_CHUNKS = 4


def gathered_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w.to(x.dtype), bias) for x [M, K], w [N, K] held narrower (bf16 under compile=True),
    written as multiplies and sums for torch.compile on the CPU: the compiler reads each weight in place,
    converting as it goes, in one loop over GATHER_LINEAR_CHUNKS row chunks of w with independent sums (as
    kernels.moe.fused_moe_gathered does for the experts). MKL's few-row products read a float32 weight
    twice over (once packing it), and the attention projections come to them from memory, evicted by the
    experts: tiny-mixtral's compiled step at batch 8, 2 cores, +8-11% decode tok/s (A/B in one process;
    batch 1 and the LM head, 4096 rows, no faster)."""
    N, K = w.shape
    c = GATHER_LINEAR_CHUNKS if N % GATHER_LINEAR_CHUNKS == 0 else 1
    parts = w.view(c, N // c, K)                                              # [c, N/c, K]
    out = torch.cat([(parts[i][None] * x[:, None, :]).sum(-1) for i in range(c)], -1)   # [M, N]
    return out if bias is None else out + bias


def splits_columns(x: torch.Tensor, w: torch.Tensor, compiled: bool = False) -> bool:
    """Whether column_split_linear serves x @ w.T for CPU tensors: an even and not tiny row count of w,
    and few rows of x, or any number in a compiled step (compiled: a compiled step is a decode step whose
    batch size is left dynamic, which a test of it would specialise; at 16-64 rows the split was no slower)."""
    return (x.dim() == 2 and w.dim() == 2 and (compiled or x.shape[0] <= COLUMN_SPLIT_MAX_ROWS)
            and w.shape[0] % 2 == 0 and w.shape[0] >= 64 and x.dtype == w.dtype and w.is_contiguous())


# Half-precision products of a weight this large (elements) or larger with at most NARROW_MAX_ROWS rows of x
# go through narrow_rows_product on the CPU; smaller weights keep F.linear (per-call cost dominates there).
NARROW_MIN_WEIGHT = 1 << 21
NARROW_MAX_ROWS = 32


def narrow_rows_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for few rows x [M, K] of bf16 / fp16 and w [N, K] of the same dtype, by the route
    narrow_routes measured fastest on this CPU: w @ x.T (torch.mv for one row), torch's GEMV-shaped kernel,
    or F.linear. Which wins depends on the machine: on one 2-core EPYC (AVX512-BF16, AMX) w @ x.T streamed
    a 2048x2048 bf16 weight 1.5x as fast as F.linear (1 row 720 -> 456 us, 8 rows 568 -> 411 us), on
    another (AVX512-BF16, no AMX) F.linear was 1.5x (1 row) to 1.9x (8 rows) as fast. [M, N], contiguous."""
    one, many = narrow_routes(x.dtype)
    if x.shape[0] == 1 and one == "mv":
        return torch.mv(w, x[0])[None]
    if x.shape[0] > 1 and many == "mm":
        return (w @ x.t()).t().contiguous()
    return F.linear(x, w)


# narrow_routes times each route over this many weights of NARROW_PROBE_SHAPE (64 MiB in bf16: more than a
# CPU's last-level cache, as the experts of a real model are when a decode step reads them).
NARROW_PROBE_WEIGHTS = 16
NARROW_PROBE_SHAPE = (1024, 2048)


@functools.cache
def narrow_routes(dtype: torch.dtype) -> tuple[str, str]:
    """(route for one row: "mv" or "linear", for 2-32 rows: "mm" or "linear"): the faster of each pair on
    this CPU for dtype, timed once per process (~0.1 s, the first time a large half-precision weight meets
    a decode-sized batch), best of three passes over NARROW_PROBE_WEIGHTS weights."""
    ws = [torch.full(NARROW_PROBE_SHAPE, 0.01, dtype=dtype) for _ in range(NARROW_PROBE_WEIGHTS)]
    x = torch.full((8, NARROW_PROBE_SHAPE[1]), 0.5, dtype=dtype)

    def best(product) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for w in ws:
                product(w)
            times.append(time.perf_counter() - start)
        return min(times)

    one = "mv" if best(lambda w: torch.mv(w, x[0])) < best(lambda w: F.linear(x[:1], w)) else "linear"
    many = "mm" if best(lambda w: (w @ x.t()).t().contiguous()) < best(lambda w: F.linear(x, w)) else "linear"
    return one, many


def takes_narrow_rows(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether narrow_rows_product serves x @ w.T for CPU tensors (see NARROW_MIN_WEIGHT)."""
    return (x.dim() == 2 and w.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype
            and x.shape[0] <= NARROW_MAX_ROWS and w.numel() >= NARROW_MIN_WEIGHT)


def gemv_tile(x: torch.Tensor, w: torch.Tensor) -> GemmTile | None:
    """The Triton GEMV's tile for x [T, K] @ w.T on CUDA when the tuning lists w's shape for T rows."""
    if not (x.is_cuda and x.dim() == 2 and w.is_cuda and w.dim() == 2 and triton_available()):
        return None
    tuning = linear_tuning(x.device, w.shape[0], w.shape[1], w.dtype)
    return tuning.tile if tuning is not None and x.shape[0] <= tuning.max_tokens else None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias); decode rows on CUDA go to the Triton GEMV where it was measured faster, and
    on the CPU to narrow_rows_product (large bf16 / fp16 weights) or column_split_linear. A CPU weight held
    narrower than x (bf16 under compile=True) is read in place by a compiled step (gathered_linear) and
    widened for the product otherwise. A quantized
    weight (kernels.quant.QuantizedWeight) goes to its op (kernels.quant_ops)."""
    if isinstance(w, QuantizedWeight):
        from kernels.quant_ops import quantized_linear
        return quantized_linear(x, w, bias)
    f = form("auto", x, w)
    if f == "triton":
        tile = gemv_tile(x, w) if x.dtype == w.dtype else None
        if tile is None:
            return F.linear(x, w, bias)
        from kernels.triton_gemv import gemv_triton
        return gemv_triton(x, w, tile, bias)
    if f == "torch":
        return F.linear(x, w, bias)
    if w.dtype != x.dtype:                 # a weight held in another dtype (store_weights)
        if f == "compiled" and x.dim() == 2:
            return gathered_linear(x, w, bias)
        w = w.to(x.dtype)                  # eager: widen it for this product
    if f == "cpu" and takes_narrow_rows(x, w):
        out = narrow_rows_product(x, w)
        return out if bias is None else out + bias
    if splits_columns(x, w, f == "compiled"):
        out = column_split_linear(x, w)
        return out if bias is None else out + bias
    return F.linear(x, w, bias)


def router_logits(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x [T, D] @ gate [E, D].T in float32 (x rounded as it is, then multiplied in float32): [T, E]."""
    tile = gemv_tile(x, gate) if gate.dtype == torch.float32 else None
    if tile is None:
        return F.linear(x if x.dtype == torch.float32 else x.float(), gate)
    from kernels.triton_gemv import gemv_triton
    return gemv_triton(x, gate, tile, out_dtype=torch.float32)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): x [T, D], w13 [2I, D] (gate rows, then up rows), w2 [D, I] -> [T, D]."""
    gate, up = linear(x, w13).chunk(2, dim=-1)              # [T, I] each
    return linear(F.silu(gate) * up, w2)                     # [T, D]


def row_block_matmul(w: torch.Tensor, x_cols: torch.Tensor) -> torch.Tensor:
    """w [N, K] times x_cols [S, K, M] (x [M, K] transposed and expanded S times) as one bmm over S row
    blocks of w: [S, N/S, M], which .view(N, M) puts back in order. The split the single-token MoE uses
    to let MKL stream an expert on both threads."""
    S, K, _ = x_cols.shape
    return torch.bmm(w.view(S, w.shape[0] // S, K), x_cols)
