"""Tile sizes for the Triton kernels, as data: per-device JSON files (kernels/tuning_data/), read through one lookup.

lookup() takes the first entry found in the file that MOE_ENGINE_TUNING names (`moe-engine bench tune`
writes one), then in the shipped file for this device (kernels/tuning_data/<device_key>.json); the
*_tuning functions fall back to a heuristic default where neither has one. docs/tuning.md gives the
format and how to re-tune."""

import functools
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

SHIPPED = Path(__file__).parent / "tuning_data"


@dataclass(frozen=True)
class GemmTile:
    """One grouped-GEMM launch: the output tile is [block_m (from MoETuning), block_n], reduced over block_k."""
    block_n: int
    block_k: int
    group_m: int = 8          # M blocks that share a column band in launch order, for L2 reuse of weights
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoETuning:
    block_m: int              # rows per block; each expert's rows are padded to a multiple of it
    gate_up: GemmTile         # gate+up tile: block_n columns of gate AND of up (two accumulators)
    down: GemmTile
    triton_align_max: int = 4096   # align in one Triton program up to this many (token, expert) pairs


@dataclass(frozen=True)
class GemvTuning:
    """The few-token MoE (kernels/triton_moe_gemv.py): one program per (row, block_n columns); a tile's
    block_k is how much of each weight row it reads per step. group_m is unused."""
    gate_up: GemmTile
    down: GemmTile
    max_tokens: int = 1       # batches up to this many tokens take it instead of the tiled kernels
    stacked_down: bool = False   # down reads all of a token's experts a step (block_k each), not one by one


@dataclass(frozen=True)
class LinearTuning:
    """A weight [n, k] that the Triton GEMV (kernels/triton_gemv.py) multiplies faster than the vendor
    library for batches up to max_tokens rows; group_m of the tile is unused."""
    tile: GemmTile
    max_tokens: int = 1


@dataclass(frozen=True)
class DecodeTuning:
    block_n: int              # context tokens per inner step
    block_h: int              # query heads of one KV head per program (>= 16 for tl.dot)
    num_warps: int = 4
    num_stages: int = 2
    min_split_tokens: int = 256    # a context split shorter than this costs more in the combine than it saves


@functools.cache
def device_key(device: torch.device) -> str:
    """'sm90', 'sm80', ... for a CUDA device; 'interpreter' for anything else (TRITON_INTERPRET=1). Asked
    by every decode-sized projection, hence cached. Names the shipped tuning file."""
    if device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def moe_shape_class(num_pairs: int, num_experts: int) -> str:
    """By the mean rows per expert that received any: decode-sized up to large prefill batches."""
    rows = num_pairs / max(1, min(num_experts, num_pairs))
    if rows <= 16:
        return "tiny"
    if rows <= 64:
        return "small"
    if rows <= 256:
        return "medium"
    return "large"


# ---- The one lookup ----------------------------------------------------------------------------------------

def lookup(key: str, *keys: tuple):
    """The first entry found under keys (most specific first, each (kind, ...) without the device) for device
    key `key`: the MOE_ENGINE_TUNING file's, else the shipped file's; None where neither has one."""
    path = os.environ.get("MOE_ENGINE_TUNING")
    for table in ((tuning_file(path),) if path else ()) + (shipped(key),):
        for k in keys:
            found = table.get((k[0], key) + k[1:])
            if found is not None:
                return found
    return None


@functools.cache
def shipped(key: str) -> dict[tuple, object]:
    """The entries of kernels/tuning_data/<key>.json ({} for a device without one), read once."""
    path = SHIPPED / f"{key}.json"
    return parse(path.read_text(), str(path), device=key) if path.is_file() else {}


@functools.cache
def tuning_file(path: str) -> dict[tuple, object]:
    """The entries of the tuning file MOE_ENGINE_TUNING names (read once per path, checked)."""
    try:
        text = open(path).read()
    except OSError as e:
        raise TuningFileError(f"MOE_ENGINE_TUNING={path}: not a tuning file from `moe-engine bench tune` "
                              f"({e.strerror}); point it at one, or unset it") from None
    return parse(text, f"MOE_ENGINE_TUNING={path}")


DECODE_KERNELS = ("gemv", "linear", "route", "latent_cache", "absorb_query")


