"""Tile sizes for the Triton kernels: a small table keyed by device and shape class, with a default heuristic.

Measured tiles for a model's exact expert shape (moe-engine bench tune) take precedence: those in
MOE_SHAPE_TABLE, and before them any in the JSON file named by the MOE_ENGINE_TUNING variable."""

import functools
import json
import os
from dataclasses import dataclass, replace

import torch


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
    by every decode-sized projection, hence cached."""
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


# Untuned starting points for Hopper (H100/H200, 228 KiB shared memory); the gate+up tile holds two
# accumulators, so its block_n is half of what a plain GEMM would take. Tune with moe_engine.bench.kernels.
_HOPPER_MOE = {
    "tiny": MoETuning(16, GemmTile(64, 128, 1, 4, 4), GemmTile(32, 128, 1, 4, 4)),
    "small": MoETuning(32, GemmTile(64, 128, 4, 4, 4), GemmTile(64, 128, 4, 4, 4)),
    "medium": MoETuning(64, GemmTile(128, 64, 8, 4, 4), GemmTile(128, 64, 8, 4, 4)),
    "large": MoETuning(128, GemmTile(128, 64, 8, 8, 3), GemmTile(256, 64, 8, 8, 3)),
}
_DEFAULT_MOE = {
    "tiny": MoETuning(16, GemmTile(64, 64, 1, 4, 3), GemmTile(64, 64, 1, 4, 3)),
    "small": MoETuning(32, GemmTile(64, 64, 4, 4, 3), GemmTile(64, 64, 4, 4, 3)),
    "medium": MoETuning(64, GemmTile(64, 64, 8, 4, 3), GemmTile(128, 32, 8, 4, 3)),
    "large": MoETuning(64, GemmTile(128, 32, 8, 4, 3), GemmTile(128, 32, 8, 4, 3)),
}
# Small tiles under the interpreter so that test shapes still cover several blocks and ragged edges.
_INTERPRETER_MOE = MoETuning(16, GemmTile(16, 16, 2, 1, 1), GemmTile(16, 32, 2, 1, 1), triton_align_max=64)

MOE_TABLE: dict[tuple[str, str], MoETuning] = {
    **{("sm90", c): t for c, t in _HOPPER_MOE.items()},
    **{("interpreter", c): _INTERPRETER_MOE for c in _DEFAULT_MOE},
}

# Decode attention: "gqa" heads up to 256 wide, "mla" the wide latent (kv_lora_rank + rope) rows; "-wide" when
# more than 16 query heads share a KV head, so that a program takes more of them and L2 serves fewer re-reads.
# On an H200 a batch-1 decode split of 256 tokens left 3 programs per KV head, each walking its split
# step by step: 23 us per MLA layer for a 520-token context. Splits of one or two BLOCK_N steps spread it.
DECODE_TABLE: dict[tuple[str, str], DecodeTuning] = {
    ("sm90", "gqa"): DecodeTuning(block_n=64, block_h=16, num_warps=4, num_stages=3, min_split_tokens=64),
    ("sm90", "mla"): DecodeTuning(block_n=32, block_h=16, num_warps=8, num_stages=2, min_split_tokens=32),
    ("sm90", "mla-wide"): DecodeTuning(block_n=16, block_h=32, num_warps=8, num_stages=2, min_split_tokens=32),
    ("interpreter", "gqa"): DecodeTuning(block_n=16, block_h=16, num_warps=1, num_stages=1, min_split_tokens=16),
    ("interpreter", "mla"): DecodeTuning(block_n=16, block_h=16, num_warps=1, num_stages=1, min_split_tokens=16),
}
_DEFAULT_DECODE = {"gqa": DecodeTuning(block_n=64, block_h=16),
                   "mla": DecodeTuning(block_n=32, block_h=16, num_warps=8)}


# Measured for one expert shape: (device, shape class, experts, dim, intermediate) -> tiles. From
# `moe-engine bench tune` on an H200 (2026-11-27, bf16, T = 1/16/64 tokens). Mixtral-8x7B: 190/574/923 us
# (the class default: 189/625/929); DeepSeek-V2-Lite: 57/219/290 us (default 56/221/295): at T = 1 every
# tile tried was within noise, the gain is the down tile at 16-64 tokens.
MOE_SHAPE_TABLE: dict[tuple[str, str, int, int, int], MoETuning] = {
    ("sm90", "tiny", 8, 4096, 14336): MoETuning(16, GemmTile(128, 128, 1, 8, 3), GemmTile(64, 256, 1, 8, 3)),
    ("sm90", "tiny", 64, 2048, 1408): MoETuning(16, GemmTile(32, 256, 1, 4, 3), GemmTile(64, 128, 1, 4, 4)),
}


# Few-token MoE tiles. Each step of a program reads block_n x block_k weights (x2 for gate+up); with bf16
# weights 8-16 KiB a step and a few programs per SM keep enough bytes in flight to stream near the copy
# rate. Hopper's entry is what won for both benchmark shapes (below) and serves other expert shapes at one
# token; other GPUs keep the tiled kernels (max_tokens 0) until `moe-engine bench tune` measures them.
GEMV_TABLE: dict[str, GemvTuning] = {
    "sm90": GemvTuning(GemmTile(8, 512, 1, 4, 2), GemmTile(2, 2048, 1, 8, 1)),
    "interpreter": GemvTuning(GemmTile(16, 32, 1, 1, 1), GemmTile(8, 32, 1, 1, 1)),
}
_DEFAULT_GEMV = GemvTuning(GemmTile(16, 256, 1, 4, 2), GemmTile(8, 256, 1, 4, 2), max_tokens=0)  # unmeasured
# (device, dim, intermediate) -> tiles, from `moe-engine bench tune` on an H200 (2026-11-27, bf16, timed as
# CUDA-graph replays with a cold L2, against the tiled kernels + a separate shared SwiGLU). Mixtral-8x7B:
# 184.8 us at one token (tiled 186.8), two tokens lose (345.8 vs 337.2). DeepSeek-V2-Lite with its two
# shared experts riding along: 54.8 us (tiled 76.6), two tokens 86.5 (101.9), four lose (139.8 vs 137.2).
GEMV_SHAPE_TABLE: dict[tuple[str, int, int], GemvTuning] = {
    ("sm90", 4096, 14336): GemvTuning(GemmTile(8, 512, 1, 4, 2), GemmTile(2, 2048, 1, 8, 1), 1, False),
    ("sm90", 2048, 1408): GemvTuning(GemmTile(8, 512, 1, 4, 2), GemmTile(2, 512, 1, 4, 2), 2, True),
}


# Weights [n, k] of a dtype for which the Triton GEMV won on a device: (device, n, k, dtype) -> tuning.
# From `moe-engine bench tune` on an H200 (2026-11-27; every distinct 2-D weight of the Mixtral-8x7B and
# DeepSeek-V2-Lite shapes, graph replays with a cold L2, against F.linear): the GEMV won each at one row,
# most by 1-2 us (e.g. DeepSeek's stacked q_proj + kv_a 3648x2048: 10.4 vs 11.2 us), the float32 routers
# by 5 us (6.5-7.0 vs 11.6-11.8 us) up to 8 rows; max_tokens is the last row count it still won. A weight
# not listed goes to the vendor library.
_GEMV_2x2048 = GemmTile(2, 2048, 1, 8, 1)
LINEAR_TABLE: dict[tuple[str, int, int, str], LinearTuning] = {
    ("sm90", 8, 4096, "float32"): LinearTuning(GemmTile(1, 4096, 1, 8, 1), 8),      # Mixtral router
    ("sm90", 64, 2048, "float32"): LinearTuning(_GEMV_2x2048, 8),                   # DeepSeek-V2-Lite router
    ("sm90", 4096, 512, "bfloat16"): LinearTuning(GemmTile(4, 1024, 1, 4, 2), 1),
    ("sm90", 2048, 2048, "bfloat16"): LinearTuning(_GEMV_2x2048, 2),                # DeepSeek o_proj
    ("sm90", 2048, 2816, "bfloat16"): LinearTuning(_GEMV_2x2048, 2),                # shared down
    ("sm90", 3648, 2048, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),                # q_proj + kv_a
    ("sm90", 5632, 2048, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),                # shared gate+up
    ("sm90", 4096, 4096, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),                # Mixtral o_proj
    ("sm90", 2048, 10944, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),               # dense layer down
    ("sm90", 6144, 4096, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),                # Mixtral qkv
    ("sm90", 21888, 2048, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),               # dense layer gate+up
    ("sm90", 32000, 4096, "bfloat16"): LinearTuning(_GEMV_2x2048, 1),               # Mixtral lm_head
    ("sm90", 102400, 2048, "bfloat16"): LinearTuning(GemmTile(4, 1024, 1, 4, 2), 1),  # DeepSeek lm_head
}


# MLA's absorbed-query kernel (kernels/triton_mla.py) per (device, heads, nope, latent): the tile is
# [block_k of nope, block_n of the latent] per (token, head) program. It reads each head's w_uk once per
# token where the batched matmul reads it once per batch, so it loses at large batches (decode at 64 on an
# H200: 4,740 against 5,430 tok/s); max_tokens 4 by default. Measured by `bench tune` on an H200
# (2026-11-27, seventh session): block_n 64, block_k 128 takes 7.6 us at one token against 11.9 for
# the batched matmul + rotary + concatenation, and wins up to 8 tokens (15.8 vs 13.7 us at 16); the
# untuned 128x128 tile had taken 9.4 us in the step's profile, this one 3.2.
ABSORB_TABLE: dict[tuple[str, int, int, int], LinearTuning] = {
    ("sm90", 16, 128, 512): LinearTuning(GemmTile(64, 128, 1, 4, 2), 8),   # DeepSeek-V2-Lite
}


def absorb_tuning(device: torch.device, heads: int, nope: int, lora: int) -> LinearTuning:
    key = (device_key(device), heads, nope, lora)
    pow2 = lambda n: 1 << max(0, n - 1).bit_length()   # noqa: E731
    return (from_file(("absorb",) + key) or ABSORB_TABLE.get(key)
            or LinearTuning(GemmTile(min(128, pow2(lora)), min(128, pow2(nope)), 1, 4, 3), 4))


def linear_tuning(device: torch.device, n: int, k: int, dtype: torch.dtype) -> LinearTuning | None:
    """The GEMV's tuning for a weight [n, k]: the tuning file's entry, else LINEAR_TABLE's; None (the
    vendor library) when neither lists it or the file disables "linear"."""
    if not enabled("linear"):
        return None
    key = (device_key(device), n, k, str(dtype).removeprefix("torch."))
    return from_file(("linear",) + key) or LINEAR_TABLE.get(key)


DECODE_KERNELS = ("gemv", "linear", "route", "latent_cache", "absorb_query")


def from_file(key: tuple):
    """The entry under key in the tuning file that MOE_ENGINE_TUNING names (see tuning_file); None without
    one, or where it has none."""
    path = os.environ.get("MOE_ENGINE_TUNING")
    return tuning_file(path).get(key) if path else None


def enabled(kernel: str) -> bool:
    """Whether a kind of decode kernel (one of DECODE_KERNELS) may run: the tuning file (MOE_ENGINE_TUNING)
    turns it off with "disable", for A/B runs against the path without it. The one check at every site."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"{kernel!r} is not one of {', '.join(DECODE_KERNELS)}")
    return kernel not in (from_file(("disable",)) or ())


