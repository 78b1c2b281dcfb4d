"""Build examples/calibration.txt: excerpts of CPython's standard library (what the tiny models were trained on),
leaving out every file the held-out streams in tests/data come from.

    python examples/make_calibration.py [--lib DIR] [--bytes 200000] [--out examples/calibration.txt]

Each held-out document (<bos> ... <eos> in tests/data/*_val_tokens.npy) is decoded and its three longest
lines are searched for in every Lib/**/*.py file; a file holding any of them is skipped. Then
files are drawn in a seeded order and an excerpt of about 2 KB (whole lines) is taken from each, until the
budget is filled. Deterministic for one CPython tree (the shipped file came from CPython 3.11.7)."""

import argparse
import json
import random
import sysconfig
from pathlib import Path

import numpy as np

from moe_engine.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
EXCERPT = 2000


def held_out_snippets() -> list[str]:
    snippets = []
    for name in ("tiny-mixtral", "tiny-deepseek"):
        path = REPO / "weights" / name
        tok = load_tokenizer(path, json.loads((path / "config.json").read_text()))
        ids = np.load(REPO / f"tests/data/{name}_val_tokens.npy").astype(np.int64).tolist()
        doc = []
        for t in ids + [next(iter(tok.eos_ids))]:
            if t == tok.bos_id:
                doc = []
            elif t in tok.eos_ids:
                lines = [s.strip() for s in tok.decode(doc).splitlines() if len(s.strip()) >= 20]
                snippets += sorted(lines, key=len)[-3:]
                doc = []
            else:
                doc.append(t)
    return snippets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--bytes", type=int, default=200_000)
    p.add_argument("--out", type=Path, default=REPO / "examples" / "calibration.txt")
    a = p.parse_args()
    files = sorted(f for f in a.lib.rglob("*.py") if "site-packages" not in f.parts)
    snippets = held_out_snippets()
    texts = {f: f.read_text(encoding="utf-8", errors="replace") for f in files}
    held = {f for f, t in texts.items() if any(s in t for s in snippets)}
    pool = [f for f in files if f not in held and len(texts[f]) > EXCERPT]
    random.Random(0).shuffle(pool)
    parts, size = [], 0
    for f in pool:
        lines = texts[f].splitlines(keepends=True)
        start = random.Random(str(f.relative_to(a.lib))).randrange(max(1, len(lines) // 2))
        piece = ""
        for line in lines[start:]:
            if len(piece) + len(line) > EXCERPT:
                break
            piece += line
        if piece.strip() and size + len(piece) + 1 <= a.bytes:
            parts.append(piece)
            size += len(piece) + 1
        if size > a.bytes - 200:
            break
    a.out.write_text("\n".join(parts), encoding="utf-8")
    print(f"{a.out}: {len(parts)} excerpts, {a.out.stat().st_size} bytes; {len(held)} files skipped as held out "
          f"({len(snippets)} snippets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
