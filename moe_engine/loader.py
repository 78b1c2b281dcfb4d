"""Build a model from a checkpoint folder: check every tensor name and shape first, then stream weights
one tensor at a time into preallocated parameters (stacking experts; FP8 block-scaled weights kept in FP8
where they fit a quantized weight, dequantised elsewhere; quantized weights filled as they are read)."""

import inspect
import math
import os
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
from moe_engine.quantize import QuantSpec, held_weight, quantize_weights

SCALE_SUFFIX = "_scale_inv"   # FP8 block scales: "<name>.weight_scale_inv" beside "<name>.weight"


def fp8_block_size(cfg: dict) -> tuple[int, int] | None:
    q = cfg.get("quantization_config")
    if not q or mxfp4.is_mxfp4(cfg):
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


def check_checkpoint(model, tensors: dict[str, TensorInfo], block: tuple[int, int] | None) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor, before anything is read."""
    targets = model.checkpoint_targets(tensors)   # the tensor names pick each MoE layer's expert layout
    missing = sorted(set(targets) - set(tensors))
    problems, unexpected = [], []
    for name, info in tensors.items():
        if name in targets:
            param, index = targets[name]
            want = tuple(_dest(model, param, index).shape)
            have = tuple(model.arrange_checkpoint_tensor(name, torch.empty(info.shape, device="meta")).shape)
            if have != want:
                shown = (list(info.shape) if have == tuple(info.shape)
                         else f"{list(info.shape)} (arranged {list(have)})")
                problems.append(f"{name} has shape {shown}, expected {list(want)}")
            if info.dtype.startswith("F8"):
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


def load_model(model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype,
               progress: bool = False, quant: QuantSpec | None = None, **model_kwargs):
    """(model on device in dtype, config dict). Peak memory: the model plus one tensor in float32. quant:
    the weights it selects are held quantized, each quantized as it is read (moe_engine.quantize)."""
    path, cfg = read_config(model_dir)
    args_cls, model_cls = model_family(cfg.get("model_type"))
    try:
        args = args_cls.from_hf_config(cfg)
    except (TypeError, ValueError) as e:
        raise MoeEngineError(f"config.json in {path} has a bad value ({e}); fix config.json") from None
    accepted = inspect.signature(model_cls).parameters
    unknown = sorted(set(model_kwargs) - set(accepted))
    if unknown:
        raise MoeEngineError(f"unknown argument(s) {', '.join(unknown)} for LLM / the {args.model_type} model; "
                             "check the spelling (see help(LLM))")
    files = safetensors_files(path)
    raw = index_tensors(files)
    # MXFP4: each <name>_blocks / <name>_scales pair stands for the tensor <name>.
    tensors = mxfp4.logical_tensors(raw) if mxfp4.is_mxfp4(cfg) else raw
    packed = read_packed(cfg, tensors, files)     # compressed-tensors pack-quantized, else None
    if packed is not None and quant is not None:
        raise MoeEngineError(f"{path} is already quantized (compressed-tensors); load it without quantization=")
    block = fp8_block_size(cfg) if packed is None else None
    try:
        # Quantized, the model is built on the CPU (its empty tensors take no memory until written) and moved
        # once the quantized weights replace theirs: a GPU never holds the full-precision model.
        with torch.device("cpu" if quant is not None or packed is not None or block is not None else device):
            model = model_cls(args, dtype=dtype, **model_kwargs)
    except (TypeError, ValueError, KeyError) as e:
        # Unsupported or malformed values (rope_scaling, scoring_func, n_group, ...) surface while building.
        raise MoeEngineError(f"cannot build the {args.model_type} model from config.json in {path} "
                             f"({type(e).__name__}: {e}); fix config.json") from None
    check_checkpoint(model, packed.tensors if packed else tensors, block)
    targets = model.checkpoint_targets(packed.tensors if packed else tensors)
    kept = block is not None and quant is None      # an FP8 checkpoint loaded as it is: held in FP8
    if quant is not None or packed is not None or kept:
        if quant is not None:
            quantize_weights(model, quant, device)
        elif packed is not None:
            packed.prepare(model, targets, device)
        else:
            keep_fp8(model, targets, tensors, block, SCALE_SUFFIX, device)
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
                    where = device if torch.device(device).type == "cuda" else "cpu"
                    for e, t in mxfp4.read_dequantized(handles, raw, name, dest.dtype, where):
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
    return model, cfg
