"""Triton kernels against their torch references: small ragged shapes under the interpreter, full sizes on a GPU."""

import random

import pytest
import torch

import kernels
from kernels.attention import AttentionMetadata
from kernels.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """Largest error relative to the largest expected magnitude, so near-zero entries don't dominate."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() or 1.0
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g} (tol {tol})"


# ---------------------------------------------------------------- fused MoE

def ragged_routing(T: int, E: int, k: int, gen: torch.Generator):
    """topk ids where expert 0 gets no token and expert 1 exactly one; the rest share the others."""
    ids = torch.stack([2 + torch.randperm(E - 2, generator=gen)[:k] for _ in range(T)])  # [T, k]
    ids[0, 0] = 1
    weights = torch.rand(T, k, generator=gen)                                            # [T, k]
    return weights / weights.sum(-1, keepdim=True), ids


def moe_inputs(T, D, I, E, k, dtype, device="cpu", seed=0):
    """Weights drawn on the device itself (a CPU generator takes ~10 s for Mixtral's), routing on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    on_device = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    w13 = torch.randn(E, 2 * I, D, generator=on_device, device=device) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=on_device, device=device) / I ** 0.5
    weights, ids = ragged_routing(T, E, k, gen)
    cast = dict(dtype=dtype, device=device)
    return x.to(**cast), w13.to(**cast), w2.to(**cast), weights.to(device), ids.to(device)


def moe_expected(x, w13, w2, weights, ids):
    """The reference in float32 on the same (rounded) inputs, cast to the input dtype."""
    return kernels.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids).to(x.dtype)


