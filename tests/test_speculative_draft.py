"""Speculative decoding with a draft model (method "draft"): greedy tokens identical to plain decoding
alone, in a mixed batch and under preemption; the same checkpoint as its own draft accepts (nearly) every
draft; both engines' caches free afterwards; bad settings are one clear line."""

import pytest
import torch

from conftest import WEIGHTS
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.speculative.config import SpeculativeConfig, parse_speculative
from test_speculative import GREEDY, assert_no_leak, prompts_for, run_mixed


def draft(k: int, model=WEIGHTS / "tiny-mixtral", adaptive: bool = False) -> dict:
    return {"method": "draft", "model": str(model), "num_speculative_tokens": k, "adaptive": adaptive}


@pytest.fixture(scope="module")
def int4_copy(tmp_path_factory):
    """tiny-mixtral quantized to int4 by `moe-engine quantize`: a cheaper draft with the same tokenizer."""
    from moe_engine.cli import main
    out = tmp_path_factory.mktemp("draft") / "tiny-mixtral-int4"
    assert main(["quantize", "--model", str(WEIGHTS / "tiny-mixtral"), "--out", str(out), "--quantization",
                 "int4", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def plain():
    llm = LLM(WEIGHTS / "tiny-mixtral")
    prompts = prompts_for("tiny-mixtral")
    reference = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    return llm, prompts, reference


@pytest.mark.parametrize("k", [1, 3, 5])
def test_its_own_draft_accepts_nearly_everything_and_changes_nothing(plain, k):
    base, prompts, reference = plain
    llm = LLM.from_model(base.model, base.tokenizer, speculative_config=draft(k))
    outs = llm.generate(prompt_token_ids=prompts[:3], sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference[:3]
    drafted = sum(o.num_draft_tokens for o in outs)
    assert drafted > 0 and sum(o.num_accepted_tokens for o in outs) >= 0.98 * drafted
    assert_no_leak(llm)
    assert_no_leak(llm.engine.spec.proposer.llm)


def test_another_model_as_draft_mixed_batch_and_preemption(plain, int4_copy):
    """An int4 copy drafting for tiny-mixtral: it sometimes disagrees, yet the tokens are the target's; odd requests speculate, even ones decode plainly, half join a few steps late; then the
    whole set again with a cache too small for all of them at once."""
    base, prompts, reference = plain
    llm = LLM.from_model(base.model, base.tokenizer, speculative_config=draft(3, int4_copy),
                         max_num_batched_tokens=48)
    which = [i % 2 == 1 for i in range(len(prompts))]
    seqs, _ = run_mixed(llm, prompts, which)
    assert [s.output_ids for s in seqs] == reference
    assert all(s.num_draft_tokens == 0 for s, w in zip(seqs, which) if not w)
    assert sum(s.num_draft_tokens for s in seqs) > sum(s.num_accepted_tokens for s in seqs) > 0
    assert_no_leak(llm)
    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    small = LLM.from_model(base.model, base.tokenizer, speculative_config=draft(3, int4_copy),
                           block_size=16, num_kv_blocks=longest // 16 + 3)
    outs = small.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert small.engine.scheduler.num_preemptions > 0
    assert_no_leak(small)
    assert_no_leak(small.engine.spec.proposer.llm)


def test_seeded_sampling_with_a_draft_reproduces():
    llm = LLM(WEIGHTS / "tiny-mixtral", speculative_config=draft(3))
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    a = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=params)[0]
    b = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=params)[0]
    assert a.token_ids == b.token_ids and a.num_draft_tokens > 0


def test_draft_settings_errors(tmp_path):
    with pytest.raises(MoeEngineError, match="method='draft' needs model"):
        SpeculativeConfig.of({"method": "draft"})
    with pytest.raises(MoeEngineError, match="is for method='draft'"):
        SpeculativeConfig.of({"method": "ngram", "model": "x"})
    assert parse_speculative("draft=weights/tiny-deepseek:2") == {
        "method": "draft", "model": "weights/tiny-deepseek", "num_speculative_tokens": 2}
    import transformers
    from hf_models import save_random
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1, max_position_embeddings=128)
    other = save_random(transformers.MixtralForCausalLM, cfg, tmp_path / "other")
    with pytest.raises(MoeEngineError, match="vocabulary of 512 tokens, the target 4096"):
        LLM(WEIGHTS / "tiny-mixtral", speculative_config={"method": "draft", "model": str(other)})
    with pytest.raises(MoeEngineError, match="another tokenizer"):     # tiny-deepseek: 4096 ids, other text
        LLM(WEIGHTS / "tiny-mixtral", speculative_config=draft(3, WEIGHTS / "tiny-deepseek"))


def test_bench_spec_times_a_quantized_copy_as_draft(tmp_path):
    """bench spec --draft int4: draft rows beside n-gram's, in float32 with the same tokens as plain decoding."""
    import json
    from moe_engine.bench.spec import main
    out = tmp_path / "spec.json"
    assert main(["--models", "tiny-mixtral", "--batches", "1", "--draft", "int4", "--prompts-b1", "1",
                 "--max-tokens", "12", "--snippet-tokens", "24", "--repeats", "1", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["workload"] == "plain"]
    assert {r["method"] for r in rows} == {"none", "ngram:4", "ngram:4/forced", "draft:4", "draft:4/forced"}
    forced = next(r for r in rows if r["method"] == "draft:4/forced")
    assert forced["draft_tokens"] > 0 and all(r["same_tokens_as_none"] for r in rows)
