"""`moe-engine quantize`: write a model's weights quantized, as a compressed-tensors pack-quantized folder."""

import sys
from pathlib import Path

import torch

from moe_engine.errors import MoeEngineError


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")


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
    src, out = resolve_model(args.model), Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeEngineError(f"{out} already exists and is not an empty folder; choose a new --out folder")
    if out.resolve() == src.resolve():
        raise MoeEngineError("--out must differ from --model; choose a new folder")
    model, cfg = load_model(src, torch.device("cpu"), torch.float32, show_progress(args), quant=spec)
    tensors = index_tensors(safetensors_files(src))
    counts = write_packed(src, out, model, model.checkpoint_targets(tensors), tensors, cfg, spec)
    if not args.quiet:
        print(f"wrote {out}: {counts['quantized']} tensors {spec.method}"
              f"{f' g{spec.group_size}' if spec.format == 'int4' else ''}"
              f"{'' if spec.symmetric else ' asymmetric'}, {counts['kept']} kept as they were, "
              f"{counts['files']} safetensors file(s) (compressed-tensors pack-quantized)", file=sys.stderr)
    return 0
