"""Perplexity of quantized weights against the unquantised model on the held-out streams
(`moe-engine bench quant`): round to nearest vs the clipping search, int4 g128/g64/g32, int8 and fp8."""

import argparse
import time
from pathlib import Path

import numpy as np

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench quant", description=__doc__)
    p.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"])
    a = p.parse_args(argv)
    base = {}
    rows = {}
    for name in a.models:
        ids = held_out(name)
        base[name] = perplexity(LLM(REPO / "weights" / name), ids, WINDOW)
        for label, settings in SETTINGS:
            start = time.perf_counter()
            llm = LLM(REPO / "weights" / name, **settings)
            load = time.perf_counter() - start
            rows.setdefault(label, {})[name] = (perplexity(llm, ids, WINDOW), load)
    print(f"Perplexity, {TOKENS} held-out tokens in {WINDOW}-token windows, experts quantized (routed and shared); "
          "change against the unquantised model (float32 on the CPU); load time includes quantizing.\n")
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
