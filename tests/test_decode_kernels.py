"""The decode-sized Triton kernels against torch: the few-token MoE (kernels/triton_moe_gemv.py) against
the MoE reference plus the shared SwiGLU, the GEMV (kernels/triton_gemv.py) against F.linear, the
one-program routing against model_defs.moe.route, MLA's cache write and absorbed query against the torch
ops they replace, and the tuners and tuning files; under the interpreter here, at full size and in the
models on a GPU."""

import json

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.backend import triton_available
from kernels.tuning import GemmTile, device_key
from model_defs.moe import RoutingConfig, route
from tests.test_cuda_graphs import run
from tests.test_kernels import TOL, assert_close, moe_expected, moe_inputs, rel_err

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# (T, N, K, tile): ragged N and K against the tile, a row or a few, K shorter than one step
@pytest.mark.parametrize("case", [(1, 40, 72, GemmTile(16, 32, 1, 1, 1)), (3, 24, 100, GemmTile(8, 64, 1, 1, 1)),
                                  (2, 17, 20, GemmTile(16, 32, 1, 1, 1))], ids=["T1", "T3", "short-K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_matches_linear(case, dtype):
    from kernels.triton_gemv import gemv_triton
    T, N, K, tile = case
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(T, K, generator=gen), torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    want = F.linear(x, w, b)
    assert_close(gemv_triton(x.to(dtype), w.to(dtype), tile, b.to(dtype)), want.to(dtype), TOL[dtype])
    # The router's case: rows of the activation dtype, float32 weights, a float32 result without rounding.
    got = gemv_triton(x.to(dtype), w, tile, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert_close(got, F.linear(x.to(dtype).float(), w), 1e-5)


ROUTINGS = {
    "mixtral": RoutingConfig(8, 2),
    "v2-unnormalised-scaled": RoutingConfig(16, 6, norm_topk_prob=False, routed_scaling_factor=2.5,
                                            scale_normalized=False),
    "v2-normalised": RoutingConfig(16, 3, norm_topk_prob=True, routed_scaling_factor=2.5, scale_normalized=False),
    "v3-sigmoid-bias": RoutingConfig(12, 4, scoring="sigmoid", routed_scaling_factor=2.5, has_bias=True),
    "top-1": RoutingConfig(5, 1, norm_topk_prob=True, routed_scaling_factor=3.0, scale_normalized=False),
    "v2-group-limited": RoutingConfig(16, 3, method="group_limited_greedy", n_group=4, topk_group=2,
                                      norm_topk_prob=False, routed_scaling_factor=1.5, scale_normalized=False),
    "v3-noaux-tc": RoutingConfig(16, 4, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, has_bias=True),
    "v3-noaux-tc-ragged": RoutingConfig(24, 6, scoring="sigmoid", method="noaux_tc", n_group=3, topk_group=2,
                                        routed_scaling_factor=2.5, has_bias=True),   # 8 per group, E not 2^n
    "noaux-tc-groups-of-one": RoutingConfig(6, 2, scoring="sigmoid", method="noaux_tc", n_group=6,
                                           topk_group=3, has_bias=True),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_kernel_matches_route(name):
    """Every routing variant in one program per token against model_defs.moe.route: the same experts in
    the same order, the same weights; the group-limited ones on logits where the group limit changes the
    choice (else the test could not tell a kernel that ignores groups), and groups of one expert."""
    from kernels.triton_gemv import route_triton
    cfg = ROUTINGS[name]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, cfg.num_experts, generator=gen) * 3                     # [T, E]
    bias = torch.randn(cfg.num_experts, generator=gen) if cfg.has_bias else None
    want_w, want_ids = route(logits, cfg, bias)                                   # torch: ranked, best first
    normalize, scaling = cfg.weight_rule(cfg.top_k)
    got_w, got_ids = route_triton(logits, cfg.top_k, cfg.scoring == "sigmoid", bias, normalize, scaling,
                                  cfg.method, cfg.n_group, cfg.topk_group)
    assert torch.equal(got_ids, want_ids)
    assert torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    if cfg.method != "greedy" and cfg.n_group < cfg.num_experts:     # (groups of one cannot limit anything)
        ungrouped = RoutingConfig(cfg.num_experts, cfg.top_k, cfg.scoring, "greedy", has_bias=cfg.has_bias)
        assert not torch.equal(route(logits, ungrouped, bias)[1], want_ids)


def last_win(versus: list[dict]) -> int:
    """The tuners' max_tokens, recomputed: the last token count, in the order measured, where the kernel
    was faster, stopping at the first where it was not (0 if it never was)."""
    won = 0
    for row in versus:
        if row["ours_s"] >= row["theirs_s"]:
            break
        won = row["T"]
    return won


def tuning_for_every_weight(llm, path, tile=GemmTile(16, 64, 1, 4, 2)):
    """A tuning file that sends each 2-D weight of the model (incl. the float32 routers) to the GEMV."""
    shapes = {(tuple(p.shape), str(p.dtype).removeprefix("torch.")) for p in llm.model.parameters() if p.dim() == 2}
    entries = [{"device": device_key(torch.device("cuda")), "n": n, "k": k, "dtype": d, "tile": list(vars(tile).values()),
                "max_tokens": 8} for (n, k), d in shapes]
    path.write_text(json.dumps({"moe": [], "linear": entries}))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek"])
def test_gpu_gemv_projections_and_fused_routing_match_cpu(model, tmp_path, monkeypatch):
    """Every projection through the GEMV (decode batches up to 8), and the same with every decode-sized
    Triton kernel turned off, each graphed in float32: the CPU path's greedy tokens (which match
    transformers)."""
    cpu, _, _ = run(model, graphs=False)
    on, off = tmp_path / "on.json", tmp_path / "off.json"
    _, _, llm = run(model, graphs=False, device="cuda", dtype=torch.float32, max_num_seqs=1)
    tuning_for_every_weight(llm, on)
    off.write_text(json.dumps({"moe": [], "disable": ["gemv", "linear", "route", "latent_cache", "absorb_query"]}))
    import kernels.triton_gemv as tg
    import kernels.triton_moe_gemv as tmg
    used = {}
    for module, name in [(tg, "gemv_triton"), (tg, "route_triton"), (tmg, "fused_moe_gemv")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw:
                            used.__setitem__(_name, used.get(_name, 0) + 1) or _real(*a, **kw))
    for path in (on, off):
        used.clear()
        monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
        graphed, calls, _ = run(model, graphs=True, device="cuda", dtype=torch.float32)
        assert graphed == cpu and calls, path.name
        assert sorted(used) == ([] if path == off else ["fused_moe_gemv", "gemv_triton", "route_triton"]), path.name


def test_linear_tuner_covers_every_weight_and_checks_its_tiles():
    """bench tune's GEMV search on the tiny DeepSeek shape under the interpreter (plain timing): an entry
    per distinct 2-D weight, every tile checked against F.linear, max_tokens where the GEMV won."""
    from moe_engine.bench.kernels import time_call
    from moe_engine.bench.tune_gemv import dense_weights, tune_linear
    weights = dense_weights(["deepseek-tiny"], torch.float32)
    assert (8, 64, torch.float32) in weights and (512, 64, torch.float32) in weights   # router, lm_head
    tiles = [GemmTile(16, 32, 1, 1, 1), GemmTile(8, 64, 1, 1, 1)]
    entries = tune_linear(["deepseek-tiny"], torch.device("cpu"), torch.float32, 0.0, tiles, tokens=[1, 2],
                          timer=time_call)
    assert [(e["n"], e["k"]) for e in entries] == [(n, k) for n, k, _ in weights]
    for e in entries:
        assert e["trials"] and all(t["rel_error"] < 1e-5 for t in e["trials"])
        assert e["max_tokens"] == last_win(e["versus"])


def test_a_tuning_file_turns_decode_kernels_off(tmp_path, monkeypatch):
    """"disable" in MOE_ENGINE_TUNING sends each kind of decode kernel back to its torch path (the A/B
    switch of examples/profile_decode.py); other kinds stay on."""
    import importlib
    from kernels import tuning
    from kernels.mla import absorb_query
    from kernels.pointwise import write_latent_cache
    path = tmp_path / "off.json"
    path.write_text(json.dumps({"moe": [], "disable": ["absorb_query", "latent_cache", "gemv"]}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    for module, name in [("kernels.triton_mla", "absorb_query_triton"), ("kernels.triton_pointwise", "latent_cache_triton")]:
        monkeypatch.setattr(importlib.import_module(module), name, lambda *a, _n=name: pytest.fail(f"{_n} ran"))
    q, w_uk = torch.randn(1, 2, 12), torch.randn(2, 8, 16)
    angles = torch.rand(1, 1, 2)
    assert absorb_query(q, 8, w_uk, angles.cos(), angles.sin(), True, backend="triton").shape == (1, 2, 20)
    cache = torch.zeros(4, 20)
    write_latent_cache(cache, torch.randn(1, 20), torch.ones(16), 1e-6, angles.cos(), angles.sin(), True,
                       torch.tensor([2]), backend="triton")
    assert cache[2].abs().sum() > 0
    assert tuning.disabled("gemv") and not tuning.disabled("route")
    assert tuning.gemv_tuning(torch.device("cpu"), 16, 8).max_tokens == 0


@pytest.mark.parametrize("bad", [{"disable": "gemv"}, {"disable": ["gmv"]},
                                 {"gemv": [{"device": "sm90", "dim": 8, "inter": 8, "gate_up": [3, 64, 1, 4, 2],
                                            "down": [8, 64, 1, 4, 2]}]},
                                 {"gemv": [{"device": "sm90", "dim": 8, "inter": 8, "gate_up": [8, 64, 1, 4, 2],
                                            "down": [8, 64, 1, 4, 2], "stacked_down": "false"}]},
                                 {"linear": [{"device": "sm90", "n": 8, "k": 8, "dtype": "bfloat16",
                                              "tile": [8, 64, 1, 4, 2], "max_tokens": "2"}]},
                                 {"linear": [{"device": "sm90", "n": 8, "k": 8, "dtype": "bfloat16",
                                              "tile": [8, 64, 1, 4, 2], "max_tokens": 100000}]}],
                         ids=["disable-string", "disable-unknown", "block-not-power-of-2", "stacked-string",
                              "max-tokens-string", "max-tokens-huge"])
def test_a_bad_tuning_file_is_one_clear_error(bad, tmp_path, monkeypatch):
    from kernels import tuning
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"moe": [], **bad}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    with pytest.raises(ValueError, match="MOE_ENGINE_TUNING=.*not a tuning file") as err:
        tuning.disabled("gemv")
    assert "\n" not in str(err.value)


def test_disable_linear_beats_the_files_own_entries(tmp_path, monkeypatch):
    from kernels import tuning
    entry = {"device": "interpreter", "n": 8, "k": 8, "dtype": "float32", "tile": [8, 64, 1, 4, 2], "max_tokens": 2}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"moe": [], "linear": [entry]}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    assert tuning.linear_tuning(torch.device("cpu"), 8, 8, torch.float32).max_tokens == 2
    off = tmp_path / "off.json"
    off.write_text(json.dumps({"moe": [], "linear": [entry], "disable": ["linear"]}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(off))
    assert tuning.linear_tuning(torch.device("cpu"), 8, 8, torch.float32) is None


# ---------------------------------------------------------------- few-token MoE, MLA

def shared_inputs(D, I_s, dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    w13s = torch.randn(2 * I_s, D, generator=gen) / D ** 0.5
    w2s = torch.randn(D, I_s, generator=gen) / I_s ** 0.5
    return w13s.to(dtype=dtype, device=device), w2s.to(dtype=dtype, device=device)


def moe_with_shared_expected(x, w13, w2, weights, ids, shared):
    """Routed experts plus the shared SwiGLU, both from the float32 references."""
    w13s, w2s = (w.float() for w in shared)
    gate, up = (x.float() @ w13s.t()).chunk(2, dim=-1)
    routed = kernels.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    return (routed + (torch.nn.functional.silu(gate) * up) @ w2s.t()).to(x.dtype)


# (T, D, I, E, k, shared slices): ragged D and I against the interpreter tiles (16/8 x 32), one token
# and a few, k = 1, shared experts of 1 and 2 routed widths
GEMV_SHAPES = [(1, 40, 24, 4, 2, 0), (1, 72, 40, 6, 3, 2), (3, 48, 20, 5, 2, 1), (2, 24, 56, 8, 1, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: "T{}-D{}-I{}-E{}-k{}-S{}".format(*s))
@pytest.mark.parametrize("stacked", [False, True], ids=["down-by-expert", "down-stacked"])
def test_fused_moe_gemv_matches_reference(shape, dtype, stacked):
    from dataclasses import replace
    from kernels.triton_moe_gemv import fused_moe_gemv
    from kernels.tuning import gemv_tuning
    T, D, I, E, k, S = shape
    tuning = replace(gemv_tuning(torch.device("cpu"), D, I, dtype), stacked_down=stacked)
    args = moe_inputs(T, D, I, E, k, dtype)
    if S == 0:
        assert_close(fused_moe_gemv(*args, tuning=tuning), moe_expected(*args), TOL[dtype])
        return
    shared = shared_inputs(D, S * I, dtype)
    assert_close(fused_moe_gemv(*args, shared=shared, tuning=tuning), moe_with_shared_expected(*args, shared),
                 TOL[dtype])


def test_fused_moe_takes_shared_experts_on_every_path():
    """fused_moe(shared=...) adds the shared SwiGLU: fused into the few-token kernels when its width is a
    multiple of the routed one, added after otherwise (a width of 1.5 routed ones, the tiled kernels, torch)."""
    from kernels.triton_moe_gemv import shared_slices
    for T, I_s in [(1, 48), (1, 36), (5, 48)]:
        args = moe_inputs(T, 40, 24, 4, 2, torch.float32)
        shared = shared_inputs(40, I_s, torch.float32)
        want = moe_with_shared_expected(*args, shared)
        assert shared_slices(args[1], shared) == (2 if I_s == 48 else -1)
        for backend in ("triton", "torch"):
            assert_close(kernels.fused_moe(*args, backend=backend, shared=shared), want, 1e-5)


def test_fused_moe_tiled_kernels_at_one_token():
    """The tiled kernels still serve one token where the tuning says so (batch 1 goes to the GEMV)."""
    from kernels.triton_moe import fused_moe_triton
    args = moe_inputs(1, 40, 24, 4, 2, torch.float32)
    assert_close(fused_moe_triton(*args), moe_expected(*args), 1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("E,D,I,k,S", [(8, 4096, 14336, 2, 0), (64, 2048, 1408, 6, 2)],
                         ids=["mixtral", "deepseek-v2-lite"])
def test_fused_moe_gemv_gpu_full_size(E, D, I, k, S):
    """The few-token kernels at 1, 2 and 4 tokens, with the shared experts where the shape has them;
    weights made on the GPU (a CPU generator takes ~10 s for Mixtral's)."""
    from dataclasses import replace
    from kernels.triton_moe_gemv import fused_moe_gemv
    from kernels.tuning import gemv_tuning
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = dict(dtype=torch.bfloat16, device="cuda")
    w13 = torch.randn(E, 2 * I, D, generator=gen, **dt) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=gen, **dt) / I ** 0.5
    shared = (torch.randn(2 * S * I, D, generator=gen, **dt) / D ** 0.5,
              torch.randn(D, S * I, generator=gen, **dt) / (S * I) ** 0.5) if S else None
    for T in (1, 2, 4):
        x = torch.randn(T, D, generator=gen, **dt)
        weights, ids = torch.randn(T, E, generator=gen, device="cuda").softmax(-1).topk(k, dim=-1)
        args = (x, w13, w2, weights, ids)
        want = moe_expected(*args) if S == 0 else moe_with_shared_expected(*args, shared)
        assert_close(fused_moe_gemv(*args, shared=shared), want, TOL[torch.bfloat16])
        for stacked in (False, True):
            tuning = replace(gemv_tuning(x.device, D, I, x.dtype), stacked_down=stacked)
            assert_close(fused_moe_gemv(*args, shared=shared, tuning=tuning), want, TOL[torch.bfloat16])
        if T == 1:   # the entry point sends one token here, with the shared experts
            assert_close(kernels.fused_moe(*args, shared=shared), want, TOL[torch.bfloat16])


def test_gemv_tuner_checks_tiles_sets_max_tokens_and_its_file_is_used(tmp_path, monkeypatch):
    """The few-token search under the interpreter (plain timing: no CUDA graphs here): candidates are
    checked against the reference with the shared experts, the winner is one of them, max_tokens is a
    prefix of the token counts where it beat the tiled kernels, and the file entry reaches the engine."""
    import json
    from kernels import tuning
    from moe_engine.bench import kernels as bench_kernels, tune_gemv as bench_tune_gemv
    spec = bench_kernels.MoESpec("tiny", 4, 40, 24, 2, shared=2)
    candidates = [tuning.GemmTile(16, 32, 1, 1, 1), tuning.GemmTile(8, 16, 1, 1, 1)]
    entry = bench_tune_gemv.tune_gemv(spec, torch.device("cpu"), torch.float32, 0.0, candidates, tokens=[1, 2],
                                      timer=bench_kernels.time_call, stacked_candidates=candidates[1:])
    assert entry["trials"] and all(t["ok"] and t["rel_error"] < 1e-5 for t in entry["trials"])
    assert tuple(entry["gate_up"]) in [tuple(vars(c).values()) for c in candidates]
    assert {t["tuning"]["stacked_down"] for t in entry["trials"]} == {False, True}   # both down kernels tried
    assert entry["max_tokens"] == last_win(entry["versus"])
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"moe": [], "gemv": [{**entry, "max_tokens": 3}]}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    chosen = tuning.gemv_tuning(torch.device("cpu"), 40, 24, torch.float16)
    assert chosen == tuning.gemv_tuning_from_json({**entry, "max_tokens": 3}) and chosen.max_tokens == 3
    assert tuning.gemv_tuning(torch.device("cpu"), 40, 32, torch.float16) == tuning.shipped("interpreter")[
        ("gemv", "interpreter")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("L,R", [(40, 8), (512, 64)])
def test_latent_cache_kernel_matches_norm_rotary_and_scatter(dtype, interleave, L, R):
    """MLA's one-kernel cache write against the norm, rotary and index_copy it replaces, on shuffled slots,
    and rows it was not given untouched."""
    from kernels.pointwise import rms_norm, rotary, write_latent_cache
    T, S = 3, 10
    kv = torch.randn(T, L + R + 6, dtype=dtype)[:, : L + R]                # a strided view, as linear's output
    weight = torch.rand(L, dtype=dtype) + 0.5
    angles = torch.rand(T, 1, R // 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(S)[:T]
    cache = torch.full((S, L + R), 7.0, dtype=dtype)
    write_latent_cache(cache, kv, weight, 1e-6, cos, sin, interleave, slots, backend="triton")
    want = torch.full((S, L + R), 7.0, dtype=dtype)
    latent, k_pe = kv.split([L, R], -1)
    rows = torch.cat([rms_norm(latent, weight, 1e-6, backend="torch")[0],
                      rotary(k_pe[:, None, :], cos, sin, interleave, backend="torch")[:, 0]], -1)
    want.index_copy_(0, slots, rows)
    assert rel_err(cache, want) < (1e-6 if dtype == torch.float32 else 2e-3)
    torch_path = torch.full((S, L + R), 7.0, dtype=dtype)
    write_latent_cache(torch_path, kv, weight, 1e-6, cos, sin, interleave, slots, backend="torch")
    assert torch.equal(torch_path, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("T,H,nope,L,R", [(1, 3, 24, 40, 8), (2, 2, 128, 200, 16)])
def test_absorb_query_kernel_matches_bmm_rotary_and_cat(dtype, interleave, T, H, nope, L, R):
    """MLA's absorbed query in one kernel (several latent bands, ragged nope) against torch; w_uk a
    strided view of kv_b, as the model holds it."""
    from kernels.mla import absorb_query
    q = torch.randn(T, H, nope + R, dtype=dtype)
    kv_b = torch.randn(H, nope + 16, L, dtype=dtype) / nope ** 0.5
    w_uk = kv_b[:, :nope]                                                        # [H, nope, L], strided
    angles = torch.rand(T, 1, R // 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = absorb_query(q, nope, w_uk, cos, sin, interleave, backend="triton")
    ref = absorb_query(q, nope, w_uk, cos, sin, interleave, backend="torch")
    assert out.shape == (T, H, L + R)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


def test_mla_decode_with_its_fused_kernels_gives_the_same_tokens(monkeypatch):
    """tiny-deepseek decoding with the latent cache write and the absorbed query as Triton kernels (the
    CUDA path, here under the interpreter): the same greedy tokens as the torch path."""
    import sys
    from kernels import pointwise
    from moe_engine.llm import LLM
    from moe_engine.sampling import SamplingParams
    from tests.conftest import WEIGHTS
    llm = LLM(WEIGHTS / "tiny-deepseek", num_kv_blocks=16, block_size=8)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [list(range(7, 20)), list(range(30, 35))]
    expected = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    calls = []
    monkeypatch.setattr(pointwise, "use_triton", lambda backend, *t: True)
    monkeypatch.setattr(sys.modules["kernels.mla"], "use_triton", lambda backend, *t: calls.append(1) or True)
    assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)] == expected
    assert calls


def test_absorb_tuner_checks_its_tiles_and_its_file_entry_is_used(tmp_path, monkeypatch):
    """The absorbed-query search on the tiny DeepSeek shape under the interpreter (plain timing): every
    tile checked against torch, max_tokens where the kernel won in order, the entry reaching absorb_query."""
    from kernels import tuning
    from moe_engine.bench.kernels import time_call
    from moe_engine.bench.tune_gemv import tune_absorb
    tiles = [GemmTile(16, 16, 1, 1, 1), GemmTile(32, 8, 1, 1, 1)]
    entry = tune_absorb("deepseek-tiny", torch.device("cpu"), torch.float32, 0.0, tiles, tokens=[1, 2],
                        timer=time_call)
    assert (entry["heads"], entry["nope"], entry["lora"]) == (4, 16, 32)
    assert entry["trials"] and all(t["rel_error"] < 1e-5 for t in entry["trials"])
    assert entry["max_tokens"] == last_win(entry["versus"])
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"moe": [], "absorb": [{**entry, "max_tokens": 3}]}))
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    chosen = tuning.absorb_tuning(torch.device("cpu"), 4, 16, 32)
    assert chosen.max_tokens == 3 and tuple(vars(chosen.tile).values()) == tuple(entry["tile"])
    assert tuning.absorb_tuning(torch.device("cpu"), 4, 16, 64).max_tokens == 4       # another shape: default


def test_absorbed_query_kernel_serves_only_up_to_max_tokens(monkeypatch):
    """Above the tuning's max_tokens (default 4) the batched matmul serves: same result, no kernel."""
    import importlib
    from kernels.mla import absorb_query
    from kernels.tuning import absorb_tuning
    mla = importlib.import_module("kernels.triton_mla")
    real, calls = mla.absorb_query_triton, []
    monkeypatch.setattr(mla, "absorb_query_triton", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    limit = absorb_tuning(torch.device("cpu"), 2, 8, 16).max_tokens
    for T in (limit, limit + 1):
        q, w_uk, angles = torch.randn(T, 2, 12), torch.randn(2, 8, 16), torch.rand(T, 1, 2)
        got = absorb_query(q, 8, w_uk, angles.cos(), angles.sin(), True, backend="triton")
        want = absorb_query(q, 8, w_uk, angles.cos(), angles.sin(), True, backend="torch")
        assert rel_err(got, want) < 1e-6
    assert calls == [limit]
