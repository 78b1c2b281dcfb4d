"""`moe-engine bench tune`: measure Triton MoE tiles for the decode batches of real expert shapes.

Every decode batch of an MoE model sits in the 'tiny' shape class (a few rows per expert), where the
kernel only streams weights; which tile streams them fastest depends on the expert shape, so each
shape is tuned on its own. Gate+up tiles are tried with a fixed down tile, then down tiles with the
best gate+up; a tile's score is its time summed over the token counts, each relative to the best
there. Every candidate is checked against the torch reference. The winners are written as a tuning
file (docs/tuning.md): MOE_ENGINE_TUNING=<file> makes the engine use them; kernels/tuning_data/<device>.json
keeps the ones measured on the project's machines (copy the entries there, without their "device").

The few-token kernels are tuned in moe_engine/bench/tune_gemv.py: the MoE one against the tiled
kernels, the GEMV against the vendor library for every weight of the benchmark shapes.
"""

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

import kernels
from kernels.tuning import GemmTile, MoETuning, device_key, moe_shape_class, moe_tuning, parse
from moe_engine.bench.kernels import MOE_SPECS, MoESpec, rel_error, time_call

# (block_n, block_k, group_m, num_warps, num_stages): weight-streaming tiles of 16 rows.
CANDIDATES = [GemmTile(32, 128, 1, 4, 4), GemmTile(64, 128, 1, 4, 4), GemmTile(64, 64, 1, 4, 5),
              GemmTile(128, 64, 1, 4, 4), GemmTile(32, 256, 1, 4, 3), GemmTile(64, 256, 1, 8, 3),
              GemmTile(16, 256, 1, 4, 4), GemmTile(128, 128, 1, 8, 3)]
DECODE_TOKENS = [1, 16, 64]


def inputs(spec: MoESpec, T: int, device, dtype, w13, w2):
    x = torch.randn(T, spec.dim, device=device, dtype=dtype)
    logits, ids = torch.randn(T, spec.num_experts, device=device).topk(spec.top_k, dim=-1)
    return x, w13, w2, logits.softmax(-1), ids


def score(tuning: MoETuning, cases, device, min_time) -> tuple[list[float], float]:
    """Seconds per token count, and the worst relative error against the reference."""
    from kernels.triton_moe import fused_moe_triton
    times, worst = [], 0.0
    for args, expected in cases:
        worst = max(worst, rel_error(fused_moe_triton(*args, tuning=tuning), expected))
        times.append(time_call(lambda: fused_moe_triton(*args, tuning=tuning), device, min_time))
    return times, worst


ACCEPT_ERROR = 2e-2      # a candidate's largest error relative to the reference (bf16 runs)


def tune_shape(spec: MoESpec, device, dtype, min_time: float, candidates=CANDIDATES,
               tokens=DECODE_TOKENS) -> dict:
    E, D, I = spec.num_experts, spec.dim, spec.inter
    w13 = torch.randn(E, 2 * I, D, device=device, dtype=dtype) / D ** 0.5
    w2 = torch.randn(E, D, I, device=device, dtype=dtype) / I ** 0.5
    cases = []
    for T in tokens:
        args = inputs(spec, T, device, dtype, w13, w2)
        cases.append((args, kernels.fused_moe_ref(*args)))
    base = moe_tuning(device, spec.top_k, E, dtype, D, I)
    score(base, cases, device, min_time)     # warm-up: compiles, and brings the clocks up before any trial
    trials = []

    def trial(tuning):
        try:
            times, err = score(tuning, cases, device, min_time)
        except Exception as e:       # a tile that does not compile or fit: skipped, said
            print(f"  {spec.name}: {tuning} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return None
        ok = err < ACCEPT_ERROR
        trials.append({"tuning": asdict(tuning), "times_s": times, "rel_error": err, "ok": ok})
        return times if ok else None

    def pick(variants):
        results = [(t, trial(t)) for t in variants]
        results = [(t, times) for t, times in results if times]
        if not results:
            raise RuntimeError(f"{spec.name}: no candidate tile compiled and matched the reference")
        best = [min(times[i] for _, times in results) for i in range(len(tokens))]
        return min(results, key=lambda r: sum(t / b for t, b in zip(r[1], best)))

    gate_up, _ = pick([replace(base, gate_up=c) for c in candidates])
    best, best_times = pick([replace(gate_up, down=c) for c in candidates])
    base_times = trial(base)
    print(f"{spec.name}: best {best}; us at T={tokens}: "
          f"{[round(t * 1e6, 1) for t in best_times]} (tiles in use before: {[round(t * 1e6, 1) for t in base_times or []]})")
    return {"device": device_key(device), "shape": moe_shape_class(spec.top_k, E), "experts": E, "dim": D,
            "inter": I, "block_m": best.block_m, "gate_up": list(asdict(best.gate_up).values()),
            "down": list(asdict(best.down).values()), "tokens": tokens,
            "best_times_s": best_times, "previous_times_s": base_times, "trials": trials}


TUNED_KINDS = ("tiled", "gemv", "linear", "absorb")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench tune", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench_results/moe_tuning.json"))
    p.add_argument("--min-time", type=float, default=0.05, help="seconds of timed calls per measurement")
    p.add_argument("--only", default=",".join(TUNED_KINDS),
                   help="comma-separated kinds to tune: tiled (the grouped MoE kernels), gemv (the few-token "
                        "MoE), linear (the GEMV of projections and routers), absorb (MLA's absorbed query); "
                        "default all")
    a = p.parse_args(argv)
    from moe_engine.cli import check_output_path
    check_output_path(a.out, folder=False)          # before the tuning, not after
    kinds = {kind.strip() for kind in a.only.split(",")}
    if not kinds <= set(TUNED_KINDS):
        p.error(f"--only {a.only}: choose among {', '.join(TUNED_KINDS)}")
    if not torch.cuda.is_available():
        print("bench tune: a CUDA GPU is needed to tune the kernels, and none is visible; nothing was run")
        return 1
    device = torch.device("cuda")
    torch.manual_seed(0)
    from moe_engine.bench.tune_gemv import tune_absorb, tune_gemv, tune_linear
    entries = [tune_shape(spec, device, torch.bfloat16, a.min_time) for spec in MOE_SPECS] if "tiled" in kinds else []
    gemv = [tune_gemv(spec, device, torch.bfloat16, a.min_time) for spec in MOE_SPECS] if "gemv" in kinds else []
    linear = (tune_linear(["mixtral-8x7b", "deepseek-v2-lite"], device, torch.bfloat16, a.min_time)
              if "linear" in kinds else [])
    absorb = [tune_absorb("deepseek-v2-lite", device, torch.bfloat16, a.min_time)] if "absorb" in kinds else []
    write_tuning_file(a.out, torch.cuda.get_device_name(device), entries, gemv, linear, absorb)
    print(f"wrote {a.out}; use it with MOE_ENGINE_TUNING={a.out}")
    return 0


def write_tuning_file(path: Path, gpu: str, moe: list[dict], gemv: list[dict], linear: list[dict],
                      absorb: list[dict]) -> None:
    """The tuners' entries as a tuning file (kernels.tuning.parse reads it; their measurements ride along
    as fields it ignores), checked by reading it back before it is written."""
    text = json.dumps({"device": gpu, "moe": moe, "gemv": gemv, "linear": linear, "absorb": absorb}, indent=1)
    parse(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
