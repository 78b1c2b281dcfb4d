"""Edge cases of the runtime: text joins the prompt, failures leave the engine clean, odd inputs."""

import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, WEIGHTS
from moe_engine import LLM, MoeEngineError, SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def mixtral():
    return LLM(WEIGHTS / "tiny-mixtral")


def assert_clean(llm):
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.mark.parametrize("prompt", ["import", "for i in", "x ="])
def test_generated_text_joins_the_prompt(mixtral, prompt):
    """sentencepiece drops a first word's leading space when decoded alone; ours must not."""
    out = mixtral.generate(prompt, GREEDY)[0]
    full = mixtral.tokenizer.decode(out.prompt_token_ids + out.token_ids)
    assert prompt + out.text == full
    assert prompt + "".join(mixtral.stream(prompt, GREEDY)) == full


def test_interrupted_generate_leaves_engine_clean(mixtral, monkeypatch):
    real_step, calls = mixtral.engine.step, []

    def flaky_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(mixtral.engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        mixtral.generate(["a", "b", "c"], SamplingParams(max_tokens=50, ignore_eos=True))
    monkeypatch.undo()
    assert_clean(mixtral)
    outs = mixtral.generate(["def f():"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(outs) == 1 and len(outs[0].token_ids) == 2
    assert_clean(mixtral)


def test_input_forms(mixtral):
    assert mixtral.generate([]) == []
    assert mixtral.generate(prompt_token_ids=[]) == []
    one = mixtral.generate(prompt_token_ids=[1, 668, 1353], sampling_params=GREEDY)
    nested = mixtral.generate(prompt_token_ids=[[1, 668, 1353]], sampling_params=GREEDY)
    assert len(one) == 1 and one[0].token_ids == nested[0].token_ids
    import torch
    for form in (np.array([1, 668, 1353]), torch.tensor([1, 668, 1353]), [np.array([1, 668, 1353])]):
        assert mixtral.generate(prompt_token_ids=form, sampling_params=GREEDY)[0].token_ids == one[0].token_ids
    mixed = mixtral.generate(prompt_token_ids=[[1, 668], ["a"], [True, 5]], sampling_params=GREEDY)
    assert mixed[0].finish_reason == "length" and "must be integers" in mixed[1].error and mixed[2].error
    assert_clean(mixtral)
    both = mixtral.generate(["a", "b"], (GREEDY, GREEDY))
    assert len(both) == 2
    with pytest.raises(MoeEngineError, match="sampling_params"):
        mixtral.generate(["a", "b"], [GREEDY])


def test_sampling_value_edges(mixtral):
    tiny = SamplingParams(max_tokens=12, temperature=1e-45, ignore_eos=True)
    assert mixtral.generate("def", tiny)[0].token_ids == mixtral.generate("def", GREEDY)[0].token_ids
    assert SamplingParams(stop=None).stop == []
    for bad in (dict(max_tokens=True), dict(seed=False), dict(stop=5)):
        with pytest.raises(MoeEngineError, match="bad sampling value"):
            SamplingParams(**bad)


@pytest.mark.parametrize("setting", [dict(max_num_batched_tokens=0), dict(max_num_seqs=0), dict(block_size=0),
                                     dict(max_model_len=-5), dict(gpu_memory_utilization=1.5)])
def test_bad_engine_settings_are_clear_errors(setting):
    with pytest.raises(MoeEngineError, match="bad engine setting"):
        LLM(WEIGHTS / "tiny-mixtral", **setting)


def test_misspelt_argument_is_named():
    with pytest.raises(MoeEngineError, match="unknown argument.*max_num_seq"):
        LLM(WEIGHTS / "tiny-mixtral", max_num_seq=4)


def test_home_relative_path_loads_tokenizer_too(tmp_path, monkeypatch):
    shutil.copytree(WEIGHTS / "tiny-mixtral", tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    llm = LLM("~/m")
    assert llm.tokenizer is not None and llm.generate("x", GREEDY)[0].text


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
    import transformers
    from hf_models import hf_logits, max_rel_error, save_random
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                     tie_word_embeddings=True)
    path = save_random(transformers.MixtralForCausalLM, cfg, tmp_path / "tied")
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ids = list(range(3, 30))
    assert max_rel_error(LLM(path).prompt_logits(ids), hf_logits(path, ids)) <= 1e-4


def test_eos_from_config_without_tokenizer(tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(WEIGHTS / "tiny-mixtral", folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        (folder / name).unlink()
    llm = LLM(folder)
    assert llm.tokenizer is None and llm.engine.eos_ids == {2}
    with pytest.raises(MoeEngineError, match="no tokenizer"):
        llm.generate("text")


def test_chunked_prefill_on_a_small_cache_does_not_thrash():
    """A prefill chunk that does not fit shrinks to the free blocks instead of evicting itself."""
    stream = np.load(ROOT / "tests/data/tiny-deepseek_val_tokens.npy").astype(np.int64)
    prompts = [stream[i * 100:i * 100 + 46].tolist() for i in range(5)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = LLM(WEIGHTS / "tiny-deepseek", enable_prefix_caching=False)
    expected = [alone.generate(prompt_token_ids=[p], sampling_params=params)[0].token_ids for p in prompts]
    llm = LLM(WEIGHTS / "tiny-deepseek", enable_prefix_caching=False, max_num_batched_tokens=16,
              block_size=8, num_kv_blocks=12)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in outs] == expected
    # 5 requests of 70 tokens in a 96-slot cache: some preemption is unavoidable, but recomputation
    # stays bounded (before admission control: 24 preemptions and 3.3x the needed tokens computed).
    sch = llm.engine.scheduler
    needed = sum(len(p) + params.max_tokens - 1 for p in prompts)
    assert sch.num_preemptions <= 6 and sch.num_scheduled_tokens <= 2 * needed
    assert_clean(llm)


def test_chat_renders_the_template_once_per_conversation(mixtral):
    convo = [{"role": "user", "content": "sort a list"}, {"role": "assistant", "content": "sorted(x)"},
             {"role": "user", "content": "in place"}]
    ids = mixtral.tokenizer.encode_chat(convo)
    assert ids.count(mixtral.tokenizer.bos_id) == 1 and ids[0] == mixtral.tokenizer.bos_id
    assert 2 in ids                                      # the assistant turn ends with the EOS token id
    out = mixtral.chat(convo, GREEDY)
    assert out[0].token_ids == mixtral.generate(prompt_token_ids=[ids], sampling_params=GREEDY)[0].token_ids
    assert len(mixtral.chat([convo, convo[:1]], GREEDY)) == 2


def test_malformed_prompts_are_refused_per_request(mixtral):
    outs = mixtral.generate(prompt_token_ids=[[1, 668], [1.0, 2.0], None], sampling_params=GREEDY)
    assert outs[0].finish_reason == "length" and outs[1].error and outs[2].error
    texts = mixtral.generate(["def", 5], GREEDY)
    assert texts[0].token_ids and "text or a list of token ids" in texts[1].error
    with pytest.raises(MoeEngineError, match="must be integers"):
        next(mixtral.stream([1.7, 2.2], GREEDY))
    assert_clean(mixtral)


def test_moe_with_no_tokens_returns_empty():
    import torch
    from kernels import fused_moe_ref
    x = torch.zeros(0, 8)
    out = fused_moe_ref(x, torch.randn(2, 6, 8), torch.randn(2, 8, 3), torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.long))
    assert out.shape == (0, 8)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek"])
def test_streamed_text_of_a_long_answer_equals_one_decode(name):
    """Streaming decodes only the newest tokens each step; the result must equal decoding it all at once."""
    llm = LLM(WEIGHTS / name)
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=3, ignore_eos=True)
    for prompt in ("def parse(text):", "s = 'héllo 🙂'\n"):
        pieces = "".join(llm.stream(prompt, params))
        seq = llm.last_output
        full = llm.tokenizer.decode(seq.prompt_ids + seq.output_ids)
        assert len(seq.output_ids) == 200 and prompt + pieces == full