def disabled(kernel: str) -> bool:
    return not enabled(kernel)


def _half_block_k(tuning):
    """A gate_up/down tuning for 4-byte weights: half the block_k, so the same bytes a step."""
    return replace(tuning, gate_up=replace(tuning.gate_up, block_k=max(16, tuning.gate_up.block_k // 2)),
                   down=replace(tuning.down, block_k=max(16, tuning.down.block_k // 2)))


def gemv_tuning_from_json(entry: dict) -> GemvTuning:
    """{"gate_up": [block_n, block_k, group_m, warps, stages], "down": [...], "max_tokens": 1,
    "stacked_down": false} -> GemvTuning."""
    return GemvTuning(GemmTile(*entry["gate_up"]), GemmTile(*entry["down"]), entry.get("max_tokens", 1),
                      entry.get("stacked_down", False))


def gemv_tuning(device: torch.device, dim: int, inter: int, dtype=torch.bfloat16) -> GemvTuning:
    """Measured tiles for this expert shape (tuning file, then GEMV_SHAPE_TABLE), else the device's;
    4-byte weights get half the block_k."""
    key = device_key(device)
    tuning = (from_file(("gemv", key, dim, inter)) or GEMV_SHAPE_TABLE.get((key, dim, inter))
              or GEMV_TABLE.get(key) or _DEFAULT_GEMV)
    if not enabled("gemv"):
        tuning = replace(tuning, max_tokens=0)
    return _half_block_k(tuning) if dtype.itemsize > 2 else tuning


def moe_tuning_from_json(entry: dict) -> MoETuning:
    """{"block_m": 16, "gate_up": [block_n, block_k, group_m, warps, stages], "down": [...]} -> MoETuning."""
    return MoETuning(entry["block_m"], GemmTile(*entry["gate_up"]), GemmTile(*entry["down"]))


MAX_GEMV_TOKENS = 64     # the few-token kernels put the token on a grid axis limited to 65,535 programs


def _check_tile(tile: GemmTile) -> GemmTile:
    powers = (tile.block_n, tile.block_k, tile.num_warps)
    if not all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in powers):
        raise ValueError(f"block_n, block_k and num_warps must be powers of two, got {tile}")
    if not all(isinstance(v, int) and v >= 0 for v in (tile.group_m, tile.num_stages)):
        raise ValueError(f"group_m and num_stages must be whole numbers, got {tile}")
    return tile


def _check_max_tokens(value) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GEMV_TOKENS):
        raise ValueError(f"max_tokens must be a whole number from 0 to {MAX_GEMV_TOKENS}, got {value!r}")
    return value


def _check_gemv(t: GemvTuning) -> GemvTuning:
    _check_tile(t.gate_up), _check_tile(t.down), _check_max_tokens(t.max_tokens)
    if not isinstance(t.stacked_down, bool):
        raise ValueError(f"stacked_down must be true or false, got {t.stacked_down!r}")
    return t


@functools.cache
def tuning_file(path: str) -> dict[tuple, MoETuning | GemvTuning | LinearTuning | tuple]:
    """The entries of a tuning file written by `moe-engine bench tune` (read once per path, checked): tiled
    MoE keyed (device, shape class, experts, dim, inter), few-token MoE ("gemv", device, dim, inter), GEMV
    ("linear", device, n, k, dtype), absorbed query ("absorb", device, heads, nope, lora), and
    ("disable",): the kinds of decode kernel it turns off."""
    try:
        data = json.loads(open(path).read())
        out = {}
        for e in data["moe"]:
            t = moe_tuning_from_json(e)
            _check_tile(t.gate_up), _check_tile(t.down)
            out[(e["device"], e["shape"], e["experts"], e["dim"], e["inter"])] = t
        for e in data.get("gemv", []):
            out[("gemv", e["device"], e["dim"], e["inter"])] = _check_gemv(gemv_tuning_from_json(e))
        for e in data.get("linear", []):
            t = LinearTuning(_check_tile(GemmTile(*e["tile"])), _check_max_tokens(e["max_tokens"]))
            out[("linear", e["device"], e["n"], e["k"], e["dtype"])] = t
        for e in data.get("absorb", []):
            t = LinearTuning(_check_tile(GemmTile(*e["tile"])), _check_max_tokens(e["max_tokens"]))
            out[("absorb", e["device"], e["heads"], e["nope"], e["lora"])] = t
        off = data.get("disable", [])
        if not (isinstance(off, list) and set(off) <= set(DECODE_KERNELS)):
            raise ValueError(f'"disable" must be a list of {", ".join(DECODE_KERNELS)}; got {off!r}')
        out[("disable",)] = tuple(off)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"MOE_ENGINE_TUNING={path}: not a tuning file from `moe-engine bench tune` ({e})") from None


def moe_tuning(device: torch.device, num_pairs: int, num_experts: int, dtype=torch.bfloat16,
               dim: int = 0, inter: int = 0) -> MoETuning:
    """The table is for 2-byte weights; 4-byte ones get half the block_k, so the same shared memory."""
    shape = moe_shape_class(num_pairs, num_experts)
    key = device_key(device)
    exact = (key, shape, num_experts, dim, inter)
    tuning = from_file(exact) or MOE_SHAPE_TABLE.get(exact) or MOE_TABLE.get((key, shape)) or _DEFAULT_MOE[shape]
    return _half_block_k(tuning) if dtype.itemsize > 2 else tuning


def decode_tuning(device: torch.device, head_dim: int, group: int, dtype=torch.bfloat16) -> DecodeTuning:
    """head_dim: key width; group: query heads per KV head. 4-byte caches get half the block_n."""
    base = "mla" if head_dim > 256 else "gqa"
    key = device_key(device)
    shape = base + "-wide" if group > 16 else base
    tuning = DECODE_TABLE.get((key, shape)) or DECODE_TABLE.get((key, base)) or _DEFAULT_DECODE[base]
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
