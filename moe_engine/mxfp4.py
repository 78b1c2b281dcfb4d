"""MXFP4 checkpoints (gpt-oss on the hub): `<name>_blocks` (two e2m1 values a byte) and `<name>_scales` (one e8m0
exponent per 32 values) stand for the tensor `<name>`, dequantised while loading."""

import torch

from moe_engine.checkpoint import TensorInfo
from moe_engine.errors import MoeEngineError

BLOCKS, SCALES = "_blocks", "_scales"
# The 16 e2m1 codes: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(cfg: dict) -> bool:
    q = cfg.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """blocks [..., N, G, 16] uint8 (low nibble first), scales [..., N, G] uint8 (exponent + 127) ->
    [..., N, 32 G] in dtype. transformers' convert_moe_packed_tensors returns this transposed (its
    parameter layout, [..., 32 G, N])."""
    lut = torch.tensor(E2M1, dtype=dtype, device=blocks.device)
    *prefix, N, G, B = blocks.shape
    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).long()              # [..., N, G, 16, 2]
    values = lut[codes].view(*prefix, N, G, 2 * B)                            # [..., N, G, 32]
    exponents = scales.to(torch.int32)[..., None] - 127                       # [..., N, G, 1]
    return torch.ldexp(values, exponents).view(*prefix, N, G * 2 * B).to(dtype)


def logical_tensors(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The checkpoint's index with each `<name>_blocks` / `<name>_scales` pair replaced by `<name>` as
    transformers holds it after dequantising: shape [..., 32 G, N], dtype "MXFP4" (the file: the blocks')."""
    out = {}
    for name, info in tensors.items():
        base = name[: -len(BLOCKS)] if name.endswith(BLOCKS) else None
        if base is not None and base + SCALES in tensors and len(info.shape) >= 3:
            *prefix, N, G, B = info.shape
            if tensors[base + SCALES].shape != (*prefix, N, G):
                raise MoeEngineError(f"{base + SCALES} has shape {list(tensors[base + SCALES].shape)}, but "
                                     f"{name} {list(info.shape)} wants {[*prefix, N, G]}; re-download the checkpoint")
            out[base] = TensorInfo(info.file, (*prefix, G * 2 * B, N), "MXFP4")
        elif not (name.endswith(SCALES) and name[: -len(SCALES)] + BLOCKS in tensors):
            out[name] = info
    return out


def read_dequantized(handles: dict, raw: dict[str, TensorInfo], name: str, dtype, where):
    """Yield (expert index, tensor [32 G, N] in dtype) of the MXFP4 tensor `name`, one expert at a time
    (one expert's values in memory, not the layer's)."""
    blocks = handles[raw[name + BLOCKS].file].get_slice(name + BLOCKS)
    scales = handles[raw[name + SCALES].file].get_tensor(name + SCALES)
    for e in range(scales.shape[0]):
        w = dequantize_mxfp4(blocks[e:e + 1][0].to(where), scales[e].to(where), dtype)   # [N, 32 G]
        yield e, w.transpose(-1, -2)
