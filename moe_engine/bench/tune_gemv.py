"""`moe-engine bench tune`, the few-token kernels: measured as CUDA-graph replays, since that is how
decode runs them, with a cold L2 each time.

MLA's absorbed-query kernel (kernels/triton_mla.py) is tuned the same way on the DeepSeek shape, against
the batched matmul, rotary and concatenation that serve larger batches.

The MoE one (kernels/triton_moe_gemv.py, with the shape's shared experts riding along) is tuned at one
token, gate+up tile first, then down (each tile one expert at a time and all experts stacked); token
count by token count it then serves batches for as long as it beats the tiled kernels (max_tokens). The GEMV (kernels/triton_gemv.py) is tried on every distinct 2-D
weight of the benchmark shapes against the vendor library (F.linear; the routers' float32 weights as the
router multiplies them); a weight gets an entry with the rows up to which the GEMV won, 0 where it never did.
"""

import torch
import torch.nn.functional as F
from dataclasses import asdict, replace

import kernels
from kernels.moe import add_shared
from kernels.tuning import GemmTile, LinearTuning, device_key, gemv_tuning
from moe_engine.bench.kernels import MoESpec, rel_error, time_call
from moe_engine.bench.tune import ACCEPT_ERROR, inputs

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
        cases[T] = (args, add_shared(kernels.fused_moe_ref(*args), args[0], shared))
    base = gemv_tuning(device, D, I, dtype)
    trials = []

    def trial(tuning, T=1):
        args, expected = cases[T]
        run = lambda: fused_moe_gemv(*args, shared=shared, tuning=tuning)   # noqa: E731
        return checked_time(f"{spec.name} gemv: {tuning}", run, expected, timer, device, min_time, trials,
                            {"tuning": asdict(tuning), "T": T})

    entry = {"device": device_key(device), "dim": D, "inter": I, "shared": spec.shared, "trials": trials}
    up, _ = fastest([replace(base, gate_up=c) for c in candidates], trial)
    downs = ([replace(up, down=c, stacked_down=False) for c in candidates]
             + [replace(up, down=c, stacked_down=True) for c in stacked_candidates])
    best, best_time = fastest(downs, trial) if up else (None, None)
    if best is None:
        print(f"{spec.name}: no few-token tile compiled and matched the reference; the tiled kernels stay")
        return {**entry, "gate_up": list(asdict(base.gate_up).values()), "down": list(asdict(base.down).values()),
                "max_tokens": 0}
    def tiled(T):
        args = cases[T][0]
        return timer(lambda: add_shared(fused_moe_triton(*args), args[0], shared), device, min_time)

    versus, max_tokens = crossover(tokens, lambda T: trial(best, T), tiled)
    print(f"{spec.name} gemv: best {best} at T=1: {best_time * 1e6:.1f} us; against the tiled kernels: "
          f"{fmt_versus(versus)}; max_tokens {max_tokens}")
    return {**entry, "gate_up": list(asdict(best.gate_up).values()), "down": list(asdict(best.down).values()),
            "stacked_down": best.stacked_down, "max_tokens": max_tokens, "best_time_s": best_time,
            "versus": versus}