def enabled(kernel: str) -> bool:
    """Whether a kind of decode kernel (one of DECODE_KERNELS) may run: the tuning file (MOE_ENGINE_TUNING)
    turns it off with "disable", for A/B runs against the path without it. The one check at every site."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"{kernel!r} is not one of {', '.join(DECODE_KERNELS)}")
    path = os.environ.get("MOE_ENGINE_TUNING")
    return not path or kernel not in tuning_file(path)[("disable",)]


def disabled(kernel: str) -> bool:
    return not enabled(kernel)


# ---- Heuristic defaults and the lookups of each kernel -------------------------------------------------------

# Where no file has an entry (GPUs not measured): untuned, for 2-byte weights.
_DEFAULT_MOE = {
    "tiny": MoETuning(16, GemmTile(64, 64, 1, 4, 3), GemmTile(64, 64, 1, 4, 3)),
    "small": MoETuning(32, GemmTile(64, 64, 4, 4, 3), GemmTile(64, 64, 4, 4, 3)),
    "medium": MoETuning(64, GemmTile(64, 64, 8, 4, 3), GemmTile(128, 32, 8, 4, 3)),
    "large": MoETuning(64, GemmTile(128, 32, 8, 4, 3), GemmTile(128, 32, 8, 4, 3)),
}
_DEFAULT_GEMV = GemvTuning(GemmTile(16, 256, 1, 4, 2), GemmTile(8, 256, 1, 4, 2), max_tokens=0)  # tiled kernels
_DEFAULT_DECODE = {"gqa": DecodeTuning(block_n=64, block_h=16),
                   "mla": DecodeTuning(block_n=32, block_h=16, num_warps=8)}


def _half_block_k(tuning):
    """A gate_up/down tuning for 4-byte weights: half the block_k, so the same bytes a step."""
    return replace(tuning, gate_up=replace(tuning.gate_up, block_k=max(16, tuning.gate_up.block_k // 2)),
                   down=replace(tuning.down, block_k=max(16, tuning.down.block_k // 2)))


def moe_tuning(device: torch.device, num_pairs: int, num_experts: int, dtype=torch.bfloat16,
               dim: int = 0, inter: int = 0) -> MoETuning:
    """The tiled MoE's tiles: measured for this expert shape, else for its shape class. The files are for
    2-byte weights; 4-byte ones get half the block_k, so the same shared memory."""
    shape = moe_shape_class(num_pairs, num_experts)
    tuning = (lookup(device_key(device), ("moe", shape, num_experts, dim, inter), ("moe", shape))
              or _DEFAULT_MOE[shape])
    return _half_block_k(tuning) if dtype.itemsize > 2 else tuning


def gemv_tuning(device: torch.device, dim: int, inter: int, dtype=torch.bfloat16) -> GemvTuning:
    """The few-token MoE's tiles: measured for this expert shape, else the device's (max_tokens 0, the
    tiled kernels, where neither is known or "disable" lists gemv); 4-byte weights get half the block_k."""
    tuning = lookup(device_key(device), ("gemv", dim, inter), ("gemv",)) or _DEFAULT_GEMV
    if not enabled("gemv"):
        tuning = replace(tuning, max_tokens=0)
    return _half_block_k(tuning) if dtype.itemsize > 2 else tuning


def linear_tuning(device: torch.device, n: int, k: int, dtype: torch.dtype) -> LinearTuning | None:
    """The GEMV's tuning for a weight [n, k]; None (the vendor library) where no file lists it or the
    tuning file disables "linear"."""
    if not enabled("linear"):
        return None
    return lookup(device_key(device), ("linear", n, k, str(dtype).removeprefix("torch.")))


def absorb_tuning(device: torch.device, heads: int, nope: int, lora: int) -> LinearTuning:
    """MLA's absorbed-query kernel for (heads, nope, latent): the tile is [block_n of the latent, block_k of
    nope]; unmeasured, the largest tile up to 128 x 128 and max_tokens 4."""
    pow2 = lambda n: 1 << max(0, n - 1).bit_length()   # noqa: E731
    return (lookup(device_key(device), ("absorb", heads, nope, lora))
            or LinearTuning(GemmTile(min(128, pow2(lora)), min(128, pow2(nope)), 1, 4, 3), 4))


def decode_tuning(device: torch.device, head_dim: int, group: int, dtype=torch.bfloat16) -> DecodeTuning:
    """head_dim: key width ("mla" above 256, else "gqa"); group: query heads per KV head ("-wide" above 16,
    where a program takes more heads). 4-byte caches get half the block_n."""
    base = "mla" if head_dim > 256 else "gqa"
    shape = base + "-wide" if group > 16 else base
    tuning = lookup(device_key(device), ("decode", shape), ("decode", base)) or _DEFAULT_DECODE[base]
    if dtype.itemsize > 2:
        tuning = replace(tuning, block_n=max(16, tuning.block_n // 2))
    return tuning


MAX_DECODE_SPLITS = 32   # the combine kernel holds every split's partial output of a head at once


def decode_splits(num_programs: int, max_context: int, device: torch.device, tuning: DecodeTuning) -> int:
    """Split each context so that about two waves of programs fill the GPU (flash-decoding); never into
    pieces shorter than min_split_tokens of the longest possible context, nor more than MAX_DECODE_SPLITS."""
    want = -(-2 * num_sms(device) // max(1, num_programs))
    most = max(1, -(-max_context // tuning.min_split_tokens))
    return max(1, min(want, most, MAX_DECODE_SPLITS))


# ---- Reading a tuning file ----------------------------------------------------------------------------------

class TuningFileError(ValueError):
    """A tuning file that cannot be read: one line naming the file, the field and what it should be."""


MAX_GEMV_TOKENS = 64     # the few-token kernels put the token on a grid axis limited to 65,535 programs
TILE = "[block_n, block_k, group_m, num_warps, num_stages]"
# Kept beside an entry by `moe-engine bench tune` (or by hand) and ignored: what was measured, and why.
NOTES = ("note", "tokens", "trials", "best_times_s", "previous_times_s", "best_time_s", "versus", "shared")


class _Bad(Exception):
    """Raised inside parse with (where, problem); parse words it as one TuningFileError."""


def _whole(v, where: str, least: int = 0, most: int | None = None, pow2: bool = False) -> int:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= least and (most is None or v <= most)
    if not ok or (pow2 and v & (v - 1)):
        want = (("a whole power of two" + (f" from {least}" if least > 1 else "")) if pow2
                else f"a whole number from {least}" + (f" to {most}" if most else " up"))
        raise _Bad(where, f"want {want}, got {json.dumps(v)}")
    return v


def _tile(v, where: str) -> GemmTile:
    if not (isinstance(v, list) and 2 <= len(v) <= 5):
        raise _Bad(where, f"want {TILE} (2 to 5 whole numbers), got {json.dumps(v)}")
    names = TILE[1:-1].split(", ")
    for i, (name, x) in enumerate(zip(names, v)):
        _whole(x, f"{where}[{i}] ({name})", least=0 if name in ("group_m", "num_stages") else 1,
               pow2=name in ("block_n", "block_k", "num_warps"))
    return GemmTile(*v)


def _flag(v, where: str) -> bool:
    if not isinstance(v, bool):
        raise _Bad(where, f"want true or false, got {json.dumps(v)}")
    return v


def _text(choices):
    def check(v, where):
        if not (isinstance(v, str) and (v in choices if isinstance(choices, tuple) else re.fullmatch(choices, v))):
            want = " or ".join(f'"{c}"' for c in choices) if isinstance(choices, tuple) else "a device key like \"sm90\""
            raise _Bad(where, f"want {want}, got {json.dumps(v)}")
        return v
    return check


_n = lambda **kw: lambda v, where: _whole(v, where, **kw)   # noqa: E731
_tokens = _n(least=0, most=MAX_GEMV_TOKENS)
_SHAPES = ("tiny", "small", "medium", "large")
# Per kernel: field -> (check, required); the key fields in key order, then how an entry becomes a tuning.
_KINDS = {
    "moe": ({"shape": (_text(_SHAPES), True), "experts": (_n(least=1), False), "dim": (_n(least=1), False),
             "inter": (_n(least=1), False), "block_m": (_n(least=1, pow2=True), True), "gate_up": (_tile, True),
             "down": (_tile, True), "triton_align_max": (_n(), False)},
            ("shape", "experts", "dim", "inter"),
            lambda e: MoETuning(e["block_m"], e["gate_up"], e["down"], e.get("triton_align_max", 4096))),
    "gemv": ({"dim": (_n(least=1), False), "inter": (_n(least=1), False), "gate_up": (_tile, True),
              "down": (_tile, True), "max_tokens": (_tokens, False), "stacked_down": (_flag, False)},
             ("dim", "inter"),
             lambda e: GemvTuning(e["gate_up"], e["down"], e.get("max_tokens", 1), e.get("stacked_down", False))),
    "linear": ({"n": (_n(least=1), True), "k": (_n(least=1), True),
                "dtype": (_text(("float32", "bfloat16", "float16")), True), "tile": (_tile, True),
                "max_tokens": (_tokens, True)},
               ("n", "k", "dtype"), lambda e: LinearTuning(e["tile"], e["max_tokens"])),
    "absorb": ({"heads": (_n(least=1), True), "nope": (_n(least=1), True), "lora": (_n(least=1), True),
                "tile": (_tile, True), "max_tokens": (_tokens, True)},
               ("heads", "nope", "lora"), lambda e: LinearTuning(e["tile"], e["max_tokens"])),
    "decode": ({"shape": (_text(("gqa", "gqa-wide", "mla", "mla-wide")), True),
                "block_n": (_n(least=1, pow2=True), True), "block_h": (_n(least=16, pow2=True), True),
                "num_warps": (_n(least=1, pow2=True), False), "num_stages": (_n(least=1), False),
                "min_split_tokens": (_n(least=1), False)},
               ("shape",),
               lambda e: DecodeTuning(**{f: e[f] for f in ("block_n", "block_h", "num_warps", "num_stages",
                                                          "min_split_tokens") if f in e})),
}
# Besides the kernels: "disable", and "device" (the GPU's name, written by bench tune) / "about" (prose).
TOP_LEVEL = tuple(_KINDS) + ("disable", "device", "about")


def _entry(kind: str, e, where: str, device: str | None) -> tuple[tuple, object]:
    fields, key_fields, build = _KINDS[kind]
    if not isinstance(e, dict):
        raise _Bad(where, f"want an object of {', '.join(fields)}, got {json.dumps(e)[:60]}")
    for name in e:
        if name not in fields and name not in NOTES and name != "device":
            raise _Bad(f"{where}.{name}", f"not a field of a {kind} entry (fields: {', '.join(fields)})")
    for name, (check, required) in fields.items():
        if name in e:
            e = {**e, name: check(e[name], f"{where}.{name}")}
        elif required:
            raise _Bad(f"{where}.{name}", "missing")
    if kind in ("moe", "gemv"):           # one expert shape's entry, or the shape class's / device's
        shape = ("experts", "dim", "inter") if kind == "moe" else ("dim", "inter")
        if 0 < sum(f in e for f in shape) < len(shape):
            raise _Bad(where, f"give all of {', '.join(shape)} (one expert shape) or none "
                              f"(the {'shape class' if kind == 'moe' else 'device'}'s default)")
    dev = e.get("device", device)
    if dev is None:
        raise _Bad(f"{where}.device", 'missing: the device key of the GPU it is for, like "sm90"')
    _text(r"sm\d+|interpreter")(dev, f"{where}.device")
    if device is not None and dev != device:
        raise _Bad(f"{where}.device", f"{json.dumps(dev)} in the file for {device}")
    return (kind, dev) + tuple(e[f] for f in key_fields if f in e), build(e)


def parse(text: str, source: str, device: str | None = None) -> dict[tuple, object]:
    """A tuning file's entries keyed (kind, device, key fields...), plus ("disable",): the kinds of decode
    kernel it turns off. device: the shipped file's device key, the default (and only) one of its entries.
    Anything malformed raises TuningFileError: one line naming the source and the field."""
    try:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Bad(f"line {e.lineno} column {e.colno}", f"not JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise _Bad("top level", "want an object of " + ", ".join(TOP_LEVEL))
        unknown = [k for k in data if k not in TOP_LEVEL]
        if unknown:
            raise _Bad(json.dumps(unknown[0]), f"not a kernel of the tuning file (one of {', '.join(TOP_LEVEL)})")
        if not any(k in data for k in tuple(_KINDS) + ("disable",)):
            raise _Bad("top level", f"no entries: give at least one of {', '.join(_KINDS)}, disable")
        out = {}
        for kind in _KINDS:
            entries = data.get(kind, [])
            if not isinstance(entries, list):
                raise _Bad(kind, f"want a list of entries, got {json.dumps(entries)[:60]}")
            for i, e in enumerate(entries):
                key, tuning = _entry(kind, e, f"{kind}[{i}]", device)
                if key in out:
                    raise _Bad(f"{kind}[{i}]", f"a second entry for {key[1:]}")
                out[key] = tuning
        off = data.get("disable", [])
        if not (isinstance(off, list) and set(off) <= set(DECODE_KERNELS)):
            raise _Bad("disable", f"want a list of {', '.join(DECODE_KERNELS)}; got {json.dumps(off)}")
        for name in ("device", "about"):
            if not isinstance(data.get(name, ""), str):
                raise _Bad(name, f"want text, got {json.dumps(data[name])[:60]}")
        out[("disable",)] = tuple(off)
        return out
    except _Bad as e:
        where, problem = e.args
        raise TuningFileError(f"{source}: not a tuning file from `moe-engine bench tune` ({where}: {problem})") from None


def moe_tuning_from_json(entry: dict) -> MoETuning:
    """A "moe" entry ({"block_m": 16, "gate_up": [block_n, block_k, group_m, warps, stages], "down": [...]},
    its device and shape besides) -> MoETuning, checked as in a file."""
    return _from_json("moe", {"shape": "tiny", **entry})


def gemv_tuning_from_json(entry: dict) -> GemvTuning:
    """A "gemv" entry ({"gate_up": [...], "down": [...], "max_tokens": 1, "stacked_down": false}) -> GemvTuning."""
    return _from_json("gemv", entry)


def _from_json(kind: str, entry: dict):
    try:
        return _entry(kind, {"device": "interpreter", **entry}, kind, None)[1]
    except _Bad as e:
        raise TuningFileError(f"a {kind} entry: {e.args[0]}: {e.args[1]}") from None
