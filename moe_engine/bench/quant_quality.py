"""Perplexity of quantized weights against the unquantised model on the held-out streams
(`moe-engine bench quant`): round to nearest vs the clipping search, int4 g128/g64/g32, int8 and fp8; with
--calibration FILE, GPTQ instead (`moe-engine quantize --calibration`, the folder loaded back)."""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_engine.llm import LLM
from moe_engine.perplexity import perplexity

REPO = Path(__file__).resolve().parent.parent.parent
WINDOW, TOKENS = 256, 4096
# (label, LLM settings); the clip search is the default, RTN rounds each value to the nearest level.
SETTINGS = [("int8", dict(quantization="int8", quant_clip_search=False)),
            ("int8 + clip search", dict(quantization="int8")),
            ("fp8 per channel", dict(quantization="fp8")),
            ("fp8 128x128 blocks", dict(quantization="fp8-block"))] + [
    (f"int4 g{g}{' asym' if not sym else ''}{' + clip search' if clip else ' RTN'}",
     dict(quantization="int4", quant_group_size=g, quant_symmetric=sym, quant_clip_search=clip))
    for g in (128, 64, 32) for sym in (True, False) for clip in (False, True)]


def held_out(name: str) -> list[int]:
    """The first TOKENS + 1 tokens of the model's held-out stream: TOKENS predicted tokens."""
    return np.load(REPO / f"tests/data/{name}_val_tokens.npy").astype(np.int64)[:TOKENS + 1].tolist()


def calibrated(model: Path, calibration: Path, group: int, symmetric: bool) -> tuple[LLM, float]:
    """`moe-engine quantize --calibration` into a temporary folder, loaded back: (the LLM, seconds quantizing)."""
    from moe_engine.cli import main as cli
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--group-size", str(group)] + ([] if symmetric else ["--quant-asymmetric"])
        start = time.perf_counter()
        if cli(["quantize", "--model", str(model), "--out", f"{tmp}/q", "--quantization", "int4", "--quiet",
                "--calibration", str(calibration)] + flags):
            raise SystemExit(f"moe-engine quantize --calibration failed for {model}")
        seconds = time.perf_counter() - start
        return LLM(f"{tmp}/q", "cpu", torch.float32), seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench quant", description=__doc__)
    p.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"])
    p.add_argument("--calibration", type=Path, default=None,
                   help="rows for GPTQ calibrated on this text (e.g. examples/calibration.txt) instead")
    a = p.parse_args(argv)
    base = {}
    rows = {}
    for name in a.models:
        ids = held_out(name)
        path = REPO / "weights" / name
        base[name] = perplexity(LLM(path, "cpu", torch.float32), ids, WINDOW)
        if a.calibration is not None:
            for g in (128, 64, 32):
                for sym in (True, False):
                    llm, seconds = calibrated(path, a.calibration, g, sym)
                    label = f"int4 g{g}{' asym' if not sym else ''} GPTQ ({a.calibration.name})"
                    rows.setdefault(label, {})[name] = (perplexity(llm, ids, WINDOW), seconds)
            continue
        for label, settings in SETTINGS:
            start = time.perf_counter()
            llm = LLM(path, "cpu", torch.float32, **settings)
            load = time.perf_counter() - start
            rows.setdefault(label, {})[name] = (perplexity(llm, ids, WINDOW), load)
    print(f"Perplexity, {TOKENS} held-out tokens in {WINDOW}-token windows, experts quantized (routed and shared); "
          "change against the unquantised model (float32 on the CPU); load time includes quantizing "
          "(with --calibration: the time of `moe-engine quantize --calibration`).\n")
    print("| weights | " + " | ".join(a.models) + " |")
    print("|---|" + "---|" * len(a.models))
    print("| bf16 (as shipped) | " + " | ".join(f"{base[n]:.4f}" for n in a.models) + " |")
    for label, per in rows.items():
        cells = [f"{per[n][0]:.4f} ({100 * (per[n][0] / base[n] - 1):+.2f}%, load {per[n][1]:.1f} s)"
                 for n in a.models]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
