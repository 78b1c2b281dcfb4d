"""kv_cache_dtype="int4": the packed round trip, paged attention over it, generation, quality and capacity."""

import math

import numpy as np
import pytest
import torch

from conftest import WEIGHTS
from kernels.attention import paged_attention
from kernels.kv_quant import QuantizedCache, dequantize_int4, quantize_int4
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.bench.kv import shape_model
from moe_engine.cli import main
from moe_engine.llm import check_kv_cache_dtype
from test_kv_cache_dtype import capacity, compressed_case, expected_over_dequantised, held_out


@pytest.mark.parametrize("group", [16, 64])
def test_round_trip_within_half_a_step(group):
    x = torch.randn(64, 3, 128) * torch.logspace(-3, 2, 64)[:, None, None] + torch.linspace(-5, 5, 64)[:, None, None]
    x[0, 0] = 0                                                             # an all-zero row stays zero
    x[1, 0] = 0.3                                                           # so does a constant one
    packed, scale, zero = quantize_int4(x, group)
    assert packed.shape == (64, 3, 64) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (64, 3, 128 // group) and scale.dtype == zero.dtype == torch.float16
    back = dequantize_int4(packed, scale, zero, torch.float32)
    step = scale.float().repeat_interleave(group, -1)                       # [.., 128] each value's step
    assert ((back - x).abs() <= 0.5 * step + x.abs() * 2 ** -20 + 1e-30).all()   # plus float32's rounding
    assert torch.equal(back[0, 0], torch.zeros(128))
    assert torch.allclose(back[1, 0], torch.full((128,), 0.3), rtol=2 ** -11, atol=0)   # float16's rounding
    big = torch.tensor([[-1e6, 0.0], [1.0, 7e4]])                           # beyond float16: clipped to +-65504
    big_q = quantize_int4(big, 2)
    err = dequantize_int4(*big_q, torch.float32) - big.clamp(-65504, 65504)
    assert torch.isfinite(big_q[1]).all() and (err.abs() <= 0.5 * big_q[1].float()).all()
    # The layout: value 2i in byte i's low nibble, 2i + 1 in its high one, codes (x - zero) / scale.
    codes = ((x - zero.float().repeat_interleave(group, -1)) / step.clamp_min(1e-30)).round().clamp(0, 15)
    assert torch.equal((packed & 15).float()[2:], codes[2:, :, 0::2]) and torch.equal((packed >> 4).float()[2:],
                                                                                        codes[2:, :, 1::2])


@pytest.mark.parametrize("kind", ["gqa", "mqa", "mla"])
@pytest.mark.parametrize("query_lens", [[1, 3, 1, 1, 5], [1, 1, 1, 1, 1]], ids=["mixed", "decode"])
def test_paged_attention_reads_the_int4_cache(kind, query_lens):
    q, k_cache, v_cache, meta = compressed_case(kind, "int4", query_lens)
    assert k_cache.zero is not None and k_cache.data.shape[-1] * 2 == k_cache.width
    want = expected_over_dequantised(q, k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, meta, 0.3), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,splits", [("gqa", 1), ("mqa", 3), ("mla", 3)])
def test_triton_decode_kernel_unpacks_int4_in_the_loop(kind, splits):
    """The Triton decode kernel (the interpreter here) against the reference over the dequantised cache."""
    pytest.importorskip("triton")
    from kernels.triton_attention_quant import paged_decode_quant_triton
    q, k_cache, v_cache, meta = compressed_case(kind, "int4", [1, 1, 1, 1, 1], seed=1)
    out = paged_decode_quant_triton(q, k_cache, v_cache, meta.block_tables, meta.device_context_lens(q.device),
                                    meta.block_size, 0.3, max(meta.context_lens), num_splits=splits)
    torch.testing.assert_close(out, expected_over_dequantised(q, k_cache, v_cache, meta, 0.3), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-deepseek"])
def model(request):
    return request.param


def test_perplexity_within_two_percent(model):
    """256-token windows, each prefilled into a fresh int4 cache (docs/kv_cache.md has the whole-stream table)."""
    stream = held_out(model)
    windows = [stream[s:s + 256].tolist() for s in np.linspace(0, len(stream) - 256, 8).astype(int)]
    ppl = {d: math.exp(np.mean([math.log(LLM(WEIGHTS / model, kv_cache_dtype=d, kv_cache_bytes=1 << 24)
                                         .perplexity(w, window=256)) for w in windows]))
           for d in ("auto", "int4")}
    assert ppl["int4"] != ppl["auto"] and ppl["int4"] / ppl["auto"] - 1 <= 0.02, (model, ppl)


def test_prefix_caching_preemption_and_batching_under_int4(model):
    stream = held_out(model)
    prompts = [stream[s:s + n].tolist() for s, n in [(0, 70), (500, 40), (900, 90), (1400, 17)]]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ample = LLM(WEIGHTS / model, kv_cache_dtype="int4", enable_prefix_caching=False, max_num_seqs=1)
    alone = [ample.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    small = LLM(WEIGHTS / model, kv_cache_dtype="int4", block_size=16, num_kv_blocks=9)
    assert [o.token_ids for o in small.generate(prompt_token_ids=prompts, sampling_params=params)] == alone
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free == 9                               # every block back
    # A shared 48-token prefix: its 3 blocks are reused, and the output is what an uncached run gives.
    cached = LLM(WEIGHTS / model, kv_cache_dtype="int4", block_size=16)
    a, b = prompts[0][:48] + [100, 200], prompts[0][:48] + [300]
    cached.generate(prompt_token_ids=[a], sampling_params=params)
    hits = cached.engine.blocks.prefix_hits
    second = cached.generate(prompt_token_ids=[b], sampling_params=params)[0].token_ids
    assert cached.engine.blocks.prefix_hits - hits == 3
    assert second == ample.generate(prompt_token_ids=[b], sampling_params=params)[0].token_ids
    assert cached.engine.blocks.num_free == cached.num_blocks


def test_speculation_and_the_static_step_over_int4(model):
    """n-gram speculation (1 + k verify rows reading the int4 cache) and the static-buffer step CUDA graphs
    capture (run eagerly here) give plain eager decoding's greedy tokens."""
    stream = held_out(model)
    prompts = [stream[:20].tolist() * 2, stream[300:333].tolist()]           # the first repeats: drafts hit
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    runs = {}
    for label, kw in [("eager", {"cuda_graphs": False}), ("static", {"cuda_graphs": True}),
                      ("spec", {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}})]:
        llm = LLM(WEIGHTS / model, kv_cache_dtype="int4", **kw)
        runs[label] = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    tokens = {k: [o.token_ids for o in v] for k, v in runs.items()}
    assert tokens["static"] == tokens["eager"] and tokens["spec"] == tokens["eager"]
    assert sum(o.num_draft_tokens for o in runs["spec"]) > 0


@pytest.mark.parametrize("kind,per_token,least", [("gqa", 2 * 8 * (64 + 2 * 2 * 2), 3.5),
                                                  ("mla", 256 + 2 * 8 * 2 + 64 * 2, 2.7)])
def test_capacity_on_the_benchmark_shapes(kind, per_token, least):
    """GQA head_dim 128: 64 bytes of nibbles + a float16 scale and zero per 64 values = 72 of 256 bytes;
    MLA: the 512 latent likewise, the 64-value rope key in bf16: 416 of 1,152 bytes."""
    model = shape_model(kind, torch.bfloat16)
    full, small = capacity(model, "auto"), capacity(model, "int4")
    assert small["bytes_per_token"] == per_token and small["dtype"] == "int4"
    assert small["num_blocks"] / full["num_blocks"] >= least


@pytest.mark.parametrize("name,per_token", [("tiny-mixtral", 4 * 2 * 2 * (16 + 4)), ("tiny-deepseek", 4 * (32 + 4 + 16 * 4))])
def test_capacity_on_the_shipped_models(name, per_token):
    """Against float32: 2048 -> 320 bytes per token (6.4x) and 1280 -> 400 (3.2x, the rope key in float32)."""
    full, small = (LLM(WEIGHTS / name, kv_cache_dtype=d, kv_cache_bytes=8 << 20, max_num_seqs=4096).cache_info()
                   for d in ("auto", "int4"))
    assert small["bytes_per_token"] == per_token
    assert abs(small["num_blocks"] / full["num_blocks"] - full["bytes_per_token"] / per_token) < 0.02


def test_int4_where_it_cannot_run_is_one_clear_line(capsys):
    with pytest.raises(MoeEngineError, match="unknown kv_cache_dtype 'int2': choose one of auto, fp8, int8, int4$"):
        LLM(WEIGHTS / "tiny-mixtral", kv_cache_dtype="int2")
    with pytest.raises(MoeEngineError, match="kv_cache_dtype='int4' is not supported on mps; use the CPU or CUDA"):
        check_kv_cache_dtype("int4", torch.device("mps"), False)
    with pytest.raises(MoeEngineError, match="compile=True does not support kv_cache_dtype='int4'"):
        LLM(WEIGHTS / "tiny-mixtral", kv_cache_dtype="int4", compile=True)
    with pytest.raises(ValueError, match="width 7 must be even"):
        QuantizedCache.empty(4, 1, 7, 7, "int4", torch.float32, "cpu")
    assert main(["info", "--model", str(WEIGHTS / "tiny-deepseek"), "--kv-cache-dtype", "int4"]) == 0
    assert "400 bytes per token in int4" in capsys.readouterr().out
