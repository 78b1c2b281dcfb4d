"""Name tables: both expert layouts load alike and match transformers; the tables name the shipped checkpoints."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import test_parity_deepseek as deepseek
import test_parity_mixtral as mixtral
import test_parity_qwen3_moe as qwen3_moe
from conftest import WEIGHTS
from hf_models import hf_logits, max_rel_error
from moe_engine import LLM, MoeEngineError
from moe_engine.checkpoint import index_tensors, read_config, safetensors_files
from model_defs import model_family

FAMILIES = {
    "mixtral": (lambda tmp: mixtral.tiny_mixtral(tmp, "gqa3-e5-k2"), mixtral.prompt),
    "deepseek": (lambda tmp: deepseek.tiny_deepseek(tmp, "v3-qlora-yarn-dense1-shared1-bias"), deepseek.prompt),
    "qwen3_moe": (lambda tmp: qwen3_moe.tiny_qwen3_moe(tmp, "nonorm-mlponly"), lambda: mixtral.prompt(vocab=103)),
}


def save_fused(src: Path, dst: Path) -> Path:
    """The checkpoint as transformers holds it in memory (state_dict): experts fused into gate_up_proj
    [E, 2I, D] and down_proj [E, D, I] (Mixtral's block under `mlp`); written with safetensors."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".safetensors.index.json")):    # config.json and the rest
            shutil.copy(f, dst / f.name)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_layout_loads_like_per_expert_and_matches_transformers(tmp_path, family):
    make, prompt = FAMILIES[family]
    per_expert = make(tmp_path)
    fused = save_fused(per_expert, tmp_path / "fused")
    names = set(load_file(fused / "model.safetensors"))
    assert any(n.endswith("experts.gate_up_proj") for n in names)
    assert not any(".experts.0." in n for n in names)                     # really the fused layout
    assert any(".experts.0." in n for n in index_tensors(safetensors_files(per_expert)))
    ids = prompt()
    ours_fused, ours_per_expert = LLM(fused).prompt_logits(ids), LLM(per_expert).prompt_logits(ids)
    assert torch.equal(ours_fused, ours_per_expert)
    assert max_rel_error(ours_fused, hf_logits(per_expert, ids)) <= 1e-4


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek"])
def test_table_names_exactly_the_shipped_checkpoint(name):
    path, cfg = read_config(WEIGHTS / name)
    args_cls, model_cls = model_family(cfg["model_type"])
    with torch.device("meta"):
        model = model_cls(args_cls.from_hf_config(cfg))
    tensors = index_tensors(safetensors_files(path))
    assert set(model.checkpoint_targets(tensors)) == set(tensors)
    assert set(model.checkpoint_targets()) == set(tensors)     # the default layout is the hub's


def _edit_fused(tmp_path, edit) -> Path:
    fused = save_fused(FAMILIES["deepseek"][0](tmp_path), tmp_path / "fused")
    state = load_file(fused / "model.safetensors")
    edit(state)
    save_file(state, fused / "model.safetensors")
    return fused


def test_missing_fused_tensor_is_named(tmp_path):
    gone = "model.layers.1.mlp.experts.down_proj"
    with pytest.raises(MoeEngineError) as e:
        LLM(_edit_fused(tmp_path, lambda s: s.pop(gone)))
    msg = str(e.value)
    assert "missing 1" in msg and gone in msg and "\n" not in msg


def test_misshaped_fused_tensor_is_named_with_both_shapes(tmp_path):
    name = "model.layers.2.mlp.experts.gate_up_proj"
    holder = {}

    def shrink(state):
        holder["shape"] = list(state[name].shape)
        state[name] = state[name][:, :-1].contiguous()
    with pytest.raises(MoeEngineError) as e:
        LLM(_edit_fused(tmp_path, shrink))
    E, two_i, D = holder["shape"]
    msg = str(e.value)
    assert f"{name} has shape {[E, two_i - 1, D]}, expected {[E, two_i, D]}" in msg and "\n" not in msg


def test_mixed_layouts_in_one_layer_are_named(tmp_path):
    extra = "model.layers.1.mlp.experts.0.gate_proj.weight"
    with pytest.raises(MoeEngineError) as e:
        LLM(_edit_fused(tmp_path, lambda s: s.update({extra: torch.zeros(24, 48)})))
    msg = str(e.value)
    assert "layer 1" in msg and extra in msg and "model.layers.1.mlp.experts.gate_up_proj" in msg


def test_kimi_k2_is_built_as_deepseek_v3():
    """kimi_k2 configs name DeepSeek-V3's architecture: the same model and names from the same config."""
    cfg = read_config(WEIGHTS / "tiny-deepseek")[1]
    built = {}
    for model_type in ("deepseek_v3", "kimi_k2"):
        args_cls, model_cls = model_family(model_type)
        args = args_cls.from_hf_config({**cfg, "model_type": model_type})
        with torch.device("meta"):
            built[model_type] = (args.routing(), model_cls(args).checkpoint_targets())
    assert built["kimi_k2"] == built["deepseek_v3"]
