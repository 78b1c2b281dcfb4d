"""Bad checkpoints and configs give one clear one-line MoeEngineError; rope config forms and unknown keys."""

import builtins
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import WEIGHTS
from moe_engine import LLM, MoeEngineError

MIXTRAL = WEIGHTS / "tiny-mixtral"
DEEPSEEK = WEIGHTS / "tiny-deepseek"
PROMPT_IDS = [1] + list(range(100, 140))     # BOS + 40 ordinary ids (vocab is 4096 in both)


def load(path) -> LLM:
    return LLM(path, device="cpu", dtype="float32", num_kv_blocks=8)


def load_error(path) -> str:
    """The message of the MoeEngineError that loading `path` raises; it must be a single line."""
    with pytest.raises(MoeEngineError) as info:
        load(path)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


def copy_model(tmp_path: Path, src: Path = MIXTRAL, name: str = "model") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_tensors(path: Path, edit) -> None:
    """Apply edit(shard_name, tensors) to every shard (it mutates the dict), then rewrite the index."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / shard)
        edit(shard, tensors)
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=2))


def shards(path: Path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


# --- tensors --------------------------------------------------------------------------------------------

def test_missing_tensor_is_named(tmp_path):
    path = copy_model(tmp_path)
    gone = "model.layers.2.self_attn.k_proj.weight"
    edit_tensors(path, lambda shard, t: t.pop(gone, None))
    msg = load_error(path)
    assert "missing" in msg and gone in msg


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = copy_model(tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"     # [hidden 256, intermediate 384]

    def shrink(shard, t):
        if name in t:
            t[name] = t[name][:, :100].contiguous()
    edit_tensors(path, shrink)
    msg = load_error(path)
    assert name in msg and "[256, 100]" in msg and "[256, 384]" in msg


def test_unexpected_extra_tensor_is_named(tmp_path):
    path = copy_model(tmp_path)
    extra = "model.layers.0.block_sparse_moe.router_bias"
    first = shards(path)[0]
    edit_tensors(path, lambda shard, t: t.update({extra: torch.zeros(8)}) if shard == first else None)
    msg = load_error(path)
    assert "unexpected" in msg and extra in msg


def test_several_problems_are_reported_together(tmp_path):
    path = copy_model(tmp_path)
    gone = "model.norm.weight"
    bad = "model.layers.3.self_attn.o_proj.weight"
    extra = "model.layers.1.mystery.weight"
    first = shards(path)[0]

    def edit(shard, t):
        t.pop(gone, None)
        if bad in t:
            t[bad] = t[bad].T.contiguous()[:10]
        if shard == first:
            t[extra] = torch.ones(3)
    edit_tensors(path, edit)
    msg = load_error(path)
    for word in (gone, bad, extra, "missing", "unexpected", "wrong"):
        assert word in msg


@pytest.mark.parametrize("keep", ["most", "header-only"])
def test_truncated_safetensors_file(tmp_path, keep):
    path = copy_model(tmp_path)
    shard = path / shards(path)[-1]
    data = shard.read_bytes()
    cut = len(data) - 1000 if keep == "most" else 4      # data cut short / not even a whole header length
    shard.write_bytes(data[:cut])
    msg = load_error(path)
    assert shard.name in msg and "truncated" in msg


# --- folder and config ----------------------------------------------------------------------------------

def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    msg = load_error(missing)
    assert "no-such-model" in msg and "does not exist" in msg


def test_directory_without_config_json(tmp_path):
    path = copy_model(tmp_path)
    (path / "config.json").unlink()
    msg = load_error(path)
    assert "config.json" in msg and str(path) in msg


def test_unknown_model_type(tmp_path):
    path = copy_model(tmp_path)
    edit_config(path, lambda c: c.update(model_type="gpt_oss_moe_x"))
    msg = load_error(path)
    assert "gpt_oss_moe_x" in msg and "mixtral" in msg     # names what was found and what is supported


def test_config_missing_required_field(tmp_path):
    path = copy_model(tmp_path)
    edit_config(path, lambda c: c.pop("hidden_size"))
    msg = load_error(path)
    assert "hidden_size" in msg and "config.json" in msg


@pytest.mark.parametrize("src,field,value,words", [
    (MIXTRAL, "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, ["dynamic", "rope"]),
    (MIXTRAL, "rope_scaling", {"rope_type": "linear"}, ["factor"]),
    (MIXTRAL, "num_experts_per_tok", 9, ["num_experts_per_tok"]),
    (MIXTRAL, "hidden_size", "256", ["TypeError"]),
    (DEEPSEEK, "scoring_func", "softmax_v2", ["scoring_func", "softmax_v2"]),
    (DEEPSEEK, "n_group", 3, ["n_group=3"]),
    (DEEPSEEK, "topk_group", 5, ["topk_group=5"]),
])
def test_bad_config_value(tmp_path, src, field, value, words):
    path = copy_model(tmp_path, src)
    edit_config(path, lambda c: c.update({field: value}))
    msg = load_error(path)
    assert "config.json" in msg and all(w in msg for w in words)


class _SideEffect:
    """Unpickling this creates `marker`: proof that a pickle file was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _forbid_pickle_reads(monkeypatch, opened: list):
    """Fail on any pickle load and record every Python-level open() of a .bin file."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle checkpoint was deserialised")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    real_open = builtins.open

    def watched_open(file, *args, **kwargs):
        if str(file).endswith(".bin"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", watched_open)
    monkeypatch.setattr(io, "open", watched_open)


def _write_evil_bin(path: Path) -> Path:
    marker = path.parent / "UNPICKLED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_SideEffect(str(marker))))
    return marker


def test_pickle_only_folder_is_refused_and_never_opened(tmp_path, monkeypatch):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(MIXTRAL / "config.json", path / "config.json")
    marker = _write_evil_bin(path)
    opened = []
    _forbid_pickle_reads(monkeypatch, opened)
    msg = load_error(path)
    monkeypatch.undo()
    assert "pytorch_model.bin" in msg and "safetensors" in msg
    assert opened == [] and not marker.exists()
    # The side effect is real: unpickling the file would have created the marker (this test's own file,
    # unpickled on purpose here to prove the refusal above mattered).
    pickle.loads((path / "pytorch_model.bin").read_bytes())
    assert marker.exists()


def test_pickle_beside_safetensors_is_ignored(tmp_path, monkeypatch):
    path = copy_model(tmp_path)
    marker = _write_evil_bin(path)
    opened = []
    _forbid_pickle_reads(monkeypatch, opened)
    llm = load(path)
    assert llm.prompt_logits(PROMPT_IDS[:8]).isfinite().all()
    assert opened == [] and not marker.exists()


# --- config forms ---------------------------------------------------------------------------------------

def test_rope_parameters_form_matches_classic_form_mixtral(tmp_path):
    classic = copy_model(tmp_path, name="classic")
    edit_config(classic, lambda c: c.update(rope_theta=5000.0))
    v5 = copy_model(tmp_path, name="v5")
    edit_config(v5, lambda c: (c.pop("rope_theta"), c.update(rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 5000.0})))
    bare = copy_model(tmp_path, name="bare")           # neither form: the family's default theta
    edit_config(bare, lambda c: c.pop("rope_theta"))
    ref = load(classic).prompt_logits(PROMPT_IDS)
    assert torch.equal(load(v5).prompt_logits(PROMPT_IDS), ref)
    # Guard: theta matters for these logits, so equality above is not vacuous.
    assert not torch.allclose(load(bare).prompt_logits(PROMPT_IDS), ref, atol=1e-3)


def test_rope_parameters_form_matches_classic_form_deepseek_yarn(tmp_path):
    classic = copy_model(tmp_path, DEEPSEEK, "classic")
    cfg = json.loads((classic / "config.json").read_text())
    assert cfg["rope_scaling"]["type"] == "yarn"
    v5 = copy_model(tmp_path, DEEPSEEK, "v5")
    yarn = {k: v for k, v in cfg["rope_scaling"].items() if k != "type"}
    edit_config(v5, lambda c: (c.pop("rope_theta"), c.pop("rope_scaling"),
                               c.update(rope_parameters={"rope_type": "yarn", "rope_theta": cfg["rope_theta"],
                                                         **yarn})))
    unscaled = copy_model(tmp_path, DEEPSEEK, "unscaled")
    edit_config(unscaled, lambda c: c.pop("rope_scaling"))
    ref = load(classic).prompt_logits(PROMPT_IDS)
    assert torch.equal(load(v5).prompt_logits(PROMPT_IDS), ref)
    assert not torch.allclose(load(unscaled).prompt_logits(PROMPT_IDS), ref, atol=1e-3)


def test_unknown_config_keys_are_ignored(tmp_path):
    path = copy_model(tmp_path)
    edit_config(path, lambda c: c.update(some_future_field=123, another={"nested": [1, 2]},
                                         quantum_router="yes"))
    assert torch.equal(load(path).prompt_logits(PROMPT_IDS), load(MIXTRAL).prompt_logits(PROMPT_IDS))
