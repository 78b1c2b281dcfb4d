"""compressed-tensors "pack-quantized" checkpoints (W4A16 / W8A16): read into kernels.quant.QuantizedWeight,
and written from a model quantized at load (`moe-engine quantize`).

The layout (compressed_tensors.compressors.pack_quantized): for a Linear `X`, `X.weight_packed` int32
[N, ceil(K * bits / 32)] holds the signed values q + 2^(bits-1), element k at bits k*bits of the row's bit
stream (little-endian words); `X.weight_scale` [N, K / group] (group) or [N, 1] (channel); asymmetric:
`X.weight_zero_point` packed the same way along the rows, int32 [ceil(N * bits / 32), K / group];
`X.weight_shape` [2] = (N, K). weight = (q - zero) * scale.

Activation ordering (weights args `actorder`): "weight" ("static") reorders columns only while GPTQ runs and
stores the usual layout; "group" ("dynamic", or true) adds `X.weight_g_idx` int32 [K], input k's group, so
weight[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] with g = g_idx[k] (moe_engine.group_index: held exactly
when the groups are permuted whole, dequantised at load when they interleave along K; a g_idx of all -1 is
compressed-tensors' "not set", column order)."""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.quant import QuantizedSlot, QuantizedWeight, dequantize_values, pack_int4
from moe_engine.checkpoint import TensorInfo
from moe_engine.errors import MoeEngineError
from moe_engine.group_index import (GroupOrder, check_group_index, dequantize_by_index, read_group_index,
                                    warn_dequantized)
from moe_engine.kv_scales import kv_cache_only
from moe_engine.quantize import QuantSpec, held_weight, keep_quantized

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
SCALE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SHARD_BYTES = 2 << 30
ACTORDERS = (None, False, True, "group", "weight", "dynamic", "static")   # dynamic = group, static = weight


@dataclass(frozen=True)
class IntScheme:
    """One config group's weight quantization: bits 4 or 8, group size (None: per output channel)."""
    bits: int
    group: int | None
    symmetric: bool

    def block(self, K: int) -> tuple[int, int]:
        return (1, self.group or K)

    @property
    def format(self) -> str:
        return f"int{self.bits}"


def _schemes(q: dict) -> list[tuple[list[str], dict]]:
    """(targets, weights args) per config group, the format checked (pack-quantized only)."""
    top = q.get("format")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise MoeEngineError("compressed-tensors quantization_config has no config_groups; re-download config.json")
    out = []
    for gname, g in groups.items():
        fmt = (g or {}).get("format") or top
        if fmt != "pack-quantized":
            raise MoeEngineError(f"compressed-tensors format {fmt!r} (config group {gname}) is not supported: "
                                 "pack-quantized int4/int8 (W4A16, W8A16) or float-quantized fp8 load, not mixed")
        if g.get("input_activations") or g.get("output_activations"):
            raise MoeEngineError(f"compressed-tensors config group {gname} quantizes activations; only weight-only "
                                 "schemes (W4A16, W8A16) load")
        out.append((list(g.get("targets") or []), g.get("weights") or {}))
    return out


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", module) or module.endswith("." + target)


def _scheme_for(module: str, groups) -> IntScheme:
    for targets, w in groups:
        if any(_matches(t, module) for t in targets):
            bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
            if kind != "int" or bits not in (4, 8):
                raise MoeEngineError(f"{module}: {bits}-bit {kind} weights are not supported by the pack-quantized "
                                     "loader (int, 4 or 8 bits)")
            if strategy not in ("group", "channel"):
                raise MoeEngineError(f"{module}: quantization strategy {strategy!r} is not supported (group, channel)")
            actorder = w.get("actorder")
            if (actorder.lower() if isinstance(actorder, str) else actorder) not in ACTORDERS:
                raise MoeEngineError(f"{module}: actorder {actorder!r} is not known (group, weight or null); "
                                     "fix config.json")
            group = w.get("group_size") if strategy == "group" else None
            if strategy == "group" and (not isinstance(group, int) or group < 1):
                raise MoeEngineError(f"{module}: group strategy without a valid group_size ({group!r}); fix config.json")
            return IntScheme(bits, group, bool(w.get("symmetric", True)))
    raise MoeEngineError(f"{module}.weight_packed is not targeted by any config group of quantization_config; "
                         "fix config.json")


