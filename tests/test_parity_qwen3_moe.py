"""Qwen3-MoE family vs transformers.Qwen3MoeForCausalLM in float32: logits and greedy tokens via LLM."""

import pytest
import torch
import transformers

from hf_models import assert_matches_transformers, save_random
from moe_engine import LLM

BASE = dict(vocab_size=103, hidden_size=48, intermediate_size=56, moe_intermediate_size=20, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=2, head_dim=12, num_experts=6, num_experts_per_tok=2,
            max_position_embeddings=256, initializer_range=0.25, rope_theta=5000.0)
# Explicit head_dim (not hidden/heads), dense layers among MoE ones by both rules, both top-k weightings.
CASES = {
    "norm-step2": dict(norm_topk_prob=True, decoder_sparse_step=2),
    "nonorm-mlponly": dict(norm_topk_prob=False, mlp_only_layers=[0, 3], num_experts_per_tok=3),
}


def tiny_qwen3_moe(tmp_path, name):
    cfg = transformers.Qwen3MoeConfig(**{**BASE, **CASES[name]})
    return save_random(transformers.Qwen3MoeForCausalLM, cfg, tmp_path / name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_config_matches_transformers(tmp_path, name):
    path = tiny_qwen3_moe(tmp_path, name)
    llm = LLM(path)
    kinds = ["moe" if hasattr(layer.mlp, "routing") else "dense" for layer in llm.model.layers]
    assert "moe" in kinds and "dense" in kinds            # the config really mixes the two
    ids = torch.randint(3, 103, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    assert_matches_transformers(llm, path, ids, greedy_tokens=16)
