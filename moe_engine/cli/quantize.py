"""`moe-engine quantize`: write a model's weights quantized, as a compressed-tensors pack-quantized folder."""

import sys
from pathlib import Path

import torch

from moe_engine.errors import MoeEngineError


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="a UTF-8 text (e.g. examples/calibration.txt): quantize the experts by GPTQ on the "
                             "tokens routed to each (experts with too few tokens keep the clip search)")


def run(args) -> int:
    from moe_engine.checkpoint import index_tensors, safetensors_files
    from moe_engine.cli import quant_settings, resolve_model, show_progress
    from moe_engine.compressed_tensors import write_packed
    from moe_engine.config import EngineConfig
    from moe_engine.loader import load_model
    if args.quantization is None:
        raise MoeEngineError("moe-engine quantize needs --quantization int4 or int8 (e.g. --quantization int4 "
                             "--group-size 128)")
    spec = EngineConfig(**quant_settings(args)).quant_spec()
    if spec.format not in ("int4", "int8"):
        raise MoeEngineError(f"moe-engine quantize writes int4 or int8 (compressed-tensors pack-quantized), not "
                             f"{spec.method}; use --quantization int4 or int8")
    if spec.quantize_lm_head and spec.format == "int4":
        raise MoeEngineError("--quantize-lm-head holds the head in int8, and a pack-quantized folder holds one "
                             "scheme; drop --quantize-lm-head (it can be asked for when loading) or use int8")
    src, out = resolve_model(args.model), Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeEngineError(f"{out} already exists and is not an empty folder; choose a new --out folder")
    if out.resolve() == src.resolve():
        raise MoeEngineError("--out must differ from --model; choose a new folder")
    if args.calibration is None:
        model, cfg = load_model(src, torch.device("cpu"), torch.float32, show_progress(args), quant=spec)
    else:
        model, cfg = calibrated_model(src, args, spec)
    tensors = index_tensors(safetensors_files(src))
    counts = write_packed(src, out, model, model.checkpoint_targets(tensors), tensors, cfg, spec)
    if not args.quiet:
        print(f"wrote {out}: {counts['quantized']} tensors {spec.method}"
              f"{f' g{spec.group_size}' if spec.format == 'int4' else ''}"
              f"{'' if spec.symmetric else ' asymmetric'}, {counts['kept']} kept as they were, "
              f"{counts['files']} safetensors file(s) (compressed-tensors pack-quantized)", file=sys.stderr)
    return 0


def calibrated_model(src: Path, args, spec):
    """The model loaded in float32 on the CPU, run over the calibration text with routing traced, then
    quantized: GPTQ for the experts that got enough tokens (moe_engine.calibrate)."""
    import time

    from moe_engine.calibrate import calibrated_quantize, collect_hessians, min_tokens, read_calibration
    from moe_engine.cli import show_progress
    from moe_engine.llm import LLM
    from moe_engine.tokenizer import require_tokenizer
    start = time.perf_counter()
    text = read_calibration(args.calibration)                   # before loading: a bad file fails at once
    # prompt_logits brings its own cache per window, so the engine's own cache can stay tiny.
    llm = LLM(src, "cpu", torch.float32, progress=show_progress(args), kv_cache_bytes=8 << 20)
    ids = require_tokenizer(llm.tokenizer, src).encode(text)
    hessians = collect_hessians(llm, ids)
    counts = calibrated_quantize(llm.model, spec, hessians)
    if not args.quiet:
        other = f", {counts['other']} other tensors by the clip search" if counts["other"] else ""
        print(f"calibrated on {len(ids)} tokens of {args.calibration}: {counts['calibrated']} experts by GPTQ, "
              f"{counts['fallback']} fell back to the clip search (fewer than {min_tokens(llm.model)} tokens "
              f"routed to them){other} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return llm.model, llm.config
