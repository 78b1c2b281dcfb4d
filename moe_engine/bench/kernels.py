"""Kernel benchmark on a CUDA GPU: fused MoE and paged decode attention against torch and the measured limits."""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels.attention import AttentionMetadata


@dataclass(frozen=True)
class MoESpec:
    name: str
    num_experts: int
    dim: int
    inter: int
    top_k: int
    shared: int = 0    # shared experts, in routed widths (DeepSeek: n_shared_experts)


@dataclass(frozen=True)
class DecodeSpec:
    name: str
    heads: int
    kv_heads: int      # 0: MLA, one latent row per token that is key (L + R) and value (first L)
    key_dim: int
    value_dim: int


MOE_SPECS = [MoESpec("mixtral-8x7b", 8, 4096, 14336, 2), MoESpec("deepseek-v2-lite", 64, 2048, 1408, 6, 2)]
TOKEN_COUNTS = [1, 16, 256, 4096]
DECODE_SPECS = [DecodeSpec("mla-16h", 16, 0, 576, 512), DecodeSpec("mla-128h", 128, 0, 576, 512),
                DecodeSpec("gqa-32x8x128", 32, 8, 128, 128)]
CONTEXTS = [1024, 4096, 16384]


def time_call(fn, device: torch.device, min_time: float, max_iters: int = 200) -> float:
    """Mean seconds per call after one warm-up (compilation) call. On CUDA each call starts with a
    cold L2 (a 256 MiB buffer is rewritten between calls, outside the timed region)."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        iters = int(max(2, min(max_iters, min_time / max(time.perf_counter() - start, 1e-9))))
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    iters = int(max(3, min(max_iters, min_time / max(time.perf_counter() - start, 1e-9))))
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for begin, end in events:
        flush.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return sum(b.elapsed_time(e) for b, e in events) / iters / 1e3


def measure_limits(device: torch.device, copy_bytes: int, matmul_n: int, min_time: float) -> dict:
    """Copy bandwidth (bytes read + written) and dense bf16 matmul rate, measured now on this device."""
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = time_call(lambda: dst.copy_(src), device, min_time)
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
    mm_s = time_call(lambda: a @ b, device, min_time)
    return {"copy_GBps": 2 * copy_bytes / copy_s / 1e9, "copy_bytes": copy_bytes,
            "matmul_TFLOPps": 2 * matmul_n ** 3 / mm_s / 1e12, "matmul_n": matmul_n}


def grouped_mm_function():
    """torch's grouped matmul (a 2-D A sliced by offs against a 3-D B), or None on a torch without it."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def fused_moe_grouped_mm(x, w13, w2, topk_weights, topk_ids, gmm):
    """The same MoE layer written with torch's grouped matmul: sort, two grouped GEMMs, weighted scatter-add."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)                                                         # [T*k]
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).int()          # [E] group ends
    gate, up = gmm(x[token_of], w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)        # [T*k, I] each
    ys = gmm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)                          # [T*k, D]
    weights = topk_weights.reshape(-1)[order].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, ys * weights[:, None])


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def checked(fn, row: dict, name: str):
    """fn() or None, noting in row why it failed (e.g. a reference too big for the GPU's memory)."""
    try:
        return fn()
    except Exception as e:
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return None


def timed(fn, device, min_time) -> tuple[float | None, str | None]:
    try:
        return time_call(fn, device, min_time), None
    except Exception as e:   # one failing baseline must not lose the rest of the table
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def bench_moe(spec: MoESpec, token_counts, device, dtype, limits, min_time) -> list[dict]:
    from kernels.triton_moe import fused_moe_triton
    from kernels.tuning import moe_tuning
    E, D, I, k = spec.num_experts, spec.dim, spec.inter, spec.top_k
    w13 = torch.randn(E, 2 * I, D, device=device, dtype=dtype) / D ** 0.5
    w2 = torch.randn(E, D, I, device=device, dtype=dtype) / I ** 0.5
    gmm = grouped_mm_function()
    rows = []
    for T in token_counts:
        x = torch.randn(T, D, device=device, dtype=dtype)
        topk_logits, topk_ids = torch.randn(T, E, device=device).topk(k, dim=-1)        # uniform random routing
        topk_weights = topk_logits.softmax(-1)
        args = (x, w13, w2, topk_weights, topk_ids)
        used = topk_ids.unique().numel()
        flops = 6 * T * k * D * I
        nbytes = used * 3 * D * I * w13.element_size() + 2 * T * D * x.element_size()  # weights read, x and out
        row = {"kernel": "fused_moe", "shape": spec.name, "T": T, **asdict(spec), "experts_used": used,
               "flops": flops, "bytes": nbytes, "tuning": asdict(moe_tuning(device, T * k, E, dtype, D, I))}
        row["time_s"], row["error"] = timed(lambda: fused_moe_triton(*args), device, min_time)
        reference = checked(lambda: kernels.fused_moe_ref(*args), row, "loop")
        if row["time_s"] is not None and reference is not None:
            row["rel_error"] = rel_error(fused_moe_triton(*args), reference)
        row["loop_time_s"], row["loop_error"] = timed(lambda: kernels.fused_moe_ref(*args), device, min_time)
        if gmm is None:
            row["grouped_mm_time_s"], row["grouped_mm_error"] = None, "torch has no grouped_mm"
        else:
            row["grouped_mm_time_s"], row["grouped_mm_error"] = timed(
                lambda: fused_moe_grouped_mm(*args, gmm), device, min_time)
        rows.append(finish_row(row, limits, baselines=("loop", "grouped_mm")))
    return rows


def bench_decode(spec: DecodeSpec, contexts, batch: int, device, dtype, limits, min_time, page_size=64) -> list[dict]:
    from kernels.triton_attention import paged_decode_triton
    rows = []
    for ctx in contexts:
        pages_per_seq = -(-ctx // page_size)
        pages = torch.randperm(batch * pages_per_seq).view(batch, pages_per_seq).tolist()   # scattered pages
        meta = AttentionMetadata.build(pages, [ctx] * batch, [1] * batch, page_size, device)
        slots = batch * pages_per_seq * page_size
        if spec.kv_heads == 0:
            entries = torch.randn(slots, 1, spec.key_dim, device=device, dtype=dtype)       # [S, 1, L + R]
            k_cache, v_cache = entries, entries[..., :spec.value_dim]
            cache_bytes = entries.numel() * entries.element_size()
        else:
            k_cache = torch.randn(slots, spec.kv_heads, spec.key_dim, device=device, dtype=dtype)
            v_cache = torch.randn(slots, spec.kv_heads, spec.value_dim, device=device, dtype=dtype)
            cache_bytes = (k_cache.numel() + v_cache.numel()) * k_cache.element_size()
        q = torch.randn(batch, spec.heads, spec.key_dim, device=device, dtype=dtype)
        scale = spec.key_dim ** -0.5
        used_bytes = cache_bytes * ctx // (pages_per_seq * page_size)
        row = {"kernel": "paged_decode", "shape": spec.name, "context": ctx, "batch": batch, **asdict(spec),
               "flops": 2 * batch * spec.heads * ctx * (spec.key_dim + spec.value_dim),
               "bytes": used_bytes + (q.numel() + batch * spec.heads * spec.value_dim) * q.element_size()}

        def ours():
            return paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor,
                                       page_size, scale, ctx)
        row["time_s"], row["error"] = timed(ours, device, min_time)
        reference = checked(lambda: kernels.paged_attention_ref(q, k_cache, v_cache, meta, scale), row, "reference")
        if row["time_s"] is not None and reference is not None:
            row["rel_error"] = rel_error(ours(), reference)
            row["reference_time_s"], row["reference_error"] = timed(
                lambda: kernels.paged_attention_ref(q, k_cache, v_cache, meta, scale), device, min_time)
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(finish_row(row, limits, baselines=("reference",)))
    return rows


def finish_row(row: dict, limits: dict, baselines) -> dict:
    """Rates and ratios for one row: ours against the measured limits and each torch baseline (>1: ours faster)."""
    t = row["time_s"]
    if t:
        row["TFLOPps"] = row["flops"] / t / 1e12
        row["GBps"] = row["bytes"] / t / 1e9
        row["frac_of_copy_bw"] = row["GBps"] / limits["copy_GBps"]
        row["frac_of_matmul"] = row["TFLOPps"] / limits["matmul_TFLOPps"]
    for name in baselines:
        other = row.get(f"{name}_time_s")
        row[f"speedup_vs_{name}"] = other / t if (t and other) else None
    return row


def fmt(v, spec="{:.2f}") -> str:
    return "n/a" if v is None else spec.format(v)


def print_table(rows: list[dict], limits: dict, device_name: str) -> None:
    print(f"device: {device_name}; copy {limits['copy_GBps']:.0f} GB/s, dense bf16 matmul "
          f"{limits['matmul_TFLOPps']:.0f} TFLOP/s")
    head = (f"{'kernel':<13}{'shape':<18}{'T/ctx':>7}{'us':>10}{'TFLOP/s':>9}{'GB/s':>8}{'%copy':>7}{'%mm':>6}"
            f"{'x loop/ref':>11}{'x grouped':>10}{'rel err':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        size = r.get("T", r.get("context"))
        t = r.get("time_s")
        baseline = r.get("speedup_vs_loop", r.get("speedup_vs_reference"))
        print(f"{r['kernel']:<13}{r['shape']:<18}{size:>7}{fmt(t and t * 1e6, '{:.1f}'):>10}"
              f"{fmt(r.get('TFLOPps'), '{:.1f}'):>9}{fmt(r.get('GBps'), '{:.0f}'):>8}"
              f"{fmt(r.get('frac_of_copy_bw') and 100 * r['frac_of_copy_bw'], '{:.0f}'):>7}"
              f"{fmt(r.get('frac_of_matmul') and 100 * r['frac_of_matmul'], '{:.0f}'):>6}"
              f"{fmt(baseline):>11}{fmt(r.get('speedup_vs_grouped_mm')):>10}{fmt(r.get('rel_error'), '{:.1e}'):>10}")
        for key in ("error", "loop_error", "grouped_mm_error", "reference_error"):
            if r.get(key):
                print(f"    {key}: {r[key]}")


def run_suite(device: torch.device, moe_specs, token_counts, decode_specs, contexts, batch: int,
              min_time: float, copy_bytes: int, matmul_n: int, dtype=torch.bfloat16) -> dict:
    """Everything main() measures, with the sizes as arguments (tests run it tiny on the CPU)."""
    torch.manual_seed(0)
    limits = measure_limits(device, copy_bytes, matmul_n, min_time)
    rows = []
    for spec in moe_specs:
        rows += bench_moe(spec, token_counts, device, dtype, limits, min_time)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for spec in decode_specs:
        rows += bench_decode(spec, contexts, batch, device, dtype, limits, min_time)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version(), "dtype": str(dtype),
            "limits": limits, "results": rows}


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_kernels", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench_results/kernels.json"))
    p.add_argument("--batch", type=int, default=32, help="sequences per decode-attention call")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per measurement")
    args = p.parse_args(argv)
    from moe_engine.cli import check_output_path
    check_output_path(args.out, folder=False)       # before the measurements, not after
    if not torch.cuda.is_available():
        print("bench_kernels: a CUDA GPU is needed to measure the kernels, and none is visible; nothing was run")
        return 1
    if triton_version() is None:
        print("bench_kernels: the triton package is needed: pip install 'moe-engine[triton]'")
        return 1
    device = torch.device("cuda")
    report = run_suite(device, MOE_SPECS, TOKEN_COUNTS, DECODE_SPECS, CONTEXTS, args.batch, args.min_time,
                       copy_bytes=2 ** 30, matmul_n=8192)
    print_table(report["results"], report["limits"], report["device"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
