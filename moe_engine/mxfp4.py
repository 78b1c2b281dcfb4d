"""MXFP4 checkpoints (gpt-oss on the hub): `<name>_blocks` (two e2m1 values a byte) and `<name>_scales` (one e8m0
exponent per 32 values) stand for the tensor `<name>`: kept in 4 bits as an mxfp4 kernels.quant.QuantizedWeight
where our layout only reorders its rows (keep_mxfp4), else dequantised while loading."""

import torch

from kernels.quant import E2M1, MXFP4_BLOCK, QuantizedWeight
from moe_engine.checkpoint import TensorInfo
from moe_engine.errors import MoeEngineError
from moe_engine.quantize import held_weight, swap_weight

BLOCKS, SCALES = "_blocks", "_scales"


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


def row_order(model, name: str, N: int, K: int) -> torch.Tensor | None:
    """The checkpoint rows of `name` (one expert's [N, K] as stored; transformers' [K, N] once dequantised)
    in the order model.arrange_checkpoint_tensor puts them: [N] int64, where it only reorders whole rows,
    so every 32-value block along K stays whole; None where it does anything else (found by arranging
    the row and column index of every element)."""
    rows = torch.arange(N, dtype=torch.int32)[:, None].expand(N, K)          # [N, K]
    cols = torch.arange(K, dtype=torch.int32)[None, :].expand(N, K)          # [N, K]
    r = model.arrange_checkpoint_tensor(name, rows.transpose(-1, -2))
    c = model.arrange_checkpoint_tensor(name, cols.transpose(-1, -2))
    if tuple(r.shape) != (N, K) or tuple(c.shape) != (N, K) or not torch.equal(c, cols):
        return None
    order = r[:, 0].long()                                                    # [N]
    if not torch.equal(r, r[:, :1].expand(N, K)) or not torch.equal(order.sort().values, torch.arange(N)):
        return None
    return order


def keep_mxfp4(model, targets: dict, raw: dict[str, TensorInfo], tensors: dict[str, TensorInfo], device,
               orders: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap in an mxfp4 QuantizedWeight on device for every quantizable weight that is one whole stacked MXFP4
    tensor [E, N, K] (uint8 blocks and scales) whose layout here is the checkpoint's up to a row order;
    {checkpoint name: row order} of those (orders: ones already found, reused). Others are dequantised
    into their full-precision parameter while loading, as before."""
    if torch.device(device).type == "mps":
        return {}                                # untested there: MPS keeps dequantising
    kinds = model.quantizable_weights()
    kept = {}
    for name, (param, index) in targets.items():
        info = tensors.get(name)
        if info is None or info.dtype != "MXFP4" or index is not None or param not in kinds:
            continue
        if raw[name + BLOCKS].dtype != "U8" or raw[name + SCALES].dtype != "U8" or len(info.shape) != 3:
            continue
        E, K, N = info.shape
        p = held_weight(model, param)
        if not isinstance(p, torch.nn.Parameter) or tuple(p.shape) != (E, N, K):
            continue
        order = orders[name] if name in orders else row_order(model, name, N, K)
        if order is None:
            continue
        swap_weight(model, param, QuantizedWeight("mxfp4", p.shape, MXFP4_BLOCK, device=device))
        kept[name] = order
    return kept


def store_kept(handles: dict, raw: dict[str, TensorInfo], name: str, dest: QuantizedWeight,
               order: torch.Tensor) -> None:
    """The MXFP4 tensor `name`'s blocks and scales into its kept weight dest, bytes as stored, rows in
    `order`, one expert at a time."""
    blocks = handles[raw[name + BLOCKS].file].get_slice(name + BLOCKS)
    scales = handles[raw[name + SCALES].file].get_tensor(name + SCALES)      # [E, N, G]
    for e in range(scales.shape[0]):
        expert = blocks[e:e + 1][0]                                           # [N, G, 16]
        dest.store_packed((e,), expert[order].flatten(-2), scales[e][order])  # [N, K/2], [N, K/32]
