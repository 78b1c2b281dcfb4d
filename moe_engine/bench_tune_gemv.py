"""`moe-engine bench tune`, the few-token kernels: measured as CUDA-graph replays, since that is how
decode runs them, with a cold L2 each time.

The MoE one (kernels/triton_moe_gemv.py, with the shape's shared experts riding along) is tuned at one
token, gate+up tile first, then down (each tile one expert at a time and all experts stacked); token count by token count it then serves batches for as long as it
beats the tiled kernels (max_tokens). The GEMV (kernels/triton_gemv.py) is tried on every distinct 2-D
weight of the benchmark shapes against the vendor library (F.linear; the routers' float32 weights as the
router multiplies them); a weight gets an entry with the rows up to which the GEMV won, 0 where it never did.
"""

import torch
import torch.nn.functional as F
from dataclasses import asdict, replace

import kernels
from kernels.linear import swiglu
from kernels.tuning import GemmTile, LinearTuning, device_key, gemv_tuning
from moe_engine.bench_kernels import MoESpec, rel_error, time_call
from moe_engine.bench_tune import inputs

# (block_n, block_k, -, num_warps, num_stages) for the few-token kernels: 4-32 KiB of weights a step.
GEMV_CANDIDATES = [GemmTile(16, 256, 1, 4, 2), GemmTile(8, 512, 1, 4, 2), GemmTile(32, 128, 1, 4, 2),
                   GemmTile(16, 512, 1, 8, 2), GemmTile(4, 1024, 1, 4, 2), GemmTile(32, 256, 1, 8, 3),
                   GemmTile(2, 2048, 1, 8, 1), GemmTile(4, 2048, 1, 8, 2), GemmTile(1, 2048, 1, 4, 1),
                   GemmTile(1, 4096, 1, 8, 1)]
# The stacked down kernel's tile is [experts, block_n, block_k]: smaller bands, as up to 8 experts share it.
STACKED_DOWN_CANDIDATES = [GemmTile(4, 256, 1, 4, 2), GemmTile(2, 512, 1, 4, 2), GemmTile(4, 512, 1, 8, 2),
                           GemmTile(8, 128, 1, 4, 2), GemmTile(2, 1024, 1, 8, 2), GemmTile(2, 256, 1, 4, 2)]
GEMV_TOKENS = [1, 2, 4, 8]


def time_graphed(fn, device, min_time: float) -> float:
    """Seconds per replay of fn captured in a CUDA graph (fn's launch costs gone, as in a decode step)."""
    fn()                                              # compile outside the capture
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_call(graph.replay, device, min_time)