# (T, D, I, E, k): T = 1; ragged D and I; k = 1 (no sum); many tokens per expert (several blocks, torch align)
MOE_SHAPES = [(1, 40, 24, 4, 2), (9, 48, 40, 6, 2), (33, 32, 16, 3, 1), (20, 24, 56, 8, 3), (40, 16, 20, 5, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "T{}-D{}-I{}-E{}-k{}".format(*s))
def test_fused_moe_triton_matches_reference(shape, dtype):
    args = moe_inputs(*shape, dtype)
    assert_close(kernels.fused_moe(*args, backend="triton"), moe_expected(*args), TOL[dtype])


def test_fused_moe_larger_tiles_and_unaligned_strides():
    from kernels.triton_moe import fused_moe_triton
    from kernels.tuning import GemmTile, MoETuning
    x, w13, w2, weights, ids = moe_inputs(12, 40, 24, 5, 2, torch.float32)
    wide = torch.cat([w13, torch.zeros_like(w13)], dim=2)[:, :, :40]                    # strided view
    tuning = MoETuning(32, GemmTile(32, 64, 4), GemmTile(64, 16, 1), triton_align_max=0)  # torch align
    assert_close(fused_moe_triton(x, wide, w2, weights, ids, tuning), moe_expected(x, w13, w2, weights, ids), 1e-5)


@pytest.mark.parametrize("n,E,bm", [(1, 4, 16), (7, 3, 16), (60, 8, 16), (200, 64, 32), (45, 5, 64)])
def test_align_kernel_matches_torch_align(n, E, bm):
    from kernels.triton_moe import align_by_expert, align_by_expert_torch
    from kernels.tuning import GemmTile, MoETuning
    ids = torch.randint(1, E, (n, 1)) if E > 1 else torch.zeros(n, 1, dtype=torch.long)  # expert 0 empty
    tile = GemmTile(16, 16)
    sorted_pairs, block_expert = align_by_expert(ids, E, MoETuning(bm, tile, tile, triton_align_max=10 ** 9))
    want_pairs, want_blocks = align_by_expert_torch(ids, E, bm, sorted_pairs.numel(), block_expert.numel())
    assert torch.equal(sorted_pairs, want_pairs) and torch.equal(block_expert, want_blocks)
    # Every pair appears once, in a block of its own expert, and each expert's rows start a block.
    real = sorted_pairs < n
    assert sorted(sorted_pairs[real].tolist()) == list(range(n))
    owner = block_expert.repeat_interleave(bm)[real]
    assert torch.equal(owner.long(), ids.reshape(-1)[sorted_pairs[real].long()])


def test_fused_moe_dispatch():
    args = moe_inputs(5, 16, 16, 4, 2, torch.float32)
    ref = kernels.fused_moe_ref(*args)
    assert torch.equal(kernels.fused_moe(*args), ref)                   # auto on CPU: the reference
    assert torch.equal(kernels.fused_moe(*args, backend="torch"), ref)
    with pytest.raises(ValueError, match="backend"):
        kernels.fused_moe(*args, backend="cuda")
    with pytest.raises(ValueError, match="w2"):
        kernels.fused_moe(args[0], args[1], args[2][:, :, :8], *args[3:], backend="triton")


# ---------------------------------------------------------------- paged decode attention

def paged_batch(context_lens, page_size, num_pages, seed=0, query_lens=None, device="cpu"):
    """Metadata whose sequences own shuffled, non-contiguous pages of a cache with num_pages pages."""
    rng = random.Random(seed)
    pages = list(range(num_pages))
    rng.shuffle(pages)
    tables = []
    for n in context_lens:
        need = -(-n // page_size)
        tables.append(pages[:need])
        pages = pages[need:]
    query_lens = query_lens or [1] * len(context_lens)
    return AttentionMetadata.build(tables, context_lens, query_lens, page_size, torch.device(device))


def attention_expected(q, k_cache, v_cache, meta, scale):
    return kernels.paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale).to(q.dtype)


# (H, Hkv, Dk, Dv, page_size, context_lens, num_splits): GQA, MQA, MHA, ragged head dims and contexts
GQA_CASES = [
    (4, 2, 16, 16, 4, [5, 13, 1], None),
    (8, 1, 20, 12, 16, [37, 16, 3], None),
    (4, 4, 32, 32, 8, [1, 50], 1),
    (6, 2, 16, 24, 4, [29, 7, 64], 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: "H{}-Hkv{}-Dk{}-Dv{}-page{}".format(*c[:5]))
def test_paged_decode_gqa_matches_reference(case, dtype):
    from kernels.triton_attention import paged_decode_triton
    H, Hkv, Dk, Dv, page, ctx, splits = case
    num_pages = sum(-(-n // page) for n in ctx) + 3
    meta, S = paged_batch(ctx, page, num_pages), num_pages * page
    q = torch.randn(len(ctx), H, Dk).to(dtype)
    k_cache, v_cache = torch.randn(S, Hkv, Dk).to(dtype), torch.randn(S, Hkv, Dv).to(dtype)
    scale = Dk ** -0.5
    expected = attention_expected(q, k_cache, v_cache, meta, scale)
    assert_close(kernels.paged_attention(q, k_cache, v_cache, meta, scale, backend="triton"), expected, TOL[dtype])
    out = paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor, page, scale,
                              max(ctx), num_splits=splits)
    assert_close(out, expected, TOL[dtype])


# (H, Hkv, page_size, context_lens, window, sinks, num_splits): gpt-oss's sinks and sliding windows, one
# split and several (the sink then joins in the combine), windows shorter and longer than the contexts.
SINK_CASES = [
    (4, 2, 4, [5, 13, 1, 30], 8, True, 1),
    (4, 2, 4, [5, 13, 1, 30], 8, True, 3),
    (8, 1, 16, [37, 16, 3], None, True, 2),
    (4, 4, 8, [1, 50, 9], 6, False, 3),
    (6, 2, 4, [29, 7], 64, True, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: "H{}-Hkv{}-page{}-w{}-sinks{}-splits{}".format(
    *c[:3], *c[4:]))
def test_paged_decode_sinks_and_window_match_reference(case, dtype):
    from kernels.triton_attention import paged_decode_triton
    H, Hkv, page, ctx, window, has_sinks, splits = case
    num_pages = sum(-(-n // page) for n in ctx) + 3
    meta, S = paged_batch(ctx, page, num_pages, seed=2), num_pages * page
    q = torch.randn(len(ctx), H, 16).to(dtype)
    k_cache, v_cache = torch.randn(S, Hkv, 16).to(dtype), torch.randn(S, Hkv, 16).to(dtype)
    sinks = 2 * torch.randn(H) if has_sinks else None
    expected = kernels.paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, 0.25, sinks,
                                           window).to(dtype)
    assert_close(kernels.paged_attention(q, k_cache, v_cache, meta, 0.25, backend="triton", sinks=sinks,
                                         window=window), expected, TOL[dtype])
    out = paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor, page, 0.25,
                              max(ctx), num_splits=splits, sinks=sinks, window=window)
    assert_close(out, expected, TOL[dtype])
    plain = kernels.paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, 0.25).to(dtype)
    assert (expected - plain).abs().max() > 0.05          # the sinks / window really change the answer


# (H, L, R, page_size, context_lens): heads within one block, heads over two blocks, ragged rope width
MLA_CASES = [(4, 16, 4, 4, [9, 1, 22]), (20, 32, 8, 16, [40, 17]), (16, 32, 16, 8, [3])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: "H{}-L{}-R{}-page{}".format(*c[:4]))
def test_mla_latent_decode_matches_reference(case, dtype):
    from kernels.triton_attention import value_inside_key
    H, L, R, page, ctx = case
    num_pages = sum(-(-n // page) for n in ctx) + 2
    meta = paged_batch(ctx, page, num_pages, seed=1)
    cache = torch.randn(num_pages * page, L + R).to(dtype)                               # [S, L + R]
    entries = cache[:, None, :]                                                          # [S, 1, L + R]
    assert value_inside_key(entries, entries[..., :L])
    q = torch.randn(len(ctx), H, L + R).to(dtype)
    scale = 0.7 * (L + R) ** -0.5
    out = kernels.paged_attention(q, entries, entries[..., :L], meta, scale, backend="triton")   # [B, H, L]
    assert_close(out, attention_expected(q, entries, entries[..., :L], meta, scale), TOL[dtype])


def test_paged_attention_dispatch():
    meta = paged_batch([6, 3], 4, 6)
    q, k_cache, v_cache = torch.randn(2, 4, 16), torch.randn(24, 2, 16), torch.randn(24, 2, 16)
    ref = kernels.paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    assert torch.equal(kernels.paged_attention(q, k_cache, v_cache, meta, 0.25), ref)   # auto on CPU
    assert meta.is_decode and torch.equal(meta.context_lens_tensor, torch.tensor([6, 3], dtype=torch.int32))
    prefill = paged_batch([6, 3], 4, 6, query_lens=[6, 1])           # prefill stays on the reference
    q = torch.randn(7, 4, 16)
    assert not prefill.is_decode
    assert torch.equal(kernels.paged_attention(q, k_cache, v_cache, prefill, 0.25, backend="triton"),
                       kernels.paged_attention_ref(q, k_cache, v_cache, prefill, 0.25))


# ---------------------------------------------------------------- full sizes on a GPU

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "T{}-D{}-I{}-E{}-k{}".format(*s))
def test_fused_moe_gpu_small_float32(shape):
    args = moe_inputs(*shape, torch.float32, device="cuda")
    assert_close(kernels.fused_moe(*args), moe_expected(*args), 1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("E,D,I,k", [(8, 4096, 14336, 2), (64, 2048, 1408, 6)], ids=["mixtral", "deepseek-v2-lite"])
@pytest.mark.parametrize("T", [1, 16, 256, 4096])
def test_fused_moe_gpu_full_size(E, D, I, k, T):
    args = moe_inputs(T, D, I, E, k, torch.bfloat16, device="cuda")
    assert_close(kernels.fused_moe(*args), moe_expected(*args), TOL[torch.bfloat16])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: "H{}-Hkv{}-Dk{}-Dv{}-page{}".format(*c[:5]))
def test_paged_decode_gpu_small_float32(case):
    H, Hkv, Dk, Dv, page, ctx, _ = case
    num_pages = sum(-(-n // page) for n in ctx) + 3
    meta, S = paged_batch(ctx, page, num_pages, device="cuda"), num_pages * page
    q, k_cache, v_cache = (torch.randn(len(ctx), H, Dk, device="cuda"), torch.randn(S, Hkv, Dk, device="cuda"),
                           torch.randn(S, Hkv, Dv, device="cuda"))
    assert_close(kernels.paged_attention(q, k_cache, v_cache, meta, 0.3),
                 attention_expected(q, k_cache, v_cache, meta, 0.3), 1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mla", [False, True], ids=["gqa-32x8x128", "mla-128x(512+64)"])
def test_paged_decode_gpu_full_size(mla):
    ctx, page = [1, 1000, 4097, 16384], 64 if mla else 16
    num_pages = sum(-(-n // page) for n in ctx) + 8
    meta = paged_batch(ctx, page, num_pages, seed=2, device="cuda")
    S, dt = num_pages * page, dict(dtype=torch.bfloat16, device="cuda")
    if mla:
        entries = torch.randn(S, 1, 576, **dt)
        q, k_cache, v_cache, scale = torch.randn(len(ctx), 128, 576, **dt), entries, entries[..., :512], 0.07
    else:
        q, scale = torch.randn(len(ctx), 32, 128, **dt), 128 ** -0.5
        k_cache, v_cache = torch.randn(S, 8, 128, **dt), torch.randn(S, 8, 128, **dt)
    assert_close(kernels.paged_attention(q, k_cache, v_cache, meta, scale),
                 attention_expected(q, k_cache, v_cache, meta, scale), TOL[torch.bfloat16])


# ---------------------------------------------------------------- benchmark script

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_kernels_needs_cuda(capsys, tmp_path):
    from moe_engine.bench import kernels as bench_kernels
    assert bench_kernels.main(["--out", str(tmp_path / "k.json")]) == 1
    assert "CUDA GPU is needed" in capsys.readouterr().out and not (tmp_path / "k.json").exists()


def test_bench_suite_runs_tiny_on_cpu():
    """The benchmark's code paths (limits, baselines, grouped_mm, ratios, JSON) on tiny shapes."""
    import json
    from moe_engine.bench import kernels as bench
    report = bench.run_suite(torch.device("cpu"), [bench.MoESpec("tiny", 4, 32, 48, 2)], [3],
                             [bench.DecodeSpec("mla", 4, 0, 40, 32)], [20], batch=2, min_time=0.0,
                             copy_bytes=2 ** 16, matmul_n=32, dtype=torch.float32)
    moe, decode = report["results"]
    assert moe["rel_error"] < 1e-5 and decode["rel_error"] < 1e-5
    for key in ("TFLOPps", "GBps", "frac_of_copy_bw", "frac_of_matmul", "speedup_vs_loop", "speedup_vs_reference"):
        assert (moe.get(key) or decode.get(key)) > 0
    json.dumps(report)


def test_tuner_picks_checked_tiles_and_its_file_is_used(tmp_path, monkeypatch):
    """bench tune's search on a tiny shape under the interpreter: every candidate is checked against the
    reference, the winner is one of them, and MOE_ENGINE_TUNING makes moe_tuning return it."""
    import json
    from kernels import tuning
    from moe_engine.bench import kernels as bench_kernels, tune as bench_tune
    spec = bench_kernels.MoESpec("tiny", 4, 32, 48, 2)
    candidates = [tuning.GemmTile(16, 16, 1, 1, 1), tuning.GemmTile(32, 16, 1, 1, 1)]
    entry = bench_tune.tune_shape(spec, torch.device("cpu"), torch.float32, 0.0, candidates, tokens=[1, 3])
    assert all(t["ok"] and t["rel_error"] < 1e-5 for t in entry["trials"])
    assert tuple(entry["gate_up"]) in [tuple(vars(c).values()) for c in candidates]
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"moe": [entry]}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    chosen = tuning.moe_tuning(torch.device("cpu"), 2, 4, torch.float16, 32, 48)
    assert chosen == tuning.moe_tuning_from_json(entry)
    assert tuning.moe_tuning(torch.device("cpu"), 2, 4, torch.float16, 32, 64) != chosen   # another shape
    path.with_name("bad.json").write_text("{}")
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path.with_name("bad.json")))
    with pytest.raises(ValueError, match="MOE_ENGINE_TUNING"):
        tuning.moe_tuning(torch.device("cpu"), 2, 4, torch.float16, 32, 48)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [40, 256])
@pytest.mark.parametrize("residual_kind", [None, "rows", "strided"])
def test_rms_norm_triton_matches_reference(dtype, D, residual_kind):
    """Residual: none, plain rows, or one whose last dim is strided (not for the kernel: the reference)."""
    from kernels.pointwise import rms_norm
    x = torch.randn(5, 2 * D, dtype=dtype)[:, :D]                  # rows with a stride, as a slice would have
    residual = {None: None, "rows": torch.randn(5, D, dtype=dtype),
                "strided": torch.randn(D, 5, dtype=dtype).t()}[residual_kind]
    weight = (1 + 0.1 * torch.randn(D)).to(dtype)
    out, total = rms_norm(x, weight, 1e-6, residual, backend="triton")
    ref_out, ref_total = rms_norm(x, weight, 1e-6, residual, backend="torch")
    assert torch.equal(total, ref_total)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert rel_err(out, ref_out) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("H,R", [(5, 16), (20, 64)])
def test_rotary_triton_matches_reference(dtype, interleave, H, R):
    from kernels.pointwise import rotary
    T = 3
    qkv = torch.randn(T, H + 2, R, dtype=dtype)
    x = qkv[:, :H]                                                  # a strided view, as the models pass it
    angles = torch.rand(T, 1, R // 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = rotary(x, cos, sin, interleave, backend="triton")
    ref = rotary(x, cos, sin, interleave, backend="torch")
    assert out.shape == (T, H, R) and out.is_contiguous()
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("T,D", [(1, 256), (5, 96), (33, 64)])
def test_rms_norm_cpu_matches_reference(T, D):
    """The CPU float32 norm in fewer torch calls: F.rms_norm's result, with and without the residual add
    before it, and with eps dominating a tiny input (added, not dropped)."""
    from kernels.pointwise import rms_norm, rms_norm_ref
    g = torch.Generator().manual_seed(T * D)
    x, residual = torch.randn(T, D, generator=g) * 3, torch.randn(T, D, generator=g)
    weight = 1 + 0.1 * torch.randn(D, generator=g)
    out, total = rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(total, x + residual)
    assert rel_err(out, rms_norm_ref(x + residual, weight, 1e-6)) < 1e-6
    tiny = torch.full((1, D), 1e-4)
    assert rel_err(rms_norm(tiny, weight, 1e-6)[0], rms_norm_ref(tiny, weight, 1e-6)) < 1e-6


def test_rms_norm_takes_the_cpu_form_with_eps_held_in_kernels(monkeypatch):
    """A float32 norm of CPU tensors goes through rms_norm_cpu with eps as a [1, 1] cell that kernels/ makes
    once per value (eagerly) or inside the graph (while torch.compile traces); backend 'torch' is the reference."""
    from kernels import pointwise
    cells = []
    real = pointwise.rms_norm_cpu
    monkeypatch.setattr(pointwise, "rms_norm_cpu", lambda x, w, cell: cells.append(cell) or real(x, w, cell))
    x, weight = torch.randn(3, 16), torch.rand(16)
    pointwise.rms_norm(x, weight, 1e-5)
    pointwise.rms_norm(x, weight, 1e-5)
    pointwise.rms_norm(x, weight, 1e-5, backend="torch")
    assert len(cells) == 2 and cells[0] is cells[1] and cells[0].item() == torch.tensor(1e-5).item()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    pointwise.rms_norm(x, weight, 1e-5)
    assert len(cells) == 3 and cells[2] is not cells[0] and torch.equal(cells[2], cells[0])


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_swapped_equals_reference(interleave, dtype):
    """The four-call CPU rotation does the reference's floating-point operations: equal, not just close."""
    from kernels.pointwise import rotary_ref, rotary_swapped, spread_angles
    T, H, R = 4, 6, 16
    qkv = torch.randn(T, H + 2, R).to(dtype)
    angles = torch.rand(T, 1, R // 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = rotary_swapped(qkv[:, :H], *spread_angles(cos, sin, interleave), interleave)
    assert torch.equal(out, rotary_ref(qkv[:, :H], cos, sin, interleave))


@pytest.mark.parametrize("interleave", [False, True])
def test_angle_entries_cpu_forms_equal_half_angle_forms(interleave):
    """rotate, absorbed_query and write_rotated_latent with the CPU's spread angles (what rotary_angles
    gives on the CPU) against the same entries handed only the half-width angles (the path the kernels
    take on CUDA, here their torch references): rotations equal, the cache rows equal up to the norm's
    last bit (rms_norm_cpu against rms_norm_ref)."""
    T, H, nope, R, L = 3, 4, 8, 16, 32
    g = torch.Generator().manual_seed(7)
    theta = torch.rand(T, 1, R // 2, generator=g) * 6
    spread = kernels.rotary_angles(theta.cos(), theta.sin(), interleave)
    assert spread.spread is not None                           # the CPU rotates in torch
    half = kernels.RotaryAngles(spread.cos, spread.sin, None)
    x = torch.randn(T, H, R, generator=g)
    assert torch.equal(kernels.rotate(x, spread, interleave), kernels.rotate(x, half, interleave))
    q, w_uk = torch.randn(T, H, nope + R, generator=g), torch.randn(H, nope, L, generator=g)
    assert torch.equal(kernels.absorbed_query(q, nope, w_uk, spread, interleave),
                       kernels.absorbed_query(q, nope, w_uk, half, interleave))
    kv, weight = torch.randn(T, L + R, generator=g), 1 + 0.1 * torch.randn(L, generator=g)
    slots = torch.tensor([5, 0, 2])
    caches = [torch.zeros(8, L + R) for _ in range(2)]
    kernels.write_rotated_latent(caches[0], kv, weight, 1e-6, spread, interleave, slots)
    kernels.write_rotated_latent(caches[1], kv, weight, 1e-6, half, interleave, slots)
    assert torch.equal(caches[0][:, L:], caches[1][:, L:]) and caches[0][slots].abs().sum() > 0
    assert rel_err(caches[0][:, :L], caches[1][:, :L]) < 1e-6


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek"])
def test_models_with_triton_norm_and_rotary_match(model, monkeypatch):
    """The whole model with every norm and rotation through the Triton kernels (interpreter on the CPU):
    the shapes and strides the models really pass, e.g. MLA's rope key [T, 1, R] and q/k slices of qkv."""
    from kernels import pointwise
    from moe_engine.llm import LLM
    from tests.conftest import WEIGHTS
    llm = LLM(WEIGHTS / model, num_kv_blocks=8)
    ids = list(range(7, 40))
    expected = llm.prompt_logits(ids)
    calls = []
    monkeypatch.setattr(pointwise, "use_triton", lambda backend, *t: calls.append(1) or True)   # rotary
    monkeypatch.setattr(pointwise, "form", lambda backend, *t: calls.append(1) or "triton")   # rms_norm
    assert rel_err(llm.prompt_logits(ids), expected) < 1e-5
    assert len(calls) >= 3 * len(llm.model.layers)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("interleave", [False, True])
def test_norm_and_rotary_gpu_bfloat16(interleave):
    from kernels.pointwise import rms_norm, rotary
    dt = dict(dtype=torch.bfloat16, device="cuda")
    x, residual, weight = torch.randn(7, 4096, **dt), torch.randn(7, 4096, **dt), 1 + 0.1 * torch.randn(4096, **dt)
    out, total = rms_norm(x, weight, 1e-5, residual, backend="triton")
    ref_out, ref_total = rms_norm(x, weight, 1e-5, residual, backend="torch")
    assert torch.equal(total, ref_total) and rel_err(out, ref_out) < 1e-2
    qkv = torch.randn(7, 48, 128, **dt)
    angles = torch.rand(7, 1, 64, device="cuda") * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    assert rel_err(rotary(qkv[:, :40], cos, sin, interleave, backend="triton"),
                   rotary(qkv[:, :40], cos, sin, interleave, backend="torch")) < 1e-2
    from kernels.pointwise import write_latent_cache
    kv, slots = torch.randn(7, 600, **dt)[:, :576], torch.randperm(50, device="cuda")[:7]
    caches = [torch.zeros(50, 576, **dt) for _ in range(2)]
    for cache, backend in zip(caches, ("triton", "torch")):
        write_latent_cache(cache, kv, weight[:512], 1e-6, angles.cos().bfloat16()[:, :, :32],
                           angles.sin().bfloat16()[:, :, :32], interleave, slots, backend=backend)
    assert rel_err(*caches) < 1e-2
    untouched = torch.ones(50, dtype=torch.bool, device="cuda").index_fill_(0, slots, False)
    assert not caches[0][untouched].any()
    from kernels.mla import absorb_query   # DeepSeek-V2-Lite's MLA: 16 heads, nope 128, latent 512, rope 64
    q, w_uk = torch.randn(7, 16, 192, **dt), torch.randn(16, 128, 512, **dt) / 128 ** 0.5
    half_angles = (angles.cos().bfloat16()[:, :, :32], angles.sin().bfloat16()[:, :, :32])
    assert rel_err(absorb_query(q, 128, w_uk, *half_angles, interleave, backend="triton"),
                   absorb_query(q, 128, w_uk, *half_angles, interleave, backend="torch")) < 1e-2


@pytest.mark.parametrize("mla", [False, True])
def test_paged_decode_on_static_metadata(mla):
    """The graph step's metadata (device tensors only, block tables as a strided view of a wider buffer,
    the launch sized by a max_context bound) through the kernel equals the plain metadata's reference."""
    ctx, page, num_pages, bound = [5, 21, 1], 4, 24, 40
    meta = paged_batch(ctx, page, num_pages)
    buffer = torch.full((3, 4 + bound // page), 7, dtype=torch.int32)     # stale entries past each table
    buffer[:, 4:4 + meta.block_tables.shape[1]] = meta.block_tables
    buffer[:, 3] = torch.tensor(ctx, dtype=torch.int32)
    static = AttentionMetadata.static_decode(meta.slot_mapping, buffer[:, 4:], buffer[:, 3].contiguous(), page, bound)
    S = num_pages * page
    if mla:
        H, L, R = 4, 32, 8
        entries = torch.randn(S, 1, L + R)
        q, k_cache, v_cache = torch.randn(3, H, L + R), entries, entries[..., :L]
    else:
        q, k_cache, v_cache = torch.randn(3, 4, 16), torch.randn(S, 2, 16), torch.randn(S, 2, 16)
    expected = kernels.paged_attention_ref(q, k_cache, v_cache, meta, 0.3)
    assert_close(kernels.paged_attention(q, k_cache, v_cache, static, 0.3, backend="triton"), expected, 1e-5)
    assert_close(kernels.paged_attention_ref(q, k_cache, v_cache, static, 0.3), expected, 1e-5)
