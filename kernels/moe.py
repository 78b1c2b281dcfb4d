"""Grouped expert MLP (SwiGLU experts): the fused_moe entry point and its pure-torch reference."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.backend import form
from kernels.cpu_quant import cpu_quantized_linear
from kernels.linear import NARROW_MIN_WEIGHT, narrow_rows_product, row_block_matmul, swiglu
from kernels.quant import QuantizedWeight
from kernels.tuning import gemv_tuning


def _check_moe_args(x, w13, w2, topk_weights, topk_ids):
    T, D = x.shape
    E, two_i, d13 = w13.shape
    if d13 != D or two_i % 2:
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} does not fit x {tuple(x.shape)}; want [E, 2*I, {D}]")
    if tuple(w2.shape) != (E, D, two_i // 2):
        raise ValueError(f"fused_moe: w2 {tuple(w2.shape)} should be {(E, D, two_i // 2)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} / topk_weights "
                         f"{tuple(topk_weights.shape)} should both be [{T}, k]")


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation of the gate and up halves: the gate clamped above at `limit`, up to
    [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate)."""
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, b13: torch.Tensor | None = None,
                  b2: torch.Tensor | None = None, activation: ClampedSwiGLU | None = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).

    An expert is down(act(gate(x), up(x))) with act silu(gate) * up, or `activation` when given; b13
    [E, 2I] (gate biases, then up) and b2 [E, D] are the experts' biases, when they have them.
    Tokens are sorted by expert so each expert runs one dense matmul over its rows;
    experts that received no token cost nothing. Experts held quantized (kernels.quant.QuantizedWeight, either
    or both of w13 and w2) are dequantised one expert at a time, only those that got tokens.
    """
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    plain = b13 is None and b2 is None and activation is None
    if x.shape[0] == 1 and plain and not (isinstance(w13, QuantizedWeight) or isinstance(w2, QuantizedWeight)):
        return _single_token_moe(x, w13, w2, topk_weights, topk_ids)
    return _sorted_experts(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, _dequantized_product)


def _sorted_experts(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, product) -> torch.Tensor:
    """fused_moe_ref's loop: tokens sorted by expert, each expert's rows through product(rows, w, e, bias)."""
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)                          # [T*k]
    order = torch.argsort(flat_ids, stable=True)             # [T*k]
    token_of = order // k                                    # [T*k] source token of each sorted row
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x[token_of]                                         # [T*k, D]
    outs = []
    for e, rows in enumerate(xs.split(counts)):              # rows [n_e, D], in expert order
        if len(rows):
            outs.append(_run_expert(rows, e, w13, w2, b13, b2, activation, product))   # [n_e, D]
    if not outs:                                             # no tokens at all
        return torch.zeros_like(x)
    ys = torch.cat(outs)                                     # [T*k, D]
    weights = topk_weights.reshape(-1)[order].to(ys.dtype)   # [T*k]
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, ys * weights[:, None])
    return out


def _run_expert(rows, e, w13, w2, b13, b2, activation, product) -> torch.Tensor:
    """Expert e over rows [n, D] -> [n, D]; products through product(rows, w, e, bias)."""
    gate, up = product(rows, w13, e, b13).chunk(2, dim=-1)              # [n, I] each
    act = F.silu(gate) * up if activation is None else activation(gate, up)
    return product(act, w2, e, b2)


def _dequantized_product(rows: torch.Tensor, w, e: int, bias) -> torch.Tensor:
    """rows @ w[e].T (+ bias[e]), w[e] widened where stored narrower and dequantised where held quantized."""
    return F.linear(rows, _expert(w, e, rows.dtype), _row(bias, e, rows.dtype))


def _fused_product(rows: torch.Tensor, w, e: int, bias) -> torch.Tensor:
    """_dequantized_product through torch's fused quantized CPU ops where they take w (kernels.cpu_quant)."""
    if isinstance(w, QuantizedWeight):
        out = cpu_quantized_linear(rows, w, (e,), _row(bias, e, rows.dtype))
        if out is not None:
            return out
    return _dequantized_product(rows, w, e, bias)


