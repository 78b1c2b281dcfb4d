"""KV-cache scales a checkpoint carries (k_scale / v_scale per attention layer): their names as llm-compressor
(compressed-tensors), AutoFP8 and ModelOpt write them, the kv_cache_scheme config.json declares, and the per-layer
scales an fp8 / int8 cache is written with when kv_cache_dtype asks for the cache they were calibrated for."""

import math
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from moe_engine.checkpoint import TensorInfo
from moe_engine.errors import MoeEngineError

# Per attention layer, in the order looked for: compressed-tensors / vLLM's own (self_attn.k_scale), ModelOpt
# (k_proj.k_scale), older compressed-tensors and AutoFP8's static scheme (k_proj.output_scale), and AutoFP8's
# deprecated single kv_scale, which stands for both. Each is x / q: amax / 448 for fp8 e4m3, amax / 127 int8.
KEY_NAMES = ("self_attn.k_scale", "self_attn.k_proj.k_scale", "self_attn.k_proj.output_scale", "self_attn.kv_scale")
VALUE_NAMES = ("self_attn.v_scale", "self_attn.v_proj.v_scale", "self_attn.v_proj.output_scale", "self_attn.kv_scale")
# Read but never applied: zero points (an asymmetric scheme, refused unless all zero) and fp8 attention's query
# and softmax scales (attention here computes in the model dtype, which they do not change).
ZERO_NAMES = ("self_attn.k_zero_point", "self_attn.v_zero_point")
OTHER_NAMES = ("self_attn.q_scale", "self_attn.prob_scale", "self_attn.q_proj.output_scale")
_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)$")
MAX_VALUES = 1 << 16        # a "scale" bigger than this is not one: its shape is kept for the message, not read
SCHEMES = "8-bit float (fp8 e4m3) or int, symmetric, strategy tensor or attn_head"


def is_kv_scale_name(name: str) -> bool:
    m = _NAME.match(name)
    return m is not None and m[2] in KEY_NAMES + VALUE_NAMES + ZERO_NAMES + OTHER_NAMES


def kv_cache_only(q: dict) -> bool:
    """A compressed-tensors quantization_config that quantizes the KV cache alone (no weight config groups)."""
    return (q.get("quant_method") == "compressed-tensors" and not q.get("config_groups")
            and q.get("kv_cache_scheme") is not None)


@dataclass(frozen=True)
class KVScheme:
    """What config.json says the checkpoint's KV scales are for: kv_cache_dtype "fp8" or "int8", strategy "tensor"
    (one scale per layer) or "attn_head" (one per KV head); dynamic: scales computed at run time (none stored);
    problem: why this engine cannot run it (None when it can)."""
    kv_cache_dtype: str | None
    strategy: str = "tensor"
    dynamic: bool = False
    problem: str | None = None


def read_scheme(cfg: dict) -> KVScheme | None:
    """quantization_config.kv_cache_scheme (compressed-tensors' QuantizationArgs, its defaults where a field is
    left out; AutoFP8's "static"), or None when config.json declares none."""
    q = cfg.get("quantization_config")
    s = q.get("kv_cache_scheme") if isinstance(q, dict) else None
    if s is None:
        return None
    if s == "static":                                   # AutoFP8: per-tensor fp8 output scales of k/v_proj
        return KVScheme("fp8")
    if not isinstance(s, dict):
        return KVScheme(None, problem=f"{s!r} (neither a scheme object nor AutoFP8's 'static')")
    bits, kind, strategy = s.get("num_bits", 8), s.get("type", "int"), s.get("strategy") or "tensor"
    dtype = {(8, "float"): "fp8", (8, "int"): "int8"}.get((bits, kind))
    problem = (f"{bits}-bit {kind}" if dtype is None
               else f"strategy {strategy!r}" if strategy not in ("tensor", "attn_head")
               else "asymmetric (zero points)" if s.get("symmetric", True) is False else None)
    return KVScheme(dtype, strategy, bool(s.get("dynamic", False)), problem)