def checked_time(label: str, run, expected, timer, device, min_time: float, trials: list,
                 record: dict) -> float | None:
    """Seconds of run(), appended to trials as record + its time and error relative to expected; None
    when its error is over ACCEPT_ERROR, or (said in one line) when it does not compile or run (a tile
    too large for the device, say)."""
    try:
        err = rel_error(run(), expected)
        seconds = timer(run, device, min_time)
    except Exception as e:
        print(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return None
    trials.append({**record, "time_s": seconds, "rel_error": err, "ok": err < ACCEPT_ERROR})
    return seconds if err < ACCEPT_ERROR else None


def fastest(candidates, trial):
    """(candidate, seconds) of the fastest candidate that trial() timed and accepted; (None, None) if none."""
    timed = [(c, t) for c, t in ((c, trial(c)) for c in candidates) if t is not None]
    return min(timed, key=lambda r: r[1]) if timed else (None, None)


def fmt_us(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e6:.1f}"


def crossover(tokens, ours, theirs) -> tuple[list[dict], int]:
    """Seconds of ours(T) (None: it failed) and theirs(T) for each token count in order, up to the first
    count where ours does not win; and the last count it won (0 if none): the entry's max_tokens."""
    versus, won = [], 0
    for T in tokens:
        row = {"T": T, "ours_s": ours(T), "theirs_s": theirs(T)}
        versus.append(row)
        if row["ours_s"] is None or row["ours_s"] >= row["theirs_s"]:
            break
        won = T
    return versus, won


def fmt_versus(versus: list[dict]) -> str:
    return ", ".join(f"T={v['T']} {fmt_us(v['ours_s'])} vs {fmt_us(v['theirs_s'])} us" for v in versus)


LINEAR_TOKENS = [1, 2, 4, 8]


def dense_weights(shape_names, dtype=torch.bfloat16) -> list[tuple[int, int, torch.dtype]]:
    """Every distinct 2-D weight (n, k, dtype) of the named benchmark shapes built in dtype (routers stay
    float32), from models on the meta device."""
    from moe_engine.bench.models import _classes, hf_config_dict
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
            run = lambda: gemv_triton(xs[T], w, tile, out_dtype=out_dtype)   # noqa: E731
            return checked_time(f"linear {n}x{k}: {tile}", run, expected[T], timer, device, min_time, trials,
                                {"tile": asdict(tile), "T": T})

        entry = {"device": device_key(device), "n": n, "k": k, "dtype": str(w_dtype).removeprefix("torch."),
                 "max_tokens": 0, "trials": trials}
        best, _ = fastest(candidates, trial)
        if best is None:
            print(f"linear {n}x{k} {entry['dtype']}: no GEMV tile compiled and matched; the library stays")
            entries.append({**entry, "tile": list(asdict(candidates[0]).values())})
            continue
        versus, entry["max_tokens"] = crossover(
            tokens, lambda T: trial(best, T), lambda T: timer(lambda: library(xs[T]), device, min_time))
        print(f"linear {n}x{k} {entry['dtype']}: {best}; GEMV vs library: {fmt_versus(versus)}; "
              f"max_tokens {entry['max_tokens']}")
        entries.append({**entry, "tile": list(asdict(best).values()), "versus": versus})
        del w, xs
    return entries


# [block_n of the latent, block_k of nope] per (token, head) program of MLA's absorbed-query kernel.
ABSORB_CANDIDATES = [GemmTile(128, 128, 1, 4, 3), GemmTile(64, 128, 1, 4, 2), GemmTile(32, 128, 1, 4, 2),
                     GemmTile(16, 128, 1, 2, 2), GemmTile(32, 64, 1, 2, 2), GemmTile(64, 64, 1, 4, 2)]
ABSORB_TOKENS = [1, 2, 4, 8, 16]


def tune_absorb(shape_name: str, device, dtype, min_time: float, candidates=ABSORB_CANDIDATES,
                tokens=ABSORB_TOKENS, timer=time_graphed) -> dict:
    """The absorbed-query kernel's tile for a DeepSeek shape at one token, then the token counts up to
    which it beats what serves larger batches (batched matmul, Triton rotary, concatenation)."""
    from kernels.mla import absorb_query_bmm
    from kernels.triton_mla import absorb_query_triton
    from moe_engine.bench.models import hf_config_dict
    cfg = hf_config_dict(shape_name)
    H, nope, R, L = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                     cfg["kv_lora_rank"])
    kv_b = torch.randn(H, nope + cfg["v_head_dim"], L, device=device, dtype=dtype) / nope ** 0.5
    w_uk = kv_b[:, :nope]                                                 # [H, nope, L], as the model holds it
    cases = {}
    for T in tokens:
        angles = torch.rand(T, 1, R // 2, device=device) * 6
        cases[T] = (torch.randn(T, H, nope + R, device=device, dtype=dtype), angles.cos().to(dtype),
                    angles.sin().to(dtype))
    entry = {"device": device_key(device), "heads": H, "nope": nope, "lora": L, "max_tokens": 0, "trials": []}

    def trial(tile, T=1):
        q, c, s = cases[T]
        run = lambda: absorb_query_triton(q, nope, w_uk, c, s, True, tile)   # noqa: E731
        expected = absorb_query_bmm(q, nope, w_uk, c, s, True, backend="torch")
        return checked_time(f"absorb {shape_name}: {tile}", run, expected, timer, device, min_time,
                            entry["trials"], {"tile": asdict(tile), "T": T})

    def library(T):          # what absorb_query runs above max_tokens
        q, c, s = cases[T]
        return timer(lambda: absorb_query_bmm(q, nope, w_uk, c, s, True), device, min_time)

    best, _ = fastest(candidates, trial)
    if best is None:
        print(f"absorb {shape_name}: no tile compiled and matched; the batched matmul stays")
        return {**entry, "tile": list(asdict(candidates[0]).values())}
    versus, entry["max_tokens"] = crossover(tokens, lambda T: trial(best, T), library)
    print(f"absorb {shape_name} ({H} heads, nope {nope}, latent {L}): {best}; kernel vs bmm+rotary+cat: "
          f"{fmt_versus(versus)}; max_tokens {entry['max_tokens']}")
    return {**entry, "tile": list(asdict(best).values()), "versus": versus}
