"""FP8 block-scaled checkpoints (DeepSeek-V3 / Qwen3-FP8: `X.weight` float8_e4m3fn with `X.weight_scale_inv`
per block) kept in FP8: each quantizable weight whose checkpoint tensors are all e4m3 and lie on whole
scale blocks is held as a kernels.quant.QuantizedWeight of that block, its values and scales as stored."""

import torch

from kernels.quant import QuantizedSlot, QuantizedWeight
from moe_engine.checkpoint import TensorInfo
from moe_engine.quantize import keep_quantized

SCALE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _on_blocks(param_shape, index, bn: int) -> bool:
    """Whether a checkpoint tensor's rows in the stacked weight start and end on scale block boundaries."""
    rows = [i for i in (index or ()) if isinstance(i, slice)]
    if not rows:
        return True
    start, stop, _ = rows[0].indices(param_shape[-2])
    return start % bn == 0 and (stop % bn == 0 or stop == param_shape[-2])


def keep_fp8(model, targets: dict, tensors: dict[str, TensorInfo], block: tuple[int, int], scale_suffix: str,
             device) -> list[str]:
    """Swap in an fp8 QuantizedWeight for every weight that can hold its checkpoint tensors as stored; the
    names swapped. Others (a stack whose parts straddle a block, e5m2, a non-quantizable weight such as
    MLA's kv_b) keep their full-precision parameter and are dequantised into it, as before."""
    if torch.device(device).type == "mps":
        return []                                    # MPS has no float8

    def choose(p, parts):
        if not isinstance(p, torch.nn.Parameter) or p.dim() < 2:
            return None
        scales = {tensors[n + scale_suffix].dtype if n + scale_suffix in tensors else None for n, _ in parts}
        if (any(tensors[n].dtype != "F8_E4M3" for n, _ in parts) or len(scales) != 1 or None in scales
                or not all(_on_blocks(p.shape, index, block[0]) for _, index in parts)):
            return None
        return QuantizedWeight("fp8", p.shape, block, scale_dtype=SCALE_DTYPES.get(scales.pop(), torch.float32),
                               device=device)

    return keep_quantized(model, targets, choose)


def store_fp8(dest, q: torch.Tensor, scale_inv: torch.Tensor) -> bool:
    """Store float8 values and their block scales as they are when dest is a kept-fp8 weight (or part of
    one); False when dest is a full-precision parameter (the caller dequantises)."""
    if isinstance(dest, QuantizedWeight):
        dest = dest[()]
    if not isinstance(dest, QuantizedSlot) or q.dtype != torch.float8_e4m3fn:
        return False
    dest.store_quantized(q, scale_inv)
    return True
