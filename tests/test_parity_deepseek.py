"""DeepSeek-V2/V3 family vs transformers in float32: logits, greedy tokens, absorbed vs expanded MLA."""

import pytest
import torch
import transformers

from conftest import WEIGHTS
from hf_models import assert_matches_transformers, hf_logits, max_rel_error, save_random
from moe_engine import LLM, SamplingParams

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}
BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, max_position_embeddings=256,
            rope_theta=10000.0, initializer_range=0.25)
# Each case: (transformers class pair, overrides). Together they cover q_lora null/set (each with and
# without attention biases), greedy, group-limited and noaux_tc routing (random non-zero bias), YaRN
# on/off, first-k-dense 0/1 and 0/1/2 shared experts. V2 cases keep norm_topk_prob=False, where
# transformers' V2 router (which ignores norm_topk_prob) and the published V2 semantics agree.
V2 = (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)
V3 = (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)
CASES = {
    "v3-qlora-yarn-dense1-shared1-bias": (V3, dict(q_lora_rank=24, rope_scaling=YARN, first_k_dense_replace=1,
                                                   n_shared_experts=1, n_group=4, topk_group=2, attention_bias=True)),
    "v3-noqlora-rope-dense0-shared2-bias": (V3, dict(q_lora_rank=None, first_k_dense_replace=0, n_shared_experts=2,
                                                     n_group=2, topk_group=1, routed_scaling_factor=1.7,
                                                     attention_bias=True)),
    "v3-noqlora-yarn-shared0-nonorm": (V3, dict(q_lora_rank=None, rope_scaling=YARN, first_k_dense_replace=1,
                                                n_shared_experts=0, n_group=4, topk_group=3,
                                                norm_topk_prob=False)),
    "v2-greedy-qlora": (V2, dict(q_lora_rank=24, topk_method="greedy", n_shared_experts=2, first_k_dense_replace=1,
                                 norm_topk_prob=False, routed_scaling_factor=1.5)),
    "v2-grouplimited-yarn": (V2, dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                                      topk_group=2, rope_scaling=YARN, n_shared_experts=1,
                                      first_k_dense_replace=0, norm_topk_prob=False)),
}


def tiny_deepseek(tmp_path, name):
    (config_cls, model_cls), overrides = CASES[name]
    return save_random(model_cls, config_cls(**{**BASE, **overrides}), tmp_path / name)


def prompt(n=40, vocab=97, seed=2):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_config_matches_transformers(tmp_path, name):
    path = tiny_deepseek(tmp_path, name)
    ids = prompt()
    ref = hf_logits(path, ids)
    for absorb in ("never", "always"):
        assert max_rel_error(LLM(path, absorb=absorb).prompt_logits(ids), ref) <= 1e-4, absorb
    assert_matches_transformers(LLM(path), path, ids)


def test_shipped_tiny_deepseek_matches_transformers():
    path = WEIGHTS / "tiny-deepseek"
    llm = LLM(path)
    ids = llm.tokenizer.encode("import sys\n\ndef main(argv):\n    if len(argv) < 2:\n")
    assert_matches_transformers(llm, path, ids)


def test_absorbed_decode_equals_expanded():
    """The same decode steps through the absorbed form and the expanded form give the same logits."""
    from test_parity_mixtral import incremental_logits
    ids = LLM(WEIGHTS / "tiny-deepseek").tokenizer.encode("for i in range(10):\n    print(i, i * i)\n")
    split = 6
    expanded = incremental_logits(LLM(WEIGHTS / "tiny-deepseek", absorb="never"), ids, split)
    absorbed = incremental_logits(LLM(WEIGHTS / "tiny-deepseek", absorb="auto"), ids, split)
    assert max_rel_error(absorbed, expanded) <= 1e-4


def test_bias_matters_on_shipped_checkpoint():
    """The trained correction bias changes routing: dropping it must change the logits."""
    llm = LLM(WEIGHTS / "tiny-deepseek")
    ids = llm.tokenizer.encode("def read(path):\n    with open(path) as f:\n        return f.read()\n")
    with_bias = llm.prompt_logits(ids)
    for layer in llm.model.layers:
        if getattr(layer.mlp, "bias", None) is not None:
            layer.mlp.bias.zero_()
    assert max_rel_error(llm.prompt_logits(ids), with_bias) > 1e-3


def test_cache_holds_only_latent_and_rope_key():
    llm = LLM(WEIGHTS / "tiny-deepseek", num_kv_blocks=4, block_size=16)
    a = llm.model.args
    cache_bytes = sum(t.numel() * t.element_size() for t in llm.engine.runner.kv_caches)
    per_token = cache_bytes / ((4 + 1) * 16)    # the blocks asked for + one scratch block for graph padding
    assert per_token == (a.kv_lora_rank + a.qk_rope_head_dim) * a.num_hidden_layers * 4   # float32
    assert llm.model.kv_cache_bytes_per_token(torch.float32) == per_token


def test_mixed_batches_attend_per_sequence_in_either_form(monkeypatch):
    """Decode tokens batched with a prefill chunk use the absorbed form per sequence; same tokens as
    expanding everything."""
    from model_defs.deepseek import MLAttention
    calls = []
    real = MLAttention._absorbed_one
    monkeypatch.setattr(MLAttention, "_absorbed_one", lambda self, *a: calls.append(1) or real(self, *a))
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 7, 90)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for absorb in ("auto", "never"):
        llm = LLM(WEIGHTS / "tiny-deepseek", absorb=absorb, max_num_batched_tokens=24)
        outs[absorb] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert calls and outs["auto"] == outs["never"]
