"""Qwen2-MoE, OLMoE and GLM-4.5 (glm4_moe) vs transformers in float32: logits, greedy tokens, paged decode,
batching and preemption, both expert layouts, `moe-engine info`, the unknown-model_type line."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hf_models import assert_matches_transformers, hf_logits, max_rel_error, save_random
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.checkpoint import index_tensors, safetensors_files
from test_checkpoint_names import save_fused
from test_parity_mixtral import incremental_logits

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.25, rope_theta=5000.0)
QWEN2 = (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
         dict(COMMON, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16, num_experts=6,
              num_experts_per_tok=2, shared_expert_intermediate_size=24))
OLMOE = (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
         dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=6, num_experts_per_tok=2))
GLM = (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM,
       dict(COMMON, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2))
# (family, overrides): dense layers among MoE ones by each rule, shared expert on/off, qk-norm on/off, partial
# rotary at two factors (and an explicit head_dim), attention biases, clip_qkv, both top-k weightings.
CASES = {
    "qwen2-step2-bias": (QWEN2, dict(decoder_sparse_step=2, num_hidden_layers=4)),
    "qwen2-mlponly-norm-noshared": (QWEN2, dict(mlp_only_layers=[1], norm_topk_prob=True,
                                                shared_expert_intermediate_size=0, qkv_bias=False)),
    "olmoe-clip": (OLMOE, dict(clip_qkv=0.6)),
    "olmoe-bias-norm-mha": (OLMOE, dict(attention_bias=True, norm_topk_prob=True, num_key_value_heads=4)),
    "glm-half-bias-qknorm": (GLM, dict(attention_bias=True, use_qk_norm=True, routed_scaling_factor=1.8)),
    "glm-quarter-headdim-shared2-nonorm": (GLM, dict(head_dim=16, partial_rotary_factor=0.25, n_shared_experts=2,
                                                     norm_topk_prob=False, first_k_dense_replace=2, n_group=2,
                                                     topk_group=1, num_hidden_layers=4)),
}


def tiny(tmp_path, name):
    (config_cls, model_cls, base), overrides = CASES[name]
    return save_random(model_cls, config_cls(**{**base, **overrides}), tmp_path / name)


def prompt(n=40, seed=4):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_random_nonzero(path):
    """Every saved tensor with more than one value varies (no all-zero bias or all-one norm left)."""
    for name, t in load_file(path / "model.safetensors").items():
        assert t.numel() < 2 or t.float().std() > 0, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers_and_decodes_incrementally(tmp_path, name):
    path = tiny(tmp_path, name)
    assert_random_nonzero(path)
    llm = LLM(path, block_size=5, enable_prefix_caching=False)    # incremental_logits starts uncached
    kinds = {"moe" if hasattr(layer.mlp, "routing") else "dense" for layer in llm.model.layers}
    assert "moe" in kinds and (name.startswith("olmoe") or "dense" in kinds)   # OLMoE is MoE throughout
    ids = prompt()
    assert_matches_transformers(llm, path, ids, greedy_tokens=32)
    full = llm.prompt_logits(ids)
    assert max_rel_error(incremental_logits(llm, ids, 9), full[8:]) <= 1e-5


LENGTHS = [1, 3, 7, 12, 16, 21, 34, 50]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("name", ["qwen2-step2-bias", "olmoe-clip", "glm-half-bias-qknorm"])
def test_batch_equals_each_alone_with_and_without_preemption(tmp_path, name):
    path = tiny(tmp_path, name)
    prompts = [prompt(n, seed=10 + n) for n in LENGTHS]
    alone_llm = LLM(path, enable_prefix_caching=False)
    alone = [alone_llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in prompts]
    batched = LLM(path, max_num_batched_tokens=32)                      # long prompts get chunked
    assert [o.token_ids for o in batched.generate(prompt_token_ids=prompts, sampling_params=GREEDY)] == alone
    longest = max(LENGTHS) + GREEDY.max_tokens
    small = LLM(path, block_size=8, num_kv_blocks=longest // 8 + 2)
    outs = small.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free == small.engine.blocks.num_blocks


@pytest.mark.parametrize("name", ["qwen2-step2-bias", "olmoe-bias-norm-mha", "glm-half-bias-qknorm"])
def test_both_expert_layouts_load_alike(tmp_path, name):
    """save_pretrained writes the hub's per-expert names; transformers' in-memory state_dict fuses them."""
    per_expert = tiny(tmp_path, name)
    fused = save_fused(per_expert, tmp_path / "fused")
    fused_names = set(load_file(fused / "model.safetensors"))
    assert any(n.endswith("experts.gate_up_proj") for n in fused_names)
    assert not any(".experts.0." in n for n in fused_names)
    assert any(".experts.0." in n for n in index_tensors(safetensors_files(per_expert)))
    ids = prompt()
    ours_fused, ours_per_expert = LLM(fused).prompt_logits(ids), LLM(per_expert).prompt_logits(ids)
    assert torch.equal(ours_fused, ours_per_expert)
    assert max_rel_error(ours_fused, hf_logits(per_expert, ids)) <= 1e-4


@pytest.mark.parametrize("name", ["qwen2-step2-bias", "olmoe-clip", "glm-half-bias-qknorm"])
def test_info_describes_the_family(tmp_path, name, capsys):
    from moe_engine.cli import main
    path = tiny(tmp_path, name)
    assert main(["info", "--model", str(path), "--device", "cpu", "--dtype", "float32", "--quiet"]) == 0
    out = capsys.readouterr().out
    family = CASES[name][0][0].model_type
    assert family in out and "GQA, 4 query heads, 2 KV heads" in out
    assert ("sigmoid, noaux_tc" if family == "glm4_moe" else "softmax, greedy") in out
    assert ("+ 0 shared" if family == "olmoe" else "+ 1 shared") in out


def test_unknown_model_type_names_the_new_families(tmp_path):
    import json
    path = tiny(tmp_path, "olmoe-clip")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "olmoe_v9"}))
    with pytest.raises(MoeEngineError) as e:
        LLM(path)
    msg = str(e.value)
    assert "\n" not in msg and "olmoe_v9" in msg
    assert all(f in msg for f in ("qwen2_moe", "olmoe", "glm4_moe", "qwen3_moe", "mixtral", "deepseek_v3"))


def test_glm_hub_style_config(tmp_path):
    """GLM-4.5's hub config.json gives partial_rotary_factor and rope_theta at the top level (transformers 5
    writes them in rope_parameters): the same model either way, and an odd rotary width is refused clearly."""
    import json
    path = tiny(tmp_path, "glm-quarter-headdim-shared2-nonorm")
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["partial_rotary_factor"] == 0.25
    (path / "config.json").write_text(json.dumps({**cfg, "partial_rotary_factor": 0.25,
                                                  "rope_theta": rope["rope_theta"]}))
    llm = LLM(path)
    assert llm.model.rotary.dim == 4
    ids = prompt()
    assert max_rel_error(llm.prompt_logits(ids), hf_logits(path, ids)) <= 1e-4
    (path / "config.json").write_text(json.dumps({**cfg, "partial_rotary_factor": 0.2}))
    with pytest.raises(MoeEngineError, match="partial_rotary_factor=0.2 .* rotary channels") as e:
        LLM(path)
    assert "\n" not in str(e.value)