@dataclass(frozen=True)
class CheckpointKVScales:
    """A checkpoint's KV-cache scales as read at load, not yet judged: the scheme config.json declares (None:
    none) and every scale-named tensor (name -> its values; a meta tensor of its shape where too big to read)."""
    scheme: KVScheme | None
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str | None:
        """The cache dtype the stored scales are for: the scheme's; without one, fp8 (what AutoFP8, ModelOpt
        and vLLM write); None when none are stored (a dynamic scheme, or scales absent)."""
        if self.scheme is not None:
            return None if self.scheme.dynamic else self.scheme.kv_cache_dtype
        return "fp8" if any(_NAME.match(n)[2] in KEY_NAMES + VALUE_NAMES for n in self.tensors) else None

    def layer_scales(self, num_layers: int, kv_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys', values') scales [kv_heads] float32; MoeEngineError naming the first tensor that is
        missing, mis-shaped or not a positive finite scale, or a scheme this engine does not run."""
        s = self.scheme
        if s is not None and s.problem:
            raise MoeEngineError(f"config.json's quantization_config.kv_cache_scheme is {s.problem}, which this "
                                 f"engine does not run ({SCHEMES}); load with kv_cache_dtype='auto' (the "
                                 "checkpoint's KV scales unused)")
        per_head = s is not None and s.strategy == "attn_head"
        for name in ZERO_NAMES:
            for n, t in self.tensors.items():
                if n.endswith("." + name) and (t.is_meta or bool((t.float() != 0).any())):
                    raise MoeEngineError(f"{n} is a non-zero KV zero point (an asymmetric scheme), which this engine "
                                         f"does not run ({SCHEMES}); load with kv_cache_dtype='auto'")
        out = []
        for i in range(num_layers):
            pair = []
            for names, which in ((KEY_NAMES, "k"), (VALUE_NAMES, "v")):
                name = next((f"model.layers.{i}.{n}" for n in names if f"model.layers.{i}.{n}" in self.tensors), None)
                if name is None:
                    raise MoeEngineError(f"the checkpoint has no {which}_scale for layer {i} "
                                         f"({self._form(names, i)} is missing) while it carries KV scales"
                                         f"{' or declares a kv_cache_scheme' if s is not None else ''}; "
                                         "re-download the checkpoint, or load with kv_cache_dtype='auto'")
                pair.append(self._scale(name, kv_heads, per_head))
            out.append(tuple(pair))
        return out

    def _form(self, names: tuple[str, ...], layer: int) -> str:
        """The missing tensor's name, in the form the checkpoint's other layers use."""
        used = next((n for n in names for t in self.tensors if t.endswith("." + n)), names[0])
        return f"model.layers.{layer}.{used}"

    def _scale(self, name: str, kv_heads: int, per_head: bool) -> torch.Tensor:
        t = self.tensors[name]
        n = t.numel()
        if not t.is_floating_point():
            raise MoeEngineError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}, expected a float scale; "
                                 "re-download the checkpoint, or load with kv_cache_dtype='auto'")
        if n != 1 and not (per_head and n == kv_heads):
            want = f"one value or one per KV head ({kv_heads})" if per_head else "one value (per-tensor scale)"
            raise MoeEngineError(f"{name} has shape {list(t.shape)}, expected {want}; re-download the checkpoint, "
                                 "or load with kv_cache_dtype='auto'")
        values = t.float().reshape(-1)
        bad = values[~(torch.isfinite(values) & (values > 0))]
        if bad.numel():
            raise MoeEngineError(f"{name} holds {bad[0].item():g}, not a positive finite scale; re-calibrate or "
                                 "re-download the checkpoint, or load with kv_cache_dtype='auto'")
        return values.expand(kv_heads).clone()                                 # [Hkv]


def read_checkpoint_kv_scales(cfg: dict, tensors: dict[str, TensorInfo]) -> CheckpointKVScales | None:
    """The checkpoint's KV scales and scheme (tiny tensors, read now); None when it has neither."""
    names = sorted(n for n in tensors if is_kv_scale_name(n))
    scheme = read_scheme(cfg)
    if not names and scheme is None:
        return None
    values = {}
    for name in names:
        info = tensors[name]
        if math.prod(info.shape) > MAX_VALUES:
            values[name] = torch.empty(info.shape, device="meta")
            continue
        with safe_open(info.file, framework="pt") as f:
            values[name] = f.get_tensor(name)
    return CheckpointKVScales(scheme, values)


def cache_scales(model, kv_cache_dtype: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, str]:
    """(per layer the (keys', values') scales [Hkv] the cache is written with, or None: scales computed per token
    at write; a line saying how the cache is scaled). The checkpoint's scales (model.checkpoint_kv_scales, set by
    the loader) apply when kv_cache_dtype is the cache they were calibrated for, as in vLLM: "auto" keeps the
    model dtype and never turns into fp8 because a checkpoint carries scales."""
    found: CheckpointKVScales | None = getattr(model, "checkpoint_kv_scales", None)
    kind = found.kind if found is not None else None
    if kv_cache_dtype == "auto":
        hint = f" (the checkpoint's {kind} KV scales apply with kv_cache_dtype='{kind}')" if kind else ""
        return None, f"none: the model dtype{hint}"
    computed = ("computed at write per 64 values (int4, with a zero point)" if kv_cache_dtype == "int4"
                else "computed at write per token and KV head")
    layout = model.kv_cache_layout(torch.float32, kv_cache_dtype) if hasattr(model, "kv_cache_layout") else None
    parts = layout.parts if layout is not None else ()
    if found is None:
        return None, computed
    if found.scheme is not None and found.scheme.problem:
        found.layer_scales(0, 1)                     # raises: the scheme is one this engine does not run
    if [p.name for p in parts] != ["k", "v"]:
        return None, f"{computed} (the checkpoint's KV scales are for per-head keys and values; not used here)"
    if kind is None:
        return None, computed
    if kind != kv_cache_dtype:
        return None, f"{computed} (the checkpoint's {kind} scales apply with kv_cache_dtype='{kind}')"
    scales = found.layer_scales(layout.num_layers, parts[0].heads)
    strategy = "per KV head" if found.scheme is not None and found.scheme.strategy == "attn_head" else "per tensor"
    return scales, f"the checkpoint's k_scale / v_scale, {strategy} per layer"