class PackedCheckpoint:
    """A pack-quantized checkpoint's tensors as the loader sees them: `X.weight` for every packed Linear X,
    with its logical shape; the packed parts are read together when X.weight is."""

    def __init__(self, q: dict, tensors: dict[str, TensorInfo], handles):
        groups = _schemes(q)
        self.schemes: dict[str, IntScheme] = {}
        self.scale_dtypes: dict[str, torch.dtype] = {}
        self.group_order: dict[str, GroupOrder] = {}
        self.dequantized: set[str] = set()              # activation-ordered, interleaved: held in full precision
        self.tensors = {n: t for n, t in tensors.items() if not n.endswith(tuple("." + p for p in PARTS))}
        problems = []
        for name in sorted(tensors):
            if not name.endswith(".weight_packed"):
                continue
            module = name.removesuffix(".weight_packed")
            scheme = _scheme_for(module, groups)
            problem = self._check(module, scheme, tensors, handles)
            if problem:
                problems.append(problem)
                continue
            self.schemes[module] = scheme
            self.scale_dtypes[module] = SCALE_DTYPES[tensors[module + ".weight_scale"].dtype]
            self.tensors[module + ".weight"] = TensorInfo(tensors[name].file, self._shape(module, tensors, handles),
                                                          f"I{scheme.bits}")
        orphans = sorted(n for n in tensors if n.endswith(tuple("." + p for p in PARTS))
                         and n.rsplit(".", 1)[0] + ".weight_packed" not in tensors)
        problems += [f"{n} has no {n.rsplit('.', 1)[0]}.weight_packed" for n in orphans[:3]]
        if problems:
            raise MoeEngineError(f"pack-quantized checkpoint is inconsistent: {'; '.join(problems[:6])}"
                                 f"{' ...' if len(problems) > 6 else ''}; re-download or re-quantize it")
        warn_dequantized("compressed-tensors actorder", "weight_g_idx", self.dequantized, len(self.schemes))

    @staticmethod
    def _shape(module, tensors, handles) -> tuple[int, int]:
        info = tensors[module + ".weight_shape"]
        return tuple(int(v) for v in handles[info.file].get_tensor(module + ".weight_shape").tolist())

    def _check(self, module: str, s: IntScheme, tensors, handles) -> str | None:
        """One line naming the tensor and what is wrong with it, or None (the layer's group order recorded)."""
        packed = tensors[module + ".weight_packed"]
        if packed.dtype != "I32":
            return f"{module}.weight_packed is {packed.dtype}, expected I32"
        if module + ".weight_shape" not in tensors:
            return f"{module}.weight_shape is missing"
        shape = self._shape(module, tensors, handles)
        if len(shape) != 2 or len(packed.shape) != 2:
            return f"{module}.weight_shape {list(shape)} / weight_packed {list(packed.shape)}: expected 2-d"
        N, K = shape
        words = -(-K * s.bits // 32)
        if packed.shape != (N, words):
            return f"{module}.weight_packed has shape {list(packed.shape)}, expected {[N, words]} for {[N, K]}"
        if s.group is not None and K % s.group:
            return f"{module}.weight: group size {s.group} does not divide the input width {K}"
        if (K * s.bits) % 32:
            return f"{module}.weight: input width {K} does not fill whole int32 words at {s.bits} bits"
        scale = tensors.get(module + ".weight_scale")
        G = K // s.group if s.group else 1
        if scale is None:
            return f"{module}.weight_scale is missing"
        if scale.shape != (N, G) or scale.dtype not in SCALE_DTYPES:
            return f"{module}.weight_scale is {scale.dtype} {list(scale.shape)}, expected a float {[N, G]}"
        zero = tensors.get(module + ".weight_zero_point")
        if not s.symmetric:
            want = (-(-N * s.bits // 32), G)
            if zero is None:
                return f"{module}.weight_zero_point is missing (the scheme is asymmetric)"
            if zero.shape != want or zero.dtype != "I32":
                return f"{module}.weight_zero_point is {zero.dtype} {list(zero.shape)}, expected I32 {list(want)}"
        order = check_group_index(module + ".weight_g_idx", tensors.get(module + ".weight_g_idx"), handles, K,
                                  s.group or K, unset_in_order=True)
        if isinstance(order, str):
            return order
        self.group_order[module] = order
        if order.interleaved:
            self.dequantized.add(module)
        return None

    def holds(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.schemes

    def logical_name(self, name: str) -> str | None:
        """A stored tensor's name as the loader's targets know it: X.weight_packed -> X.weight; the other
        packed parts -> None (read with their weight)."""
        if name.endswith(".weight_packed"):
            return name.removesuffix("_packed")
        return None if name.endswith(tuple("." + p for p in PARTS)) else name

    def prepare(self, model, targets: dict, device) -> list[str]:
        """Replace each quantizable weight whose checkpoint tensors are all packed with one scheme (and none
        with interleaved groups) by a QuantizedWeight of that scheme (the rest stay full precision and get
        dequantised values)."""
        def choose(p, parts):
            modules = [n.removesuffix(".weight") for n, _ in parts]
            schemes = {self.schemes.get(m) for m in modules}
            if len(schemes) != 1 or None in schemes or any(m in self.dequantized for m in modules):
                return None
            (s,) = schemes
            return QuantizedWeight(s.format, p.shape, s.block(p.shape[-1]), not s.symmetric,
                                   self.scale_dtypes[modules[0]], device)

        return keep_quantized(model, targets, choose)

    def write(self, name: str, handles, tensors: dict[str, TensorInfo], dest) -> None:
        """Read X.weight's packed parts and store them in dest: a QuantizedWeight (slot) of the same scheme
        takes the values (the groups in our order); a full-precision destination gets them dequantised."""
        module = name.removesuffix(".weight")
        s = self.schemes[module]

        def get(part):
            return handles[tensors[f"{module}.{part}"].file].get_tensor(f"{module}.{part}")

        N, K = self.tensors[name].shape
        q = unpack_int32(get("weight_packed"), s.bits, K)                           # [N, K] int8
        scale = get("weight_scale")                                                  # [N, G]
        zero = None if s.symmetric else unpack_int32(get("weight_zero_point").t(), s.bits, N).t()  # [N, G]
        if isinstance(dest, QuantizedWeight):
            dest = dest[()]                      # the whole weight, as a slot
        order = self.group_order[module]
        if isinstance(dest, QuantizedSlot):
            dest.store_quantized(q, *order.reorder(scale, zero))
        elif order.interleaved:
            g_idx = read_group_index(f"{module}.weight_g_idx", tensors[f"{module}.weight_g_idx"], handles)  # [K]
            dest.copy_(dequantize_by_index(q, scale, zero, g_idx))
        else:
            dest.copy_(dequantize_values(q, *order.reorder(scale, zero), s.block(K)))


def read_packed(cfg: dict, tensors: dict[str, TensorInfo], files) -> PackedCheckpoint | None:
    """The checkpoint's pack-quantized view when config.json says compressed-tensors, else None."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors" or kv_cache_only(q):
        return None                  # (a KV-cache-only config: the weights are dense; moe_engine.kv_scales)
    return PackedCheckpoint(q, tensors, {f: safe_open(f, framework="pt") for f in files})


# -- packing --------------------------------------------------------------------------------------------------

def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 [R, W] -> signed int8 [R, cols]: element k at bits k*bits of each row (4 or 8 bits)."""
    b = packed.contiguous().view(torch.uint8)                                         # [R, 4W], little-endian
    if bits == 8:
        return (b.to(torch.int16) - 128).to(torch.int8)[:, :cols]
    u = torch.stack((b & 0xF, b >> 4), -1).flatten(-2)                                # [R, 8W]
    return (u.to(torch.int8) - 8)[:, :cols]


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """signed int8 [R, C] -> int32 [R, ceil(C * bits / 32)] (compressed-tensors' pack_to_int32, dim 1)."""
    per_word = 32 // bits
    q = torch.nn.functional.pad(q, (0, -q.shape[1] % per_word))
    b = pack_int4(q) if bits == 4 else (q.to(torch.int16) + 128).to(torch.uint8)
    # Fresh row-major bytes: .contiguous() keeps any stride on a size-1 dimension (a [1, N] zero-point row of
    # an asymmetric weight with one group per row came out with stride 1, which view refuses).
    return b.new_empty(b.shape).copy_(b).view(torch.int32)


# -- writing --------------------------------------------------------------------------------------------------

def write_packed(src: Path, out: Path, model, targets: dict, tensors: dict[str, TensorInfo], cfg: dict,
                 spec: QuantSpec) -> dict:
    """Write `model` (loaded from src with `spec`) to the folder `out` in pack-quantized form: quantized
    weights packed under their checkpoint names, every other tensor copied from src as it is stored,
    config.json with its quantization_config, and the tokenizer and other files alongside. Returns counts."""
    if spec.format not in ("int4", "int8"):
        raise MoeEngineError(f"moe-engine quantize writes int4 or int8 (pack-quantized), not {spec.method}")
    bits = 4 if spec.format == "int4" else 8
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    quantized, ignore = 0, []

    def put(name, t):
        nonlocal current, size
        current[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0

    files = sorted({info.file for info in tensors.values()})
    handles = {f: safe_open(f, framework="pt") for f in files}
    for name, info in tensors.items():
        target = targets.get(name)
        held = held_weight(model, target[0]) if target else None
        if isinstance(held, QuantizedWeight):
            module = name.removesuffix(".weight")
            q, scale, zero = (held if target[1] is None else held[target[1]]).values()
            if q.dim() != 2:
                raise MoeEngineError(f"{name}: stacked {q.dim()}-d weights have no pack-quantized form; "
                                     "re-save the source with one tensor per expert")
            put(f"{module}.weight_packed", pack_int32(q.cpu(), bits))
            put(f"{module}.weight_scale", scale.cpu())
            put(f"{module}.weight_shape", torch.tensor(list(q.shape)))
            if zero is not None:
                put(f"{module}.weight_zero_point", pack_int32(zero.cpu().t().contiguous(), bits).t())
            quantized += 1
        else:
            t = handles[info.file].get_tensor(name)
            if t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "norm" not in name:
                ignore.append(name.removesuffix(".weight"))
            put(name, t)
    if current or not shards:
        shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        save_file(shard, out / fname, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {n: fname for fname, shard in zip(names, shards) for n in shard}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    source = cfg.get("quantization_config")
    cfg = dict(cfg)
    cfg["quantization_config"] = quantization_config(bits, spec, sorted(ignore))
    if isinstance(source, dict):      # the KV scales are copied as they are: so is what they are for
        cfg["quantization_config"]["kv_cache_scheme"] = source.get("kv_cache_scheme")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"quantized": quantized, "kept": len(tensors) - quantized, "files": len(names)}


def quantization_config(bits: int, spec: QuantSpec, ignore: list[str]) -> dict:
    """config.json's quantization_config for one weight-only scheme over every Linear not in ignore."""
    group = spec.group_size if bits == 4 else None
    weights = {"num_bits": bits, "type": "int", "symmetric": spec.symmetric,
               "strategy": "group" if group else "channel", "group_size": group, "dynamic": False,
               "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}}
