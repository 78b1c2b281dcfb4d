"""FP8 checkpoints with per-tensor or per-channel scales, kept in FP8: compressed-tensors "float-quantized"
(strategy tensor or channel) and quant_method "fp8" without weight_block_size (AutoFP8, vLLM's fp8 method).

The layout: for a Linear `X`, `X.weight` float8_e4m3fn [N, K] and `X.weight_scale` (a scalar, [1] or [1, 1]
per tensor; [N, 1] or [N] per channel), weight = q * scale (the scale itself, not its inverse).
`X.input_scale` is a static activation scale: ignored, we run weight-only with activations in the model
dtype. Layers in the config's ignore list (ignore / ignored_layers / modules_to_not_convert) are stored
unquantized and load as they are.

Each quantizable weight whose checkpoint tensors are all e4m3 is held as a kernels.quant.QuantizedWeight
fp8 per channel, block (1, K): a per-tensor scale is spread over its rows, so a stack of parts with
different scales (gate+up, a layer's experts) is held exactly, each value and scale as stored. e5m2 weights
and MPS (no float8) get the dequantised values q.float() * scale instead."""

import re

import torch

from kernels.quant import QuantizedSlot, QuantizedWeight
from moe_engine.checkpoint import TensorInfo
from moe_engine.errors import MoeEngineError
from moe_engine.kv_scales import kv_cache_only
from moe_engine.quantize import keep_quantized

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_DTYPES = {"BF16", "F16", "F32"}
STRATEGIES = ("tensor", "channel")
PARTS = ("weight_scale", "input_scale")
FORMAT = "float-quantized"


def _groups(q: dict) -> list[tuple[list[str], str]]:
    """(targets, strategy) per compressed-tensors config group, each checked to be 8-bit float weights."""
    out = []
    for gname, g in (q.get("config_groups") or {}).items():
        w = (g or {}).get("weights") or {}
        bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
        if kind != "float" or bits != 8:
            raise MoeEngineError(f"compressed-tensors config group {gname}: {bits}-bit {kind} weights are not "
                                 "supported by the float-quantized loader (8-bit float, e4m3)")
        if strategy not in STRATEGIES:
            raise MoeEngineError(f"compressed-tensors config group {gname}: fp8 weight strategy {strategy!r} is not "
                                 "supported (tensor, channel)")
        if w.get("symmetric") is False:
            raise MoeEngineError(f"compressed-tensors config group {gname}: asymmetric fp8 weights are not "
                                 "supported (symmetric only)")
        out.append((list(g.get("targets") or []), strategy))
    return out


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", module) or module.endswith("." + target)


def _scale_shape_ok(shape: tuple, N: int, strategy: str | None) -> bool:
    tensor = len(shape) <= 2 and all(d == 1 for d in shape)
    channel = tuple(shape) in ((N, 1), (N,))
    return {"tensor": tensor, "channel": channel, None: tensor or channel}[strategy]