def tune_gemv(spec: MoESpec, device, dtype, min_time: float, candidates=GEMV_CANDIDATES,
              tokens=GEMV_TOKENS, timer=time_graphed, stacked_candidates=STACKED_DOWN_CANDIDATES) -> dict:
    """Few-token tiles for one expert shape (with its shared experts) at one token, then the largest
    batch up to which they beat the tiled kernels. An entry with max_tokens 0 when none works."""
    from kernels.triton_moe import fused_moe_triton
    from kernels.triton_moe_gemv import fused_moe_gemv
    E, D, I = spec.num_experts, spec.dim, spec.inter
    w13 = torch.randn(E, 2 * I, D, device=device, dtype=dtype) / D ** 0.5
    w2 = torch.randn(E, D, I, device=device, dtype=dtype) / I ** 0.5
    shared = None
    if spec.shared:
        shared = (torch.randn(2 * I * spec.shared, D, device=device, dtype=dtype) / D ** 0.5,
                  torch.randn(D, I * spec.shared, device=device, dtype=dtype) / (I * spec.shared) ** 0.5)
    cases = {}
    for T in tokens:
        args = inputs(spec, T, device, dtype, w13, w2)
        expected = kernels.fused_moe_ref(*args)
        cases[T] = (args, expected if shared is None else expected + swiglu(args[0], *shared))
    base = gemv_tuning(device, D, I, dtype)
    trials = []

    def trial(tuning, T=1):
        args, expected = cases[T]
        try:
            err = rel_error(fused_moe_gemv(*args, shared=shared, tuning=tuning), expected)
            t = timer(lambda: fused_moe_gemv(*args, shared=shared, tuning=tuning), device, min_time)
        except Exception as e:       # a tile that does not compile or fit: skipped, said
            print(f"  {spec.name} gemv: {tuning} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return None
        trials.append({"tuning": asdict(tuning), "T": T, "time_s": t, "rel_error": err, "ok": err < 2e-2})
        return t if err < 2e-2 else None

    def pick(variants):
        timed_ok = [(t, s) for t, s in ((t, trial(t)) for t in variants) if s is not None]
        return min(timed_ok, key=lambda r: r[1]) if timed_ok else (None, None)

    entry = {"device": device_key(device), "dim": D, "inter": I, "shared": spec.shared, "trials": trials}
    up, _ = pick([replace(base, gate_up=c) for c in candidates])
    downs = ([replace(up, down=c, stacked_down=False) for c in candidates]
             + [replace(up, down=c, stacked_down=True) for c in stacked_candidates])
    best, best_time = pick(downs) if up else (None, None)
    if best is None:
        print(f"{spec.name}: no few-token tile compiled and matched the reference; the tiled kernels stay")
        return {**entry, "gate_up": list(asdict(base.gate_up).values()), "down": list(asdict(base.down).values()),
                "max_tokens": 0}
    versus, max_tokens = [], 0
    for T in tokens:
        args, _ = cases[T]
        gemv_t = trial(best, T)
        tiled_t = timer(lambda: _add(fused_moe_triton(*args), args[0], shared), device, min_time)
        versus.append({"T": T, "gemv_s": gemv_t, "tiled_s": tiled_t})
        if gemv_t is None or gemv_t >= tiled_t:
            break
        max_tokens = T
    print(f"{spec.name} gemv: best {best} at T=1: {best_time * 1e6:.1f} us; against the tiled kernels (us): "
          + ", ".join(f"T={v['T']} {fmt_us(v['gemv_s'])} vs {fmt_us(v['tiled_s'])}" for v in versus)
          + f"; max_tokens {max_tokens}")
    return {**entry, "gate_up": list(asdict(best.gate_up).values()), "down": list(asdict(best.down).values()),
            "stacked_down": best.stacked_down, "max_tokens": max_tokens, "best_time_s": best_time,
            "versus_tiled": versus}


def _add(out, x, shared):
    return out if shared is None else out + swiglu(x, *shared)


def fmt_us(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e6:.1f}"




LINEAR_TOKENS = [1, 2, 4, 8]


def dense_weights(shape_names, dtype=torch.bfloat16) -> list[tuple[int, int, torch.dtype]]:
    """Every distinct 2-D weight (n, k, dtype) of the named benchmark shapes built in dtype (routers stay
    float32), from models on the meta device."""
    from moe_engine.bench_models import _classes, hf_config_dict
    found = set()
    for name in shape_names:
        cfg = hf_config_dict(name)
        args_cls, model_cls = _classes(cfg)
        with torch.device("meta"):
            model = model_cls(args_cls.from_hf_config(cfg), dtype=dtype)
        found |= {(p.shape[0], p.shape[1], p.dtype) for p in model.parameters() if p.dim() == 2}
    return sorted(found, key=lambda s: (s[0] * s[1], str(s[2])))


def tune_linear(shape_names, device, dtype, min_time: float, candidates=GEMV_CANDIDATES, tokens=LINEAR_TOKENS,
                timer=time_graphed) -> list[dict]:
    """One entry per weight: the best GEMV tile at one row and the rows up to which it beat F.linear."""
    from kernels.triton_gemv import gemv_triton
    entries = []
    for n, k, w_dtype in dense_weights(shape_names, dtype):
        w = torch.randn(n, k, device=device, dtype=w_dtype) / k ** 0.5
        xs = {T: torch.randn(T, k, device=device, dtype=dtype) for T in tokens}
        library = (lambda x: F.linear(x.float(), w)) if w_dtype == torch.float32 else (lambda x: F.linear(x, w))
        out_dtype = torch.float32 if w_dtype == torch.float32 else None
        expected = {T: library(x) for T, x in xs.items()}
        trials = []

        def trial(tile, T=1):
            try:
                err = rel_error(gemv_triton(xs[T], w, tile, out_dtype=out_dtype), expected[T])
                t = timer(lambda: gemv_triton(xs[T], w, tile, out_dtype=out_dtype), device, min_time)
            except Exception as e:    # a tile that does not compile or fit: skipped, said
                print(f"  linear {n}x{k}: {tile} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                return None
            trials.append({"tile": asdict(tile), "T": T, "time_s": t, "rel_error": err})
            return t if err < 2e-2 else None

        timed_ok = [(c, t) for c, t in ((c, trial(c)) for c in candidates) if t is not None]
        entry = {"device": device_key(device), "n": n, "k": k, "dtype": str(w_dtype).removeprefix("torch."),
                 "max_tokens": 0, "trials": trials}
        if not timed_ok:
            print(f"linear {n}x{k} {entry['dtype']}: no GEMV tile compiled and matched; the library stays")
            entries.append({**entry, "tile": list(asdict(candidates[0]).values())})
            continue
        best, _ = min(timed_ok, key=lambda r: r[1])
        versus = []
        for T in tokens:
            ours = trial(best, T)
            theirs = timer(lambda: library(xs[T]), device, min_time)
            versus.append({"T": T, "gemv_s": ours, "library_s": theirs})
            if ours is None or ours >= theirs:
                break
            entry["max_tokens"] = T
        print(f"linear {n}x{k} {entry['dtype']}: {best}; us (GEMV vs library): "
              + ", ".join(f"T={v['T']} {fmt_us(v['gemv_s'])} vs {fmt_us(v['library_s'])}" for v in versus)
              + f"; max_tokens {entry['max_tokens']}")
        entries.append({**entry, "tile": list(asdict(best).values()), "versus_library": versus})
        del w, xs
    return entries
