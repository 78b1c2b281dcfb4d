"""The decode benchmark's plumbing, checked on small stand-in shapes (speed is never asserted here)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hf_models import max_rel_error
from moe_engine import LLM
from moe_engine.bench.decode import main as bench_decode_main
from moe_engine.bench.models import build_random, hf_twin


@pytest.mark.parametrize("name", ["mixtral-tiny", "deepseek-tiny"])
def test_transformers_twin_shares_weights_and_agrees(name):
    """The GPU benchmark runs transformers on our tensors (no second copy): same logits, same memory."""
    model = build_random(name, "cpu", torch.float32)
    hf = hf_twin(model, name)
    ids = list(range(5, 45))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert max_rel_error(LLM.from_model(model).prompt_logits(ids), ref) <= 1e-4
    ours = {p.untyped_storage().data_ptr() for p in model.parameters()}
    theirs = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert theirs <= ours                       # every transformers tensor lives in one of ours
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())


def test_bench_decode_runs_and_writes_json(tmp_path):
    out = tmp_path / "decode.json"
    assert bench_decode_main(["--device", "cpu", "--models", "mixtral-tiny,deepseek-tiny", "--batches", "1,2",
                              "--new-tokens", "4", "--prompt-len", "8", "--no-compile", "--llamacpp", "none", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("mixtral-tiny", 1), ("mixtral-tiny", 2),
                                                         ("deepseek-tiny", 1), ("deepseek-tiny", 2)]
    assert all(r["ours_decode_tok_s"] > 0 and r["hf_decode_tok_s"] > 0 for r in rows)
    assert not any(r["compiled"] or "ours_eager_decode_tok_s" in r for r in rows)


def test_bench_decode_without_a_compiler_times_eager_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    out = tmp_path / "decode.json"
    assert bench_decode_main(["--device", "cpu", "--models", "mixtral-tiny", "--batches", "1", "--new-tokens", "4",
                              "--prompt-len", "8", "--no-hf", "--repeats", "1", "--llamacpp", "none", "--out", str(out)]) == 0
    assert "timing eager decode only: compile=True needs a C++ compiler" in capsys.readouterr().out
    [row] = json.loads(out.read_text())["rows"]
    assert not row["compiled"] and row["ours_decode_tok_s"] > 0


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None, reason="torch.compile needs a C++ compiler")
def test_bench_decode_on_the_cpu_compiles_by_default_and_times_eager_beside(tmp_path):
    out = tmp_path / "decode.json"
    assert bench_decode_main(["--device", "cpu", "--models", "mixtral-tiny", "--batches", "1", "--new-tokens", "4",
                              "--prompt-len", "8", "--no-hf", "--repeats", "1", "--llamacpp", "none", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["compiled"] and row["startup_s"] > 0
    assert row["ours_decode_tok_s"] > 0 and row["ours_eager_decode_tok_s"] > 0


@pytest.mark.parametrize("name", ["mixtral-tiny", "deepseek-tiny"])
def test_bfloat16_paths_run_and_stay_close(name):
    """The GPU default dtype, exercised on the CPU: our bf16 model and its bf16 transformers twin (router
    weights kept in float32 on our side) agree with the float32 model to bf16 precision."""
    ids = list(range(5, 37))
    ref = LLM.from_model(build_random(name, "cpu", torch.float32)).prompt_logits(ids)
    model = build_random(name, "cpu", torch.bfloat16)
    ours = LLM.from_model(model).prompt_logits(ids)
    with torch.no_grad():
        theirs = hf_twin(model, name)(torch.tensor([ids])).logits[0].float()
    assert max_rel_error(ours, ref) < 0.05 and max_rel_error(theirs, ref) < 0.05
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("module", ["decode", "kv", "spec", "quant_quality", "routing", "serve"])
def test_benchmarks_find_the_shipped_weights(module):
    """Each benchmark's default models are read from the repository's weights/ folder."""
    import importlib
    repo = importlib.import_module(f"moe_engine.bench.{module}").REPO
    assert (repo / "weights" / "tiny-mixtral" / "config.json").is_file(), repo


def test_the_default_model_is_found_from_any_directory(tmp_path, monkeypatch):
    from moe_engine.cli import DEFAULT_MODEL, resolve_model
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOE_ENGINE_MODEL", raising=False)
    assert (Path(resolve_model(DEFAULT_MODEL)) / "config.json").is_file()


def test_bench_decode_times_quantized_rows_beside_the_unquantized(tmp_path):
    """--quantization none,int8: a row per way of holding the experts, the quantized one built directly in
    its held format, with its ratio to the unquantized row of the same batch."""
    out = tmp_path / "decode.json"
    assert bench_decode_main(["--device", "cpu", "--shape", "mixtral-tiny", "--quantization", "none,int8",
                              "--batches", "1", "--new-tokens", "4", "--prompt-len", "8", "--no-compile",
                              "--repeats", "1", "--llamacpp", "none", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["quantization"] for r in rows] == ["none", "int8"]
    assert "hf_decode_tok_s" in rows[0] and "hf_decode_tok_s" not in rows[1]
    assert rows[1]["vs_unquantized"] == rows[1]["ours_decode_tok_s"] / rows[0]["ours_decode_tok_s"]
    # the limit counts the bytes as held: int8 experts move about half of bf16's / a quarter of float32's
    assert rows[1]["bandwidth_limit_tok_s"] > 1.3 * rows[0]["bandwidth_limit_tok_s"]


def test_random_quantized_shapes_are_built_in_their_held_format():
    from moe_engine.quantize import QuantSpec, quantized_weights
    model = build_random("mixtral-tiny", "cpu", torch.bfloat16, quantization=QuantSpec("int4", group_size=32))
    held = quantized_weights(model)
    assert held and all(q.format == "int4" for q in held.values())
    assert not any(n.endswith(("mlp.w13", "mlp.w2")) for n, _ in model.named_parameters())
    w = next(iter(held.values())).dequantize()
    assert 0.3 < float(w.std() * w.shape[-1] ** 0.5) < 3          # a spread like the full-precision weights'


def test_every_benchmark_shape_builds_and_its_quantized_bytes_fit_the_machine_it_is_for():
    """Each random shape builds (on the meta device: no memory); the ones named for a 24 GB CPU machine fit
    it as the benchmark holds them (Qwen3-30B-A3B only with int4 experts)."""
    from model_defs.moe import MoEBlock
    from moe_engine.bench.models import SHAPES, hf_config_dict, _classes
    from moe_engine.cli.info import parameter_bytes
    from moe_engine.quantize import QuantSpec, quantize_weights
    for name in SHAPES:
        args_cls, model_cls = _classes(hf_config_dict(name))
        with torch.device("meta"):
            model = model_cls(args_cls.from_hf_config(hf_config_dict(name)), dtype=torch.bfloat16)
        assert any(isinstance(m, MoEBlock) for m in model.modules()), name
    with torch.device("meta"):
        args_cls, model_cls = _classes(hf_config_dict("qwen3-30b-a3b"))
        model = model_cls(args_cls.from_hf_config(hf_config_dict("qwen3-30b-a3b")), dtype=torch.bfloat16)
    assert parameter_bytes(model)[0] > 60e9
    quantize_weights(model, QuantSpec("int4"), "meta")
    assert parameter_bytes(model)[0] < 20e9
