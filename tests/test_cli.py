"""The `moe-engine` command run as a user runs it (a subprocess) on the shipped tiny checkpoints."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["weights/tiny-mixtral", "weights/tiny-deepseek"]
CPU = ["--device", "cpu", "--dtype", "float32"]


def moe_engine(*args: str, stdin: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("moe-engine")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "moe_engine"]
    env = {k: v for k, v in os.environ.items() if k != "MOE_ENGINE_MODEL"} | (env_extra or {})
    # One thread: the tiny models gain nothing from more, and on a busy machine spinning OpenMP threads
    # make a run many times slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(argv + list(args), input=stdin, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)


@pytest.mark.parametrize("model", MODELS)
def test_generate_same_seed_same_text(model):
    flags = ["generate", "--model", model, *CPU, "--max-tokens", "16", "--temperature", "0.8", "--seed", "7"]
    first = moe_engine(*flags, "def fibonacci(n):")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def fibonacci(n):") and len(first.stdout) > len("def fibonacci(n):\n")
    assert re.fullmatch(r"\[16 tokens in [\d.]+ s: [\d.]+ tokens/s.*\]\n", first.stderr), first.stderr
    # The second run reads the prompt from stdin and prints no stats: the text must be the same.
    second = moe_engine(*flags, "--quiet", "-", stdin="def fibonacci(n):")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert second.stderr == ""


def checkpoint_counts(model_dir: Path) -> tuple[int, int, int]:
    """(total, active per token, KV-cache bytes per token in float32), from the files and config alone."""
    cfg = json.loads((model_dir / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    top_k = cfg["num_experts_per_tok"]
    total = routed = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                n = math.prod(st.get_slice(name).get_shape())
                total += n
                if re.search(r"\.experts\.\d+\.", name):      # routed experts; shared_experts stay active
                    routed += n
    active = total - routed * (experts - top_k) // experts
    layers = cfg["num_hidden_layers"]
    if "kv_lora_rank" in cfg:
        kv = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * layers * 4
    else:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        kv = 2 * cfg["num_key_value_heads"] * head_dim * layers * 4
    return total, active, kv


@pytest.mark.parametrize("model", MODELS)
def test_info_counts_match_the_checkpoint(model):
    out = moe_engine("info", "--model", model, *CPU, "--quiet")
    assert out.returncode == 0, out.stderr
    total, active, kv = checkpoint_counts(ROOT / model)
    reported = re.search(r"parameters\s+([\d,]+) total .*?, ([\d,]+) active per token", out.stdout)
    assert reported, out.stdout
    assert int(reported.group(1).replace(",", "")) == total
    assert int(reported.group(2).replace(",", "")) == active
    assert re.search(rf"kv cache\s+{kv:,} bytes per token", out.stdout), out.stdout
    cfg = json.loads((ROOT / model / "config.json").read_text())
    assert cfg["model_type"] in out.stdout and "safetensors" in out.stdout


@pytest.mark.parametrize("case", ["bad path", "not a model", "bad sampling value", "unknown device",
                                  "usage error", "compile without a compiler"])
def test_errors_are_one_line(case, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    args = {
        "bad path": ["generate", "--model", str(tmp_path / "no-such-model"), "hi"],
        "not a model": ["generate", "--model", str(tmp_path), "hi"],
        "bad sampling value": ["generate", "--model", MODELS[0], "--top-p", "1.5", "hi"],
        "unknown device": ["generate", "--model", MODELS[0], "--device", "tpu", "hi"],
        "usage error": ["generate", "--model", MODELS[0], "--max-tokens", "many", "hi"],
        "compile without a compiler": ["generate", "--model", MODELS[0], *CPU, "--compile", "--quiet", "hi"],
    }[case]
    out = moe_engine(*args, env_extra={"CXX": "no-such-compiler-here"})
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    expected = {"bad path": "does not exist", "not a model": "no config.json", "bad sampling value": "top_p",
                "unknown device": "tpu", "usage error": "--max-tokens",
                "compile without a compiler": "needs a C++ compiler"}[case]
    assert expected in lines[0]


def test_no_cuda_graphs_flag_reaches_the_engine(monkeypatch):
    import moe_engine.llm
    from moe_engine.cli import build_parser, load_llm
    seen = []
    monkeypatch.setattr(moe_engine.llm, "LLM", lambda *a, **kw: seen.append((kw["config"].cuda_graphs, kw["config"].compile)))
    for argv in (["generate", "--no-cuda-graphs", "hi"], ["generate", "hi"],
                 ["generate", "--compile", "--quiet", "hi"]):
        load_llm(build_parser().parse_args(argv))
    # Graphs off when asked, else the default (on CUDA only); compile only when asked.
    assert seen == [(False, False), (None, False), (None, True)]
