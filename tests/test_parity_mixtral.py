"""Mixtral family vs transformers.MixtralForCausalLM in float32: logits, greedy tokens, incremental decode."""

import pytest
import torch
import transformers

from hf_models import assert_matches_transformers, max_rel_error, save_random
from conftest import WEIGHTS
from moe_engine import LLM, SamplingParams

# Varied shapes: GQA ratio, experts, top-k, odd hidden/intermediate sizes, rope theta.
CONFIGS = {
    "gqa3-e5-k2": dict(hidden_size=48, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                       num_local_experts=5, num_experts_per_tok=2, rope_theta=5000.0),
    "mha-e4-k1": dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=4,
                      num_local_experts=4, num_experts_per_tok=1, rope_theta=10000.0),
    "mqa-e8-k3-odd": dict(hidden_size=36, intermediate_size=27, num_attention_heads=3, num_key_value_heads=1,
                          num_local_experts=8, num_experts_per_tok=3, rope_theta=1e6),
    "gqa4-e6-k4-headdim": dict(hidden_size=40, intermediate_size=52, num_attention_heads=8, num_key_value_heads=2,
                               head_dim=6, num_local_experts=6, num_experts_per_tok=4, rope_theta=500.0),
    "tied": dict(hidden_size=32, intermediate_size=20, num_attention_heads=4, num_key_value_heads=2,
                 num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=True),
}


def tiny_mixtral(tmp_path, name):
    cfg = transformers.MixtralConfig(vocab_size=101, num_hidden_layers=3, max_position_embeddings=256,
                                     initializer_range=0.25, **CONFIGS[name])
    return save_random(transformers.MixtralForCausalLM, cfg, tmp_path / name)


def prompt(n=40, vocab=101, seed=1):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_config_matches_transformers(tmp_path, name):
    path = tiny_mixtral(tmp_path, name)
    assert_matches_transformers(LLM(path), path, prompt())


def test_shipped_tiny_mixtral_matches_transformers():
    path = WEIGHTS / "tiny-mixtral"
    llm = LLM(path)
    ids = llm.tokenizer.encode("import os\n\ndef walk(top):\n    for root, dirs, files in os.walk(top):\n")
    assert_matches_transformers(llm, path, ids)


def incremental_logits(llm: LLM, ids: list[int], split: int) -> torch.Tensor:
    """Logits of positions split-1 .. end, computed by a prefill of ids[:split] then one token per step
    through the engine's paged cache."""
    from moe_engine.scheduler import ScheduledBatch
    from moe_engine.sequence import Sequence
    engine = llm.engine
    seq = Sequence(10_000, ids[:split], SamplingParams(max_tokens=len(ids)), llm.max_model_len)
    assert engine.blocks.allocate_prompt(seq, split) and seq.num_cached == 0
    rows = [engine.forward(ScheduledBatch([seq], [split]))[0][0]]
    for t in ids[split:]:
        seq.output_ids.append(t)
        engine.blocks.grow(seq, 1)
        rows.append(engine.forward(ScheduledBatch([seq], [1]))[0][0])
    engine.blocks.release(seq)
    return torch.stack(rows)


@pytest.mark.parametrize("block_size", [16, 5])
def test_incremental_decode_equals_full_forward(block_size):
    llm = LLM(WEIGHTS / "tiny-mixtral", block_size=block_size)
    ids = llm.tokenizer.encode("class Stack:\n    def __init__(self):\n        self.items = []\n")
    full = llm.prompt_logits(ids)
    split = len(ids) // 2
    assert max_rel_error(incremental_logits(llm, ids, split), full[split - 1:]) <= 1e-5
