"""Torch references of the ops on quantized weights (kernels.quant.QuantizedWeight): linear and the MoE.
They dequantise only what a call uses: the layer for a linear, the experts that got tokens for the MoE."""

import torch
import torch.nn.functional as F

from kernels.quant import QuantizedWeight


def quantized_linear_ref(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w.dequantize(x.dtype), bias): x [M, K], w [N, K] -> [M, N]."""
    return F.linear(x, w.dequantize(x.dtype), bias)


def fused_moe_quantized_ref(x: torch.Tensor, w13, w2, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor) -> torch.Tensor:
    """kernels.moe.fused_moe_ref for experts held quantized (either or both of w13 [E, 2I, D], w2 [E, D, I]):
    tokens sorted by expert, each expert that got any dequantised once for one dense matmul over its rows."""
    T, D = x.shape
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)                          # [T*k]
    order = torch.argsort(flat_ids, stable=True)             # [T*k]
    token_of = order // k                                    # [T*k] source token of each sorted row
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x[token_of]                                         # [T*k, D]
    outs = []
    for e, rows in enumerate(xs.split(counts)):              # rows [n_e, D], in expert order
        if len(rows):
            gate, up = F.linear(rows, _expert(w13, e, x.dtype)).chunk(2, dim=-1)    # [n_e, I] each
            outs.append(F.linear(F.silu(gate) * up, _expert(w2, e, x.dtype)))     # [n_e, D]
    if not outs:
        return torch.zeros_like(x)
    ys = torch.cat(outs)                                     # [T*k, D]
    weights = topk_weights.reshape(-1)[order].to(ys.dtype)   # [T*k]
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, ys * weights[:, None])
    return out


def _expert(w, e: int, dtype) -> torch.Tensor:
    return w.dequantize(dtype, (e,)) if isinstance(w, QuantizedWeight) else w[e].to(dtype)