def _narrow_product(rows: torch.Tensor, w: torch.Tensor, e: int, bias) -> torch.Tensor:
    out = narrow_rows_product(rows, w[e])
    return out if bias is None else out + bias[e]


def fused_moe_narrow(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe_ref for large bf16 / fp16 experts and decode-sized batches on the CPU: each expert that got
    tokens runs its rows through kernels.linear.narrow_rows_product, which streams a half-precision weight
    fastest for few rows. (3.56B shape, 64
    experts of 2048x1024, 2 cores: one MoE layer at 1 token 11.8 -> 6.8 ms; dense at 8 tokens 148 ms.)"""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    return _routed_experts(x, w13, w2, topk_weights, topk_ids, None, None, None, _narrow_product)


def _routed_experts(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, product) -> torch.Tensor:
    """fused_moe_ref's result with the experts' products through product(rows, w, e, bias): tokens sorted
    by expert for a batch; one token (decode at batch 1) runs its k experts in routing order, unsorted."""
    if x.shape[0] > 1:
        return _sorted_experts(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, product)
    out = torch.zeros_like(x)                                            # [1, D]
    for e, weight in zip(topk_ids.view(-1).tolist(), topk_weights.view(-1).tolist()):
        out.add_(_run_expert(x, e, w13, w2, b13, b2, activation, product), alpha=weight)
    return out


# Quantized experts of at most this many tokens go through the Triton few-token kernel (on CUDA).
QUANT_GEMV_MAX_TOKENS = 16


def _quant_gemv_fits(x, w13, w2) -> bool:
    from kernels.triton_quant_gemv import takes
    return (x.shape[0] <= QUANT_GEMV_MAX_TOKENS and isinstance(w13, QuantizedWeight)
            and isinstance(w2, QuantizedWeight) and takes(w13) and takes(w2))


def fused_moe_quant_gemv(x: torch.Tensor, w13, w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         b13=None, b2=None, activation: ClampedSwiGLU | None = None) -> torch.Tensor:
    """fused_moe_ref for a few tokens with int8 / int4 experts, through the Triton kernel that dequantises
    in registers (kernels/triton_quant_gemv.py): one launch for every (token, expert) pair's gate and up
    rows, one for their down rows, then the weighted sum; no expert ids go to the host."""
    from kernels.triton_quant_gemv import quant_gemv
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    T, D = x.shape
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1)                                           # [T*k]
    h = quant_gemv(x, w13, ids, k)                                       # [T*k, 2I]
    if b13 is not None:
        h = h + b13[ids].to(h.dtype)
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up if activation is None else activation(gate, up)
    y = quant_gemv(act, w2, ids)                                         # [T*k, D]
    if b2 is not None:
        y = y + b2[ids].to(y.dtype)
    return (y.view(T, k, D) * topk_weights.view(T, k, 1).to(y.dtype)).sum(1)


def fused_moe_quantized_cpu(x: torch.Tensor, w13, w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            b13=None, b2=None, activation: ClampedSwiGLU | None = None) -> torch.Tensor:
    """fused_moe_ref for experts held quantized, run eagerly on the CPU: each expert that got tokens reads
    its int8 / int4 bytes in place through torch's fused ops (no dequantised copy), others dequantise as
    the reference does."""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    return _routed_experts(x, w13, w2, topk_weights, topk_ids, b13, b2, activation, _fused_product)


def _expert(w, e: int, dtype) -> torch.Tensor:
    """Expert e's weight in dtype: widened where stored narrower, dequantised where held quantized."""
    return w.dequantize(dtype, (e,)) if isinstance(w, QuantizedWeight) else w[e].to(dtype)


def _row(b: torch.Tensor | None, e: int, dtype) -> torch.Tensor | None:
    return None if b is None else b[e].to(dtype)


def _single_token_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Decode of one sequence: just run its k experts (no sorting or scatter), in as few torch calls as
    possible, since on the CPU each call costs microseconds that a tiny expert does not amortise: the
    gate/up product split into one bmm over 4 row blocks (MKL streams a weight faster so, see
    kernels.linear), and the down product accumulated with its routing weight in one addmm."""
    D, I = x.shape[1], w2.shape[2]
    N = 2 * I
    split = 4 if x.device.type == "cpu" and N % 4 == 0 else 1
    x_cols = x.t().expand(split, D, 1)                                  # [split, D, 1]
    out = x.new_zeros(1, D)
    for e, w in zip(topk_ids.view(-1).tolist(), topk_weights.view(-1).tolist()):
        h = row_block_matmul(w13[e].to(x.dtype), x_cols).view(1, N)      # [1, 2I]: gate | up
        act = F.silu(h[:, :I]).mul_(h[:, I:])                            # [1, I]
        out = torch.addmm(out, act, w2[e].to(x.dtype).t(), alpha=w)      # out + w * act @ w2[e].T
    return out


# Eager decode-sized batches on the CPU run every expert over every token (fused_moe_dense) up to this many
# tokens, when the experts are large enough for streaming them to dominate.
DENSE_MAX_TOKENS = 32
DENSE_MIN_WEIGHT = 1 << 20


def grouped_mm_fits(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """torch's grouped matmul serves the CPU when present and every row stride is a 16-byte multiple."""
    elem = x.element_size()
    return (hasattr(F, "grouped_mm") and x.device.type == "cpu" and x.dtype == w13.dtype
            and (x.shape[1] * elem) % 16 == 0 and (w13.shape[1] // 2 * elem) % 16 == 0)


def fused_moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The reference's arithmetic with the per-expert loop replaced by two grouped matmuls (one call each
    for gate+up and for down over all experts), for batches on the CPU."""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)                                          # [T*k]
    order = torch.argsort(flat_ids, stable=True)                             # [T*k]
    token_of = order // k                                                    # [T*k]
    ends = torch.bincount(flat_ids, minlength=w13.shape[0]).cumsum(0).to(torch.int32)   # [E]
    gate, up = F.grouped_mm(x[token_of], w13.transpose(1, 2), offs=ends).chunk(2, dim=-1)  # [T*k, I]
    ys = F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)     # [T*k, D]
    weights = topk_weights.reshape(-1)[order].to(ys.dtype)                   # [T*k]
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, ys * weights[:, None])
    return out


def fused_moe_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Every expert over every token, weighted by its routing weight (0 where not chosen): E/k times the
    reference's arithmetic, but two bmm over all experts, which stream the weights about twice as fast as
    grouped_mm for decode batches on the CPU (2 cores: tiny-mixtral's MoE at 8 tokens, ~2 -> ~1.2 ms).
    Unlike the reference, an expert's inf/nan on a token that did not choose it spreads to that token."""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    T, D = x.shape
    E = w13.shape[0]
    dense_weights = x.new_zeros(T, E).scatter_add_(1, topk_ids, topk_weights.to(x.dtype))   # [T, E]
    gate, up = torch.bmm(w13, x.t().expand(E, D, T)).chunk(2, dim=1)                     # [E, I, T] each
    h = F.silu(gate).mul_(up).mul_(dense_weights.t()[:, None, :])                        # [E, I, T]
    # Stored as [E, T, I]: the layout bmm multiplies fastest as its second operand (about 2x here).
    h = h.transpose(1, 2).contiguous().transpose(1, 2)                                   # [E, I, T]
    return torch.bmm(w2, h).sum(0).t().contiguous()                                      # [E, D, T] -> [T, D]


def fused_moe_dense_biased(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, b13: torch.Tensor | None, b2: torch.Tensor | None,
                           activation: ClampedSwiGLU | None) -> torch.Tensor:
    """fused_moe_ref's experts with biases / another activation run as fused_moe_dense does (every expert
    over every token, weighted 0 where not chosen): no expert ids go to the host, so a captured CUDA graph
    or a compiled step can hold it. E/k times the arithmetic; for decode-sized batches."""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    T, D = x.shape
    E = w13.shape[0]
    dense_weights = x.new_zeros(T, E).scatter_add_(1, topk_ids, topk_weights.to(x.dtype)).t()[:, None, :]  # [E, 1, T]
    h = torch.bmm(w13.to(x.dtype), x.t().expand(E, D, T))                                # [E, 2I, T]
    if b13 is not None:
        h = h + b13.to(x.dtype)[:, :, None]
    gate, up = h.chunk(2, dim=1)                                                         # [E, I, T] each
    act = (F.silu(gate) * up if activation is None else activation(gate, up)) * dense_weights
    out = torch.bmm(w2.to(x.dtype), act)                                                 # [E, D, T]
    if b2 is not None:
        out = out + b2.to(x.dtype)[:, :, None] * dense_weights
    return out.sum(0).t().contiguous()                                                   # [T, D]


# The gathered MoE computes each reduction's rows in this many chunks (see fused_moe_gathered).
GATHER_ROW_CHUNKS = 2


def fused_moe_gathered(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The chosen experts' products written as gathers, multiplies and sums over the weights, for
    torch.compile on the CPU: the compiler fuses each gather into its reduction, so the k experts are read
    in place, with no expert ids brought to the host and no per-expert loop. Run eagerly it would copy the
    chosen weights out first (fine for tests, slow for use).

    Each product is written as GATHER_ROW_CHUNKS (down) or twice that (gate and up) reductions over
    equal row chunks of the weight. The compiler puts reductions of the same shape in one loop, so each
    input vector loaded (and each expert index computed) serves one row of every chunk, and the chunks
    add up in independent registers: one chunk leaves each output waiting on its previous add. A step of
    tiny-mixtral's four MoE layers at 8 tokens, 2 cores: 3.65 -> 2.45 ms (medians, caches flushed)."""
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    D, I = w2.shape[1], w2.shape[2]
    s = GATHER_ROW_CHUNKS if I % GATHER_ROW_CHUNKS == 0 and D % GATHER_ROW_CHUNKS == 0 else 1
    h = _gathered_row_chunks(w13, topk_ids, x[:, None, :], 2 * s)        # 2s x [T, k, I/s]: gate, then up
    act = torch.cat([F.silu(h[i]) * h[s + i] for i in range(s)], -1)      # [T, k, I]
    y = torch.cat(_gathered_row_chunks(w2, topk_ids, act, s), -1)         # [T, k, D]
    return (y * topk_weights[..., None].to(y.dtype)).sum(1)              # [T, D]


def _gathered_row_chunks(w: torch.Tensor, ids: torch.Tensor, v: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """w [E, N, K], ids [T, k], v [T, k, K] -> chunks tensors [T, k, N / chunks]: chunk i holds rows
    i N/chunks .. (i+1) N/chunks of w[ids] @ v, so their concatenation is w[ids] @ v."""
    E, N, K = w.shape
    parts = w.view(E, chunks, N // chunks, K)
    return [(parts[:, i][ids] * v[..., None, :]).sum(-1) for i in range(chunks)]


def _cpu_path(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor):
    """Which torch formulation serves this batch on the CPU, run eagerly (see fused_moe)."""
    T = x.shape[0]
    dense_fits = x.dtype == w13.dtype == w2.dtype and T <= DENSE_MAX_TOKENS
    if dense_fits and x.dtype in (torch.bfloat16, torch.float16) and w2[0].numel() >= NARROW_MIN_WEIGHT:
        return fused_moe_narrow
    if dense_fits and T > 1 and w13.numel() >= DENSE_MIN_WEIGHT:
        return fused_moe_dense
    return fused_moe_grouped if T > 1 and grouped_mm_fits(x, w13) else fused_moe_ref


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, backend: str = "auto",
              shared: tuple[torch.Tensor, torch.Tensor] | None = None, b13: torch.Tensor | None = None,
              b2: torch.Tensor | None = None, activation: ClampedSwiGLU | None = None) -> torch.Tensor:
    """Mixture of SwiGLU experts: x [T, D], w13 [E, 2I, D], w2 [E, D, I], topk_* [T, k] -> [T, D], plus
    the shared experts' SwiGLU (w13s [2*I_s, D], w2s [D, I_s]) when `shared` is given.

    backend 'auto' runs Triton on CUDA tensors: a batch of a token or few goes through the few-token
    kernels (kernels/triton_moe_gemv.py), which also take shared experts whose width is a multiple of the
    routed one; larger batches through the tiled ones. On the CPU a compiled decode step takes the chosen
    experts in place (fused_moe_gathered); run eagerly, a decode-sized batch with large bf16 / fp16 experts
    runs each chosen expert through the GEMV-shaped product (fused_moe_narrow), one with large float32
    experts runs them densely, a larger batch goes through torch's grouped matmul where it fits; everything
    else, and backend 'torch', runs the reference (see kernels.backend). Shared experts not taken by a kernel are added after.
    Experts held quantized (kernels.quant.QuantizedWeight) run fused_moe_quantized_cpu eagerly on the CPU,
    fused_moe_quant_gemv on CUDA for a few tokens (int8 / int4), and the reference otherwise.
    Experts with biases (b13, b2) or another activation (gpt-oss) run the reference, or where no host sync
    may happen (a compiled step, a CUDA graph being captured) and for decode-sized batches on CUDA,
    fused_moe_dense_biased."""
    if isinstance(w13, QuantizedWeight) or isinstance(w2, QuantizedWeight):
        f = form(backend, x)
        path = (fused_moe_quantized_cpu if f == "cpu" else fused_moe_quant_gemv
                if f == "triton" and _quant_gemv_fits(x, w13, w2) else fused_moe_ref)
        return add_shared(path(x, w13, w2, topk_weights, topk_ids, b13, b2, activation), x, shared)
    f = form(backend, x, w13, w2)
    if b13 is not None or b2 is not None or activation is not None:
        no_sync = f == "compiled" or (x.is_cuda and (
            x.shape[0] <= DENSE_MAX_TOKENS or torch.cuda.is_current_stream_capturing()))
        path = fused_moe_dense_biased if no_sync else fused_moe_ref
        return add_shared(path(x, w13, w2, topk_weights, topk_ids, b13, b2, activation), x, shared)
    if f != "triton":
        # A compiled decode step (moe_engine.runners.compiled): no host round trip for the expert ids. Gathered
        # at every batch size: compiled, it beats dense even at 8 tokens choosing all 8 experts (tiny-mixtral's
        # four MoE layers, 2 cores: 3.5 ms against 5.7 ms; 16 experts top-4: 2.1 against 4.3 ms).
        path = (fused_moe_gathered if f == "compiled" else _cpu_path(x, w13, w2, topk_ids) if f == "cpu"
                else fused_moe_ref)
        return add_shared(path(x, w13, w2, topk_weights, topk_ids), x, shared)
    _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"fused_moe: x, w13, w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if x.shape[0] <= gemv_tuning(x.device, x.shape[1], w2.shape[2], w13.dtype).max_tokens:
        from kernels.triton_moe_gemv import fused_moe_gemv, shared_slices
        if shared_slices(w13, shared) >= 0:
            return fused_moe_gemv(x, w13, w2, topk_weights, topk_ids, shared)
        return add_shared(fused_moe_gemv(x, w13, w2, topk_weights, topk_ids), x, shared)
    from kernels.triton_moe import fused_moe_triton
    return add_shared(fused_moe_triton(x, w13, w2, topk_weights, topk_ids), x, shared)


def add_shared(out: torch.Tensor, x: torch.Tensor, shared) -> torch.Tensor:
    """out [T, D] plus the shared experts' SwiGLU of x (shared = (w13s, w2s)), when there are any."""
    return out if shared is None else out + swiglu(x, *shared)
