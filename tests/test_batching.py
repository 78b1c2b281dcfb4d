"""Paged cache + continuous batching end to end: batch == alone, preemption, no leaks, prefix reuse."""

import numpy as np
import pytest

from conftest import ROOT, WEIGHTS
from moe_engine import LLM, MoeEngineError, SamplingParams

LENGTHS = [1, 2, 5, 15, 16, 17, 33, 64, 90, 130, 170, 257]   # very different, around block edges
GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)


def prompts_for(model: str) -> list[list[int]]:
    stream = np.load(ROOT / f"tests/data/{model}_val_tokens.npy").astype(np.int64)
    starts = np.random.default_rng(3).integers(0, len(stream) - 300, len(LENGTHS))
    return [stream[s:s + n].tolist() for s, n in zip(starts, LENGTHS)]


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-deepseek"])
def case(request):
    model = request.param
    prompts = prompts_for(model)
    alone_llm = LLM(WEIGHTS / model, enable_prefix_caching=False)
    alone = [alone_llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in prompts]
    return model, prompts, alone


def assert_no_leak(llm: LLM):
    blocks = llm.engine.blocks
    assert blocks.num_free == blocks.num_blocks
    assert not any(blocks.ref_counts)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_batch_equals_each_alone(case):
    model, prompts, alone = case
    llm = LLM(WEIGHTS / model, max_num_batched_tokens=128)        # long prompts get chunked
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert_no_leak(llm)


def test_small_cache_preempts_and_still_matches(case):
    model, prompts, alone = case
    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    llm = LLM(WEIGHTS / model, block_size=16, num_kv_blocks=longest // 16 + 3)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in outs) == llm.engine.scheduler.num_preemptions
    assert_no_leak(llm)


def test_prefix_caching_reuses_blocks():
    llm = LLM(WEIGHTS / "tiny-mixtral", block_size=16)
    prefix = prompts_for("tiny-mixtral")[-1][:48]                 # 3 full blocks
    a, b = prefix + [100, 200, 300], prefix + [400, 500]
    first = llm.generate(prompt_token_ids=[a], sampling_params=GREEDY)[0].token_ids
    hits_before = llm.engine.blocks.prefix_hits
    second = llm.generate(prompt_token_ids=[b], sampling_params=GREEDY)[0].token_ids
    assert llm.engine.blocks.prefix_hits - hits_before == 3
    plain = LLM(WEIGHTS / "tiny-mixtral", enable_prefix_caching=False)
    assert first == plain.generate(prompt_token_ids=[a], sampling_params=GREEDY)[0].token_ids
    assert second == plain.generate(prompt_token_ids=[b], sampling_params=GREEDY)[0].token_ids
    assert_no_leak(llm)


def test_bad_requests_refused_while_others_complete():
    llm = LLM(WEIGHTS / "tiny-mixtral", num_kv_blocks=8, block_size=16)   # 128 cache tokens
    ok = [5, 6, 7, 8]
    too_long = [5] * (llm.max_model_len + 3)
    too_big = [5] * 120                                          # fits the model, not the cache
    outs = llm.generate(prompt_token_ids=[ok, too_long, too_big, ok],
                        sampling_params=SamplingParams(max_tokens=30, ignore_eos=True))
    assert outs[0].finish_reason == outs[3].finish_reason == "length" and len(outs[0].token_ids) == 30
    assert outs[1].finish_reason == "error" and "shorten the prompt" in outs[1].error
    assert outs[2].finish_reason == "error" and "cache blocks" in outs[2].error
    with pytest.raises(MoeEngineError, match="tokens but the model takes at most"):
        llm.generate(prompt_token_ids=[too_long])
    assert_no_leak(llm)


def test_cancelled_stream_frees_its_blocks():
    llm = LLM(WEIGHTS / "tiny-deepseek")
    stream = llm.stream("def parse(text):", SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert llm.engine.blocks.num_free < llm.engine.blocks.num_blocks
    stream.close()
    assert_no_leak(llm)


def test_per_request_sampling_params_and_order():
    llm = LLM(WEIGHTS / "tiny-mixtral")
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 9, 1, 5)]
    outs = llm.generate(["a", "def f():", "import", "class A:"], params)
    assert [len(o.token_ids) for o in outs] == [3, 9, 1, 5]
    assert [o.prompt for o in outs] == ["a", "def f():", "import", "class A:"]
