"""Quantized test checkpoints written beside a dequantised twin, and the checks the quantized-format tests share
(GPTQ/AWQ, compressed-tensors actorder, FP8 per tensor/channel)."""

import json
import shutil
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file, save_file

from hf_models import max_rel_error, save_random
from moe_engine import LLM, MoeEngineError, SamplingParams


def tiny_mixtral(path: Path) -> Path:
    """A tiny random Mixtral saved by transformers (per-expert w1/w2/w3 names, float32, one file)."""
    cfg = transformers.MixtralConfig(vocab_size=101, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.25)
    return save_random(transformers.MixtralForCausalLM, cfg, path)


def write_pair(src: Path, dst: Path, twin: Path, pack, qconfig: dict | None = None) -> tuple[Path, Path]:
    """dst: src with each tensor pack(name, w) takes replaced by its packed parts; twin: src with that tensor
    replaced by the dequantised values pack computed (independently of the loader). pack returns None to
    keep a tensor as it is, else (parts {full name: tensor}, dequantised tensor). A sharded index is
    rebuilt from the files; qconfig, when given, becomes dst's config.json quantization_config."""
    for folder in (dst, twin):
        shutil.copytree(src, folder)
    for f in sorted(src.glob("*.safetensors")):
        packed, plain = {}, {}
        for name, w in load_file(f).items():
            done = pack(name, w)
            if done is None:
                packed[name] = plain[name] = w
                continue
            parts, plain[name] = done
            packed.update(parts)
        save_file(packed, dst / f.name, metadata={"format": "pt"})
        save_file(plain, twin / f.name, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():           # the shards' names changed: rebuild the map from the files
        weight_map = {n: p.name for p in dst.glob("*.safetensors") for n in load_file(p)}
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if qconfig is not None:
        edit_config(dst, lambda q: q.update(qconfig))
    return dst, twin


def edit_config(folder: Path, edit) -> None:
    """Apply edit to config.json's quantization_config (created empty where missing)."""
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg.setdefault("quantization_config", {}))
    (folder / "config.json").write_text(json.dumps(cfg))


def assert_same_model(llm: LLM, ref: LLM, ids: list[int], prompts: list[list[int]], max_tokens: int) -> None:
    """llm and ref agree: prompt logits within 1e-4 relative, and the same greedy tokens for a batch."""
    assert max_rel_error(llm.prompt_logits(ids), ref.prompt_logits(ids)) <= 1e-4
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    assert ([o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            == [o.token_ids for o in ref.generate(prompt_token_ids=prompts, sampling_params=params)])


def assert_broken_copy_refused(folder: Path, dst: Path, module: str, edit_tensors, edit_q, message: str,
                               **llm_kwargs) -> None:
    """Copy folder to dst, apply edit_tensors to the shard holding module's tensors and edit_q to the
    quantization_config (either may be None); loading must fail with one line matching message."""
    shutil.copytree(folder, dst)
    if edit_tensors:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            if any(n.startswith(module + ".") for n in tensors):
                edit_tensors(tensors)
                save_file(tensors, f, metadata={"format": "pt"})
    if edit_q:
        edit_config(dst, edit_q)
    with pytest.raises(MoeEngineError, match=message) as e:
        LLM(dst, **llm_kwargs)
    assert "\n" not in str(e.value)
