"""The decode-sized Triton kernels (kernels/triton_gemv.py) against torch: the GEMV against F.linear, the
one-program routing against model_defs.moe.route; under the interpreter here, on the model on a GPU."""

import json

import pytest
import torch
import torch.nn.functional as F

from kernels.backend import triton_available
from kernels.tuning import GemmTile, device_key
from model_defs.moe import RoutingConfig, route
from tests.test_cuda_graphs import run
from tests.test_kernels import TOL, assert_close

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
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_greedy_route_kernel_matches_route(name):
    from kernels.triton_gemv import greedy_route_triton
    cfg = ROUTINGS[name]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, cfg.num_experts, generator=gen) * 3                     # [T, E]
    bias = torch.randn(cfg.num_experts, generator=gen) if cfg.has_bias else None
    want_w, want_ids = route(logits, cfg, bias)                                   # torch: ranked, best first
    normalize = cfg.norm_topk_prob and (cfg.top_k > 1 or cfg.scale_normalized)
    scaling = cfg.routed_scaling_factor if cfg.scale_normalized or not normalize else 1.0
    got_w, got_ids = greedy_route_triton(logits, cfg.top_k, cfg.scoring == "sigmoid", bias, normalize, scaling)
    assert torch.equal(got_ids, want_ids)
    assert torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-6)


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
    for module, name in [(tg, "gemv_triton"), (tg, "greedy_route_triton"), (tmg, "fused_moe_gemv")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw:
                            used.__setitem__(_name, used.get(_name, 0) + 1) or _real(*a, **kw))
    for path in (on, off):
        used.clear()
        monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
        graphed, calls, _ = run(model, graphs=True, device="cuda", dtype=torch.float32)
        assert graphed == cpu and calls, path.name
        greedy = llm.model.layers[-1].mlp.routing.method == "greedy"     # the routing kernel's case
        expected = ["fused_moe_gemv", "gemv_triton"] + (["greedy_route_triton"] if greedy else [])
        assert sorted(used) == ([] if path == off else expected), path.name


def test_linear_tuner_covers_every_weight_and_checks_its_tiles():
    """bench tune's GEMV search on the tiny DeepSeek shape under the interpreter (plain timing): an entry
    per distinct 2-D weight, every tile checked against F.linear, max_tokens where the GEMV won."""
    from moe_engine.bench_kernels import time_call
    from moe_engine.bench_tune_gemv import dense_weights, tune_linear
    weights = dense_weights(["deepseek-tiny"], torch.float32)
    assert (8, 64, torch.float32) in weights and (512, 64, torch.float32) in weights   # router, lm_head
    tiles = [GemmTile(16, 32, 1, 1, 1), GemmTile(8, 64, 1, 1, 1)]
    entries = tune_linear(["deepseek-tiny"], torch.device("cpu"), torch.float32, 0.0, tiles, tokens=[1, 2],
                          timer=time_call)
    assert [(e["n"], e["k"]) for e in entries] == [(n, k) for n, k, _ in weights]
    for e in entries:
        assert e["trials"] and all(t["rel_error"] < 1e-5 for t in e["trials"])
        expected = 0
        for v in e["versus_library"]:
            if v["gemv_s"] >= v["library_s"]:
                break
            expected = v["T"]
        assert e["max_tokens"] == expected


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
