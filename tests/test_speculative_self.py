"""Speculative decoding with the model drafting for itself (method "self", cheaper routing in its own cache
slots, optionally fewer layers): greedy tokens identical to plain decoding alone, in a mixed batch and under
preemption; the cache after verification equal to plain decoding's; a draft routed like the target accepts
every draft; bad settings are one clear line."""

import pytest
import torch

from conftest import WEIGHTS
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.speculative.config import SpeculativeConfig, parse_speculative
from moe_engine.speculative.self_draft import SelfDraft, spaced_layers
from test_speculative import GREEDY, assert_no_leak, prompts_for, run_mixed


def self_spec(k: int, top_k: int = 1, adaptive: bool = False) -> dict:
    return {"method": "self", "num_speculative_tokens": k, "draft_top_k": top_k, "adaptive": adaptive}


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-deepseek"])
def case(request):
    model = request.param
    prompts = prompts_for(model)
    plain = LLM(WEIGHTS / model)
    reference = [o.token_ids for o in plain.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    return plain, prompts, reference


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_identical_alone_and_mixed_batch(case, k):
    plain, prompts, reference = case
    alone = LLM.from_model(plain.model, plain.tokenizer, speculative_config=self_spec(k))
    out = alone.generate(prompt_token_ids=[prompts[2]], sampling_params=GREEDY)[0]
    assert out.token_ids == reference[2]
    assert out.num_draft_tokens > 0 and 0 < out.num_accepted_tokens <= out.num_draft_tokens
    assert alone.engine.spec.proposer.forwards > 0
    assert_no_leak(alone)

    llm = LLM.from_model(plain.model, plain.tokenizer, speculative_config=self_spec(k), max_num_batched_tokens=48)
    which = [i % 2 == 1 for i in range(len(prompts))]              # odd ones speculate
    seqs, mixed_prefill = run_mixed(llm, prompts, which)
    assert [s.output_ids for s in seqs] == reference
    assert all(s.num_draft_tokens == 0 for s, w in zip(seqs, which) if not w)
    assert sum(s.num_draft_tokens for s in seqs) > sum(s.num_accepted_tokens for s in seqs) > 0   # some rejected
    assert mixed_prefill                                           # a verify step carried prefill chunks
    assert_no_leak(llm)


def test_greedy_identical_under_preemption(case):
    plain, prompts, reference = case
    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    llm = LLM.from_model(plain.model, plain.tokenizer, speculative_config=self_spec(3), block_size=16,
                         num_kv_blocks=longest // 16 + 3)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_draft_tokens for o in outs) > 0
    assert_no_leak(llm)


def cache_entries(llm: LLM, seq) -> list[torch.Tensor]:
    """Each layer's cache entries at seq's cached positions, in position order."""
    bs = llm.block_size
    slots = torch.tensor([seq.blocks[p // bs] * bs + p % bs for p in range(seq.num_cached)])
    return [c.index_select(1 if c.dim() == 4 else 0, slots) for c in llm.engine.runner.kv_caches]


def test_cache_after_verify_equals_plain_decoding(case):
    """The draft's provisional K/V (cheap routing) are all rewritten by the verify steps: mid-generation,
    every cached entry equals plain decoding's at the same point (and the drafts were not all accepted,
    so rejected slots were rewound and written again)."""
    plain, prompts, _ = case
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    runs = {}
    for name, config in (("plain", None), ("self", self_spec(3))):
        llm = LLM.from_model(plain.model, plain.tokenizer, speculative_config=config)
        seq = llm._new_sequence(prompts[3], params)
        while len(seq.output_ids) < 20:
            llm.engine.step()
        runs[name] = (llm, seq)
    (llm_p, seq_p), (llm_s, seq_s) = runs["plain"], runs["self"]
    n = min(seq_p.num_cached, seq_s.num_cached)
    seq_p.num_cached = seq_s.num_cached = n             # compare the positions both have cached
    assert seq_s.output_ids[:n - len(prompts[3])] == seq_p.output_ids[:n - len(prompts[3])]
    assert 0 < seq_s.num_accepted_tokens < seq_s.num_draft_tokens
    for a, b in zip(cache_entries(llm_p, seq_p), cache_entries(llm_s, seq_s)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_a_draft_routed_like_the_target_accepts_every_draft(case):
    """With the model's full top_k (allowed here only: it cannot pay) the draft forwards compute what the
    verify step does over the slots they wrote themselves: every draft is accepted."""
    plain, prompts, reference = case
    llm = LLM.from_model(plain.model, plain.tokenizer, speculative_config=self_spec(3))
    full = plain.model.moe_blocks[0].routing.top_k
    llm.engine.spec.proposer = SelfDraft(llm.engine, full, check=False)
    outs = llm.generate(prompt_token_ids=prompts[:3], sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference[:3]
    drafted = sum(o.num_draft_tokens for o in outs)
    assert drafted > 0 and sum(o.num_accepted_tokens for o in outs) >= 0.98 * drafted
    assert_no_leak(llm)


def test_a_draft_of_fewer_layers(case):
    """draft_layers=3 of 4 (layers 0, 2, 3; the full top_k): the skipped layer's slots are written by the
    verify step alone; the same tokens, with a cache small enough to preempt."""
    plain, prompts, reference = case
    assert spaced_layers(4, 3) == [0, 2, 3] and spaced_layers(4, 2) == [0, 3] and spaced_layers(4, 4) is None
    assert spaced_layers(8, 4) == [0, 2, 5, 7]
    full = plain.model.moe_blocks[0].routing.top_k
    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    llm = LLM.from_model(plain.model, plain.tokenizer, block_size=16, num_kv_blocks=longest // 16 + 3,
                         speculative_config={**self_spec(3, top_k=full), "draft_layers": 3})
    assert llm.engine.spec.proposer.layers == [0, 2, 3]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_draft_tokens for o in outs) > sum(o.num_accepted_tokens for o in outs) > 0
    assert_no_leak(llm)


def test_static_decode_runner_and_seeded_sampling():
    """Plain steps through the static decode step (cuda_graphs=True runs it eagerly on the CPU), drafts and
    verify steps eagerly beside it: the same greedy tokens; seeded sampling with self drafts reproduces."""
    base = LLM(WEIGHTS / "tiny-mixtral")
    prompt = prompts_for("tiny-mixtral")[4]
    want = base.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
    llm = LLM.from_model(base.model, base.tokenizer, speculative_config=self_spec(3, adaptive=True),
                         cuda_graphs=True)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    assert out.token_ids == want and out.num_draft_tokens > 0
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    a, b = (llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0] for _ in range(2))
    assert a.token_ids == b.token_ids and a.num_draft_tokens > 0
    assert_no_leak(llm)


def test_self_settings_errors():
    for bad in (0, 2000, 1.5, True, "1"):
        with pytest.raises(MoeEngineError, match="bad speculative_config draft_top_k"):
            SpeculativeConfig.of({"method": "self", "draft_top_k": bad})
    with pytest.raises(MoeEngineError, match="draft_top_k= is for method='self'"):
        SpeculativeConfig.of({"method": "ngram", "draft_top_k": 1})
    assert parse_speculative("self:4") == {"method": "self", "num_speculative_tokens": 4}
    assert parse_speculative("self=2:3") == {"method": "self", "draft_top_k": 2, "num_speculative_tokens": 3}
    with pytest.raises(MoeEngineError, match="self=TOPK takes"):
        parse_speculative("self=x:3")
    for bad in (1, 0, True):
        with pytest.raises(MoeEngineError, match="bad speculative_config draft_layers"):
            SpeculativeConfig.of({"method": "self", "draft_layers": bad})
    with pytest.raises(MoeEngineError, match=r"routes each token to 2 experts, so this draft would cost a plain "
                                             r"step .* draft_top_k in 1..1, or draft_layers below 4$"):
        LLM(WEIGHTS / "tiny-mixtral", speculative_config=self_spec(3, top_k=2))
    with pytest.raises(MoeEngineError, match=r"draft_top_k=5: this model routes each token to 4 experts and a "
                                             r"draft must route to fewer; give draft_top_k in 1..3$"):
        LLM(WEIGHTS / "tiny-deepseek", speculative_config=self_spec(3, top_k=5))
    with pytest.raises(MoeEngineError, match=r"draft_layers=5: this model has 4 decoder layers; give draft_layers in 2..4$"):
        LLM(WEIGHTS / "tiny-deepseek", speculative_config={**self_spec(3), "draft_layers": 5})


def test_bench_spec_times_self(tmp_path):
    """bench spec --self 1: self rows beside n-gram's, with the same tokens as plain decoding."""
    import json
    from moe_engine.bench.spec import main
    out = tmp_path / "spec.json"
    assert main(["--models", "tiny-mixtral", "--batches", "1", "--self", "1", "--prompts-b1", "1",
                 "--max-tokens", "12", "--snippet-tokens", "24", "--repeats", "1", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["workload"] == "plain"]
    assert {r["method"] for r in rows} == {"none", "ngram:4", "ngram:4/forced", "self:4", "self:4/forced"}
    forced = next(r for r in rows if r["method"] == "self:4/forced")
    assert forced["draft_tokens"] > 0 and all(r["same_tokens_as_none"] for r in rows)


def test_control_weighs_self_drafts_against_a_plain_step():
    """A proposer that always drafts (self) still gets a plain step measured (control.plan's first decode
    step at a batch size is plain), so the control weighs its verify steps, charged with the draft
    forwards' time, against one, and the tokens stay plain decoding's."""
    base = LLM(WEIGHTS / "tiny-deepseek")
    prompt = prompts_for("tiny-deepseek")[1]
    want = base.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0].token_ids
    llm = LLM.from_model(base.model, base.tokenizer, speculative_config=self_spec(3, adaptive=True))
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]
    costs = llm.engine.spec.costs
    assert out.token_ids == want and out.num_draft_tokens > 0
    assert costs.plain_time(1) is not None and any(b == 1 for b, _ in costs.verify)
    assert_no_leak(llm)


def test_bench_spec_forward_cost(tmp_path):
    """bench spec --forward-cost: the draft forward, plain step and verify steps of a random shape timed."""
    import json
    from moe_engine.bench.spec import main
    out = tmp_path / "cost.json"
    assert main(["--forward-cost", "deepseek-tiny", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["ms"]) == {"1 row top-3 (plain step)", "1 row top-1 (self draft)", "1 row top-2 (self draft)",
                              "2 rows top-3 (verify k=1)",
                              "4 rows top-3 (verify k=3)"}
    assert all(t > 0 for t in got["ms"].values())
    assert got["distinct_experts_by_rows"]["1"] == 3 and got["distinct_experts_by_rows"]["4"] >= 3


@pytest.mark.parametrize("name", ["qwen2-step2-bias", "olmoe-clip", "glm-half-bias-qknorm"])
def test_random_configs_of_other_families(tmp_path, name):
    """Random Qwen2-MoE (gated shared expert, dense layers among MoE ones), OLMoE and GLM-4.5 (grouped
    noaux_tc routing, a dense first layer): the same greedy tokens in a batch of 4, with drafts rejected."""
    from test_families import prompt, tiny
    path = tiny(tmp_path, name)
    prompts = [prompt(n, seed) for n, seed in ((5, 1), (17, 2), (30, 3), (9, 4))]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in LLM(path).generate(prompt_token_ids=prompts, sampling_params=params)]
    llm = LLM(path, speculative_config=self_spec(3))
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in outs] == want
    assert sum(o.num_draft_tokens for o in outs) > sum(o.num_accepted_tokens for o in outs) > 0
    assert_no_leak(llm)


def test_compressed_cache(case):
    """An fp8 cache (scales per slot): the draft's provisional entries, quantized, are rewritten like any."""
    plain, prompts, _ = case
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    base = LLM.from_model(plain.model, plain.tokenizer, kv_cache_dtype="fp8")
    want = [o.token_ids for o in base.generate(prompt_token_ids=prompts[:4], sampling_params=params)]
    llm = LLM.from_model(plain.model, plain.tokenizer, kv_cache_dtype="fp8", speculative_config=self_spec(3))
    outs = llm.generate(prompt_token_ids=prompts[:4], sampling_params=params)
    assert [o.token_ids for o in outs] == want and sum(o.num_draft_tokens for o in outs) > 0
    assert_no_leak(llm)
