"""Build a model from a checkpoint folder: check every tensor name and shape first, then stream weights
one tensor at a time into preallocated parameters (stacking experts; FP8 block-scaled weights kept in FP8
where they fit a quantized weight, dequantised elsewhere; quantized weights filled as they are read)."""

import dataclasses
import inspect
import math
import os
import re
import warnings
from contextlib import ExitStack

import torch
from safetensors import safe_open
from tqdm import tqdm

from model_defs import model_family
from moe_engine import mxfp4
from moe_engine.checkpoint import TensorInfo, index_tensors, read_config, safetensors_files
from moe_engine.compressed_tensors import read_packed
from moe_engine.errors import MoeEngineError
from moe_engine.fp8_checkpoint import keep_fp8, store_fp8
from moe_engine.fp8_scaled import read_scaled_fp8
from moe_engine.gptq_awq import read_gptq_awq
from moe_engine.kv_scales import cache_scales, is_kv_scale_name, kv_cache_only, read_checkpoint_kv_scales
from moe_engine.preflight import available_bytes, check_memory
from moe_engine.quantize import QuantSpec, held_weight, quantize_weights

SCALE_SUFFIX = "_scale_inv"   # FP8 block scales: "<name>.weight_scale_inv" beside "<name>.weight"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}     # safetensors dtype names
HALF_NAMES = {"bfloat16": "BF16", "float16": "F16"}     # config.json torch_dtype -> safetensors name
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def fp8_block_size(cfg: dict) -> tuple[int, int] | None:
    q = cfg.get("quantization_config")
    if not q or mxfp4.is_mxfp4(cfg) or isinstance(q, dict) and kv_cache_only(q):
        return None
    if q.get("quant_method") != "fp8":
        raise MoeEngineError(f"quantization method {q.get('quant_method')!r} is not supported (only fp8 "
                             "block-scaled, and mxfp4); use an unquantised, fp8 or mxfp4 checkpoint")
    block = q.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [N, K] float8 with one scale per block [ceil(N/bn), ceil(K/bk)] -> float32 [N, K]."""
    N, K = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return w.float() * s


def _dtype_problem(name: str, info: TensorInfo, dest: torch.Tensor, cfg: dict) -> str | None:
    """A float weight stored as an integer type, or as the other 16-bit float than config.json declares:
    the same bytes read as another type give a wrong model without an error."""
    if not dest.is_floating_point():
        return None            # an integer destination (a quantized form) takes what its translator gives
    quant = cfg.get("quantization_config")
    if info.dtype not in FLOAT_DTYPES:
        if isinstance(quant, dict) and quant.get("quant_method") not in (None, "fp8") and not kv_cache_only(quant):
            return None        # packed integer weights of a quantized format
        return f"{name} has dtype {info.dtype}, expected a float type (this weight is not quantized)"
    declared = HALF_NAMES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")))
    if declared and info.dtype in HALF_NAMES.values() and info.dtype != declared:
        return (f"{name} has dtype {info.dtype} but config.json declares torch_dtype "
                f"{cfg.get('torch_dtype') or cfg.get('dtype')}")
    return None


def check_checkpoint(model, tensors: dict[str, TensorInfo], block: tuple[int, int] | None,
                     cfg: dict | None = None, held=None) -> None:
    """One error naming every missing, unexpected, mis-shaped and mis-typed tensor, before anything is read.
    held: the checkpoint translator's holds(name), for fp8 weights whose scales it has checked itself."""
    targets = model.checkpoint_targets(tensors)   # the tensor names pick each MoE layer's expert layout
    missing = sorted(set(targets) - set(tensors))
    problems, unexpected = [], []
    for name, info in tensors.items():
        if name in targets:
            param, index = targets[name]
            dest = _dest(model, param, index)
            want = tuple(dest.shape)
            have = tuple(model.arrange_checkpoint_tensor(name, torch.empty(info.shape, device="meta")).shape)
            if have != want:
                shown = (list(info.shape) if have == tuple(info.shape)
                         else f"{list(info.shape)} (arranged {list(have)})")
                problems.append(f"{name} has shape {shown}, expected {list(want)}")
            typed = _dtype_problem(name, info, dest, cfg or {})
            if typed:
                problems.append(typed)
            if info.dtype.startswith("F8") and not (held and held(name)):
                scale = tensors.get(name + SCALE_SUFFIX)
                if block is None:
                    problems.append(f"{name} is fp8 but config.json has no fp8 quantization_config")
                elif scale is None:
                    problems.append(f"{name} is fp8 but its scale {name + SCALE_SUFFIX} is missing")
                elif len(want) == 2 and scale.shape != (math.ceil(want[0] / block[0]), math.ceil(want[1] / block[1])):
                    problems.append(f"{name + SCALE_SUFFIX} has shape {list(scale.shape)}, expected "
                                    f"{[math.ceil(want[0] / block[0]), math.ceil(want[1] / block[1])]}")
        elif name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in tensors:
            continue
        elif is_kv_scale_name(name):
            continue   # KV-cache scales: read apart (moe_engine.kv_scales), used only by a cache they fit
        elif 0 in info.shape:
            continue   # empty tensors (e.g. transformers' zero-width shared experts) carry nothing
        elif not model.ignored_checkpoint_name(name):
            unexpected.append(name)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {', '.join(sorted(unexpected)[:8])}"
                     f"{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        parts.append(f"wrong {len(problems)}: {'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}")
    if parts:
        raise MoeEngineError(f"checkpoint does not match its config.json ({model.args.model_type}): "
                             f"{' | '.join(parts)}; re-download the checkpoint or fix config.json")


def _dest(model, param: str, index) -> torch.Tensor:
    t = held_weight(model, param)        # a parameter, or a QuantizedWeight that quantizes what it is given
    return t if index is None else t[index]


def check_layers(args, cfg: dict, tensors: dict[str, TensorInfo], path) -> None:
    """The checkpoint's decoder layers against num_hidden_layers, from the names alone (so a config claiming
    a million layers fails at once): none missing, none beyond, except multi-token-prediction layers
    (DeepSeek's num_nextn_predict_layers, which inference does not use)."""
    n, extra = args.num_hidden_layers, cfg.get("num_nextn_predict_layers") or 0
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise MoeEngineError(f"config.json in {path} has a bad value (num_nextn_predict_layers={extra!r} must be "
                             "an integer >= 0); fix config.json")
    first: dict[int, str] = {}
    for name in tensors:
        m = _LAYER.match(name)
        if m:
            first.setdefault(int(m[1]), name)
    if not first:
        return
    beyond = sorted(i for i in first if i >= n + extra)
    if beyond:
        raise MoeEngineError(f"checkpoint tensor {first[beyond[0]]} belongs to layer {beyond[0]}, but config.json "
                             f"in {path} has num_hidden_layers={n}"
                             f"{f' (+{extra} num_nextn_predict_layers)' if extra else ''}; fix num_hidden_layers "
                             "or use the config.json that came with these weights")
    absent = next((i for i in range(n) if i not in first), n)
    if absent < n:
        held = sum(1 for i in first if i < n)
        raise MoeEngineError(f"config.json in {path} has num_hidden_layers={n} but the checkpoint holds tensors "
                             f"for {held} layer(s) (none for layer {absent}); fix num_hidden_layers or finish "
                             "the download")


def _same_values(a: TensorInfo, b: TensorInfo, a_name: str, b_name: str, rows: int = 4096) -> bool:
    if a.shape != b.shape:
        return False
    with safe_open(a.file, framework="pt") as fa, safe_open(b.file, framework="pt") as fb:
        sa, sb = fa.get_slice(a_name), fb.get_slice(b_name)
        for start in range(0, a.shape[0] if a.shape else 1, rows):   # row chunks: two embeddings never whole
            if not torch.equal(sa[start:start + rows].float(), sb[start:start + rows].float()):
                return False
    return True


def untie_separate_head(args, tensors: dict[str, TensorInfo], path):
    """As transformers 5 does: a config that ties the embeddings while the checkpoint holds its own,
    different lm_head.weight is wrong about the checkpoint, so the head is loaded untied (with a warning)."""
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if not getattr(args, "tie_word_embeddings", False) or head not in tensors or embed not in tensors:
        return args
    if _same_values(tensors[head], tensors[embed], head, embed):
        return args
    warnings.warn(f"config.json in {path} ties the embeddings (tie_word_embeddings: true) but the checkpoint "
                  f"holds its own, different {head}: loading it as an untied LM head, as transformers does; "
                  "set tie_word_embeddings to false in config.json to silence this", stacklevel=3)
    return dataclasses.replace(args, tie_word_embeddings=False)


def _build(model_cls, args, dtype, device, path, model_kwargs):
    try:
        with torch.device(device):
            return model_cls(args, dtype=dtype, **model_kwargs)
    except (TypeError, ValueError, KeyError) as e:
        # Unsupported or malformed values (rope_scaling, scoring_func, n_group, ...) surface while building.
        raise MoeEngineError(f"cannot build the {args.model_type} model from config.json in {path} "
                             f"({type(e).__name__}: {e}); fix config.json") from None


class _Holding:
    """Which weights are held quantized, and how: quantized at load (quant), a compressed-tensors checkpoint
    (packed), an FP8 block-scaled checkpoint kept in FP8 (block without quant), or an MXFP4 checkpoint's
    experts kept in MXFP4 (kept_mxfp4 without quant)."""

    def __init__(self, quant, packed, block, tensors, raw, kept_mxfp4: bool):
        self.quant, self.packed, self.block, self.tensors, self.raw = quant, packed, block, tensors, raw
        self.kept_mxfp4 = kept_mxfp4 and quant is None and packed is None
        self.mxfp4_orders: dict[str, torch.Tensor] = {}     # checkpoint name -> its row order, once kept
        self.active = quant is not None or packed is not None or block is not None or self.kept_mxfp4
        self.label = (quant.format if quant is not None else getattr(packed, "label", "compressed-tensors")
                      if packed is not None
                      else "fp8" if block is not None
                      else "mxfp4" if self.kept_mxfp4 else None)   # how the quantized weights are held

    def apply(self, model, targets: dict, where, device) -> None:
        """Swap the quantized weights in on `where` (the meta device for the preflight); device: the one
        the model will run on (MPS keeps no FP8)."""
        if self.quant is not None:
            quantize_weights(model, self.quant, where)
        elif self.packed is not None and not (getattr(self.packed, "holds_float8", False)
                                              and torch.device(device).type == "mps"):
            self.packed.prepare(model, targets, where)     # (MPS has no float8: those fp8 weights are dequantised)
        elif self.block is not None and torch.device(device).type != "mps":
            keep_fp8(model, targets, self.tensors, self.block, SCALE_SUFFIX, where)
        elif self.kept_mxfp4 and torch.device(device).type != "mps":
            self.mxfp4_orders = mxfp4.keep_mxfp4(model, targets, self.raw, self.tensors, where, self.mxfp4_orders)


def load_model(model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype,
               progress: bool = False, quant: QuantSpec | None = None, engine=None, **model_kwargs):
    """(model on device in dtype, config dict). Peak memory: the model plus one tensor in float32. quant:
    the weights it selects are held quantized, each quantized as it is read (moe_engine.quantize).
    engine: the EngineConfig the model will run under, for the memory preflight's KV cache (None: weights)."""
    path, cfg = read_config(model_dir)
    args_cls, model_cls = model_family(cfg.get("model_type"))
    try:
        args = args_cls.from_hf_config(cfg)
    except (TypeError, ValueError) as e:
        raise MoeEngineError(f"config.json in {path} has a bad value ({type(e).__name__}: {e}); "
                             "fix config.json") from None
    accepted = inspect.signature(model_cls).parameters
    unknown = sorted(set(model_kwargs) - set(accepted))
    if unknown:
        raise MoeEngineError(f"unknown argument(s) {', '.join(unknown)} for LLM / the {args.model_type} model; "
                             "check the spelling (see help(LLM))")
    files = safetensors_files(path)
    raw = index_tensors(files)
    # MXFP4: each <name>_blocks / <name>_scales pair stands for the tensor <name>.
    tensors = mxfp4.logical_tensors(raw) if mxfp4.is_mxfp4(cfg) else raw
    # FP8 per tensor/channel, compressed-tensors pack-quantized, GPTQ or AWQ, else None
    packed = read_scaled_fp8(cfg, tensors) or read_packed(cfg, tensors, files) or read_gptq_awq(cfg, tensors, files)
    if packed is not None and quant is not None:
        raise MoeEngineError(f"{path} is already quantized ({getattr(packed, 'label', 'compressed-tensors')}); "
                             "load it without quantization=")
    block = fp8_block_size(cfg) if packed is None else None
    logical = packed.tensors if packed else tensors
    check_layers(args, cfg, logical, path)
    args = untie_separate_head(args, logical, path)
    held = _Holding(quant, packed, block, tensors, raw, mxfp4.is_mxfp4(cfg))
    # Everything is checked on a meta-device model (shapes, no memory) before the real one is allocated; the
    # memory preflight counts the weights as they will be held (quantized ones in their quantized form).
    shape_model = _build(model_cls, args, dtype, "meta", path, model_kwargs)
    check_checkpoint(shape_model, logical, block, cfg, packed.holds if packed is not None else None)
    kv_scales = read_checkpoint_kv_scales(cfg, logical)
    if engine is not None:          # scales that do not fit the cache asked for fail now, before the weights load
        shape_model.checkpoint_kv_scales = kv_scales
        cache_scales(shape_model, engine.kv_cache_dtype)
    largest = max((math.prod(t.shape) for t in tensors.values()), default=0)
    held.apply(shape_model, shape_model.checkpoint_targets(logical), "meta", device)
    check_memory(shape_model, torch.device(device), dtype, engine, largest, available_bytes(torch.device(device)),
                 held.label)
    del shape_model
    # Quantized, the model is built on the CPU (its empty tensors take no memory until written) and moved
    # once the quantized weights replace theirs: a GPU never holds the full-precision model.
    model = _build(model_cls, args, dtype, "cpu" if held.active else device, path, model_kwargs)
    targets = model.checkpoint_targets(logical)
    if held.active:
        held.apply(model, targets, device, device)
        model.to(device)
    bar = tqdm(total=len(targets), desc=f"loading {path.name}", unit="tensor", disable=not progress,
               leave=False)
    with torch.no_grad(), ExitStack() as stack:
        # Every shard opened once (memory-mapped); tensors are read one at a time in file order.
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}
        for f, st in handles.items():
            for name in st.keys():
                base = name.removesuffix(mxfp4.BLOCKS)
                if base != name and base in tensors and tensors[base].dtype == "MXFP4":
                    name = base
                    dest = _dest(model, *targets[name])
                    if name in held.mxfp4_orders:          # kept in 4 bits: the bytes as stored
                        mxfp4.store_kept(handles, raw, name, dest, held.mxfp4_orders[name])
                        bar.update()
                        continue
                    where = device if torch.device(device).type == "cuda" else "cpu"
                    # A weight quantized at load (quantization=) quantizes from float32 values.
                    wide = dest.dtype if isinstance(dest, torch.Tensor) else torch.float32
                    for e, t in mxfp4.read_dequantized(handles, raw, name, wide, where):
                        dest[e].copy_(model.arrange_checkpoint_tensor(name, t))
                    bar.update()
                    continue
                name = name if packed is None else packed.logical_name(name)   # X.weight_packed -> X.weight
                if name not in targets:
                    continue
                if packed is not None and packed.holds(name):
                    packed.write(name, handles, tensors, _dest(model, *targets[name]))
                    bar.update()
                    continue
                t = st.get_tensor(name)
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    scale_name = name + SCALE_SUFFIX
                    scale = handles[tensors[scale_name].file].get_tensor(scale_name)
                    if store_fp8(_dest(model, *targets[name]), t, scale):
                        bar.update()
                        continue
                    # On CUDA dequantise on the card (far faster); MPS has no float8, so the CPU does it.
                    where = device if torch.device(device).type == "cuda" else "cpu"
                    t = dequantize_fp8(t.to(where), scale.to(where), block)
                _dest(model, *targets[name]).copy_(model.arrange_checkpoint_tensor(name, t))
                bar.update()
    bar.close()
    model.post_load()
    model.eval()
    model.checkpoint_kv_scales = kv_scales
    return model, cfg
