"""Torch reference of the linear on quantized weights (kernels.quant.QuantizedWeight): the layer dequantised
for the call. (The MoE's reference, kernels.moe.fused_moe_ref, dequantises only the experts that got tokens.)"""

import torch
import torch.nn.functional as F

from kernels.quant import QuantizedWeight


def quantized_linear_ref(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w.dequantize(x.dtype), bias): x [M, K], w [N, K] -> [M, N]."""
    return F.linear(x, w.dequantize(x.dtype), bias)