class ScaledFp8Checkpoint:
    """An FP8 per-tensor/per-channel checkpoint's tensors as the loader sees them: `X.weight` for every
    fp8 Linear X, its scale read with it; the scales are not targets of their own."""

    label = "fp8"
    holds_float8 = True          # the loader prepares nothing on MPS (no float8 there): write() dequantises

    def __init__(self, q: dict, tensors: dict[str, TensorInfo]):
        ct = q.get("quant_method") == "compressed-tensors"
        groups = _groups(q) if ct else None
        ignore = [n for key in ("ignore", "ignored_layers", "modules_to_not_convert") for n in (q.get(key) or [])]
        self.strategies: dict[str, str | None] = {}       # fp8 module -> tensor / channel (None: either)
        self.tensors = {n: t for n, t in tensors.items() if not n.endswith(tuple("." + p for p in PARTS))}
        problems = []
        for name, info in sorted(tensors.items()):
            if not name.endswith(".weight"):
                continue
            module = name.removesuffix(".weight")
            scale = tensors.get(module + ".weight_scale")
            if info.dtype not in FP8_DTYPES:
                if scale is not None:
                    problems.append(f"{name} is {info.dtype} beside {module}.weight_scale, expected F8_E4M3")
                continue                                  # an unquantized layer (ignore list, norms, ...)
            strategy = None
            if ct:
                if any(_matches(t, module) for t in ignore):
                    problems.append(f"{name} is fp8 but {module} is in quantization_config's ignore list")
                    continue
                strategy = next((s for targets, s in groups if any(_matches(t, module) for t in targets)), "")
                if not strategy:
                    problems.append(f"{name} is fp8 but no config group of quantization_config targets {module}")
                    continue
            problem = self._check(module, info, scale, strategy)
            if problem:
                problems.append(problem)
                continue
            self.strategies[module] = strategy
        orphans = sorted(n for n in tensors if n.endswith(".weight_scale")
                         and n.removesuffix("_scale") not in tensors)
        problems += [f"{n} has no {n.removesuffix('_scale')}" for n in orphans[:3]]
        if problems:
            raise MoeEngineError(f"fp8 checkpoint is inconsistent: {'; '.join(problems[:6])}"
                                 f"{' ...' if len(problems) > 6 else ''}; re-download or re-quantize it")

    @staticmethod
    def _check(module: str, info: TensorInfo, scale: TensorInfo | None, strategy: str | None) -> str | None:
        """One line naming the tensor and what is wrong with it, or None."""
        if len(info.shape) != 2:
            return f"{module}.weight has shape {list(info.shape)}: expected a 2-d fp8 weight"
        if scale is None:
            return f"{module}.weight is fp8 but its scale {module}.weight_scale is missing"
        N = info.shape[0]
        if scale.dtype not in SCALE_DTYPES or not _scale_shape_ok(tuple(scale.shape), N, strategy):
            want = {"tensor": "[1] (per tensor)", "channel": f"[{N}, 1] (per channel)",
                    None: f"[1] (per tensor) or [{N}, 1] (per channel)"}[strategy]
            return f"{module}.weight_scale is {scale.dtype} {list(scale.shape)}, expected a float {want}"
        return None

    def holds(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.strategies

    def logical_name(self, name: str) -> str | None:
        """A stored tensor's name as the loader's targets know it: the scales -> None (read with the weight)."""
        return None if name.endswith(tuple("." + p for p in PARTS)) else name

    def prepare(self, model, targets: dict, device) -> list[str]:
        """Replace each quantizable weight whose checkpoint tensors are all held e4m3 by an fp8 per-channel
        QuantizedWeight (the rest stay full precision and get dequantised values)."""
        def choose(p, parts):
            if (not isinstance(p, torch.nn.Parameter) or p.dim() < 2
                    or not all(self.holds(n) and self.tensors[n].dtype == "F8_E4M3" for n, _ in parts)):
                return None
            return QuantizedWeight("fp8", p.shape, (1, p.shape[-1]), scale_dtype=torch.float32, device=device)

        return keep_quantized(model, targets, choose)

    def write(self, name: str, handles, tensors: dict[str, TensorInfo], dest) -> None:
        """Read X.weight and its scale into dest: an fp8 QuantizedWeight (slot) takes the values as stored and
        a scale per row; a full-precision destination gets q.float() * scale."""
        module = name.removesuffix(".weight")
        q = handles[tensors[name].file].get_tensor(name)                                 # [N, K] float8
        scale_name = module + ".weight_scale"
        scale = handles[tensors[scale_name].file].get_tensor(scale_name).float()
        rows = scale.reshape(-1, 1).expand(q.shape[0], 1)                                # [N, 1]
        if isinstance(dest, QuantizedWeight):
            dest = dest[()]
        if isinstance(dest, QuantizedSlot) and q.dtype == torch.float8_e4m3fn:
            dest.store_quantized(q, rows)
        else:
            dest.copy_(q.float() * rows)


def _is_float_quantized(q: dict) -> bool:
    groups = q.get("config_groups")
    if not isinstance(groups, dict):
        return False
    return {(g or {}).get("format") or q.get("format") for g in groups.values()} == {FORMAT}


def read_scaled_fp8(cfg: dict, tensors: dict[str, TensorInfo]) -> ScaledFp8Checkpoint | None:
    """The checkpoint's per-tensor/channel FP8 view when config.json says so, else None: compressed-tensors
    whose config groups are all float-quantized, or quant_method fp8 without weight_block_size (and no
    block scales `weight_scale_inv`, which mean the DeepSeek-V3 128x128 form: moe_engine.fp8_checkpoint)."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or kv_cache_only(q):
        return None
    method = q.get("quant_method")
    if method == "compressed-tensors" and _is_float_quantized(q):
        return ScaledFp8Checkpoint(q, tensors)
    if (method == "fp8" and not q.get("weight_block_size")
            and not any(n.endswith(".weight_scale_inv") for n in tensors)):
        return ScaledFp8Checkpoint(q, tensors)
    return None
