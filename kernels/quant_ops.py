"""The linear on quantized weights (kernels.quant.QuantizedWeight): its entry point and the torch reference,
the layer dequantised for the call. (The MoE's are kernels.moe.fused_moe and fused_moe_ref.)"""

import torch
import torch.nn.functional as F

from kernels.backend import form
from kernels.cpu_quant import cpu_quantized_linear
from kernels.quant import QuantizedWeight


def quantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """F.linear(x, w.dequantize(x.dtype), bias): x [.., K], w [N, K] -> [.., N]. Run eagerly on the CPU,
    int8 per channel and int4 in groups go through torch's fused ops (kernels.cpu_quant); on CUDA, int8 and
    int4 at decode sizes through the Triton GEMV that dequantises in registers; the rest, and backend
    'torch', through the reference."""
    f = form(backend, x) if x.dim() == 2 else "torch"
    if f == "cpu":
        out = cpu_quantized_linear(x, w, (), bias)
        if out is not None:
            return out
    if f == "triton" and x.shape[0] <= QUANT_GEMV_MAX_ROWS and w.dim() == 2:
        from kernels.triton_quant_gemv import quant_gemv, takes
        if takes(w):
            out = quant_gemv(x, w)
            return out if bias is None else out + bias
    return quantized_linear_ref(x, w, bias)


# Rows of x up to which a quantized linear on CUDA goes through the Triton GEMV (kernels/triton_quant_gemv.py).
QUANT_GEMV_MAX_ROWS = 16


def quantized_linear_ref(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w.dequantize(x.dtype), bias): x [M, K], w [N, K] -> [M, N]."""
    return F.linear(x, w.dequantize(x.dtype), bias)
