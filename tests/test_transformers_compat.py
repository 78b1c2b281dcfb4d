"""Our top-level `kernels` package must not confuse transformers (which looks for the hub's `kernels`)."""

import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path

import torch
from transformers.utils import import_utils

import kernels
import moe_engine
from conftest import ROOT, WEIGHTS
from hf_models import max_rel_error
from moe_engine import LLM

MIXTRAL = WEIGHTS / "tiny-mixtral"
TEXT_IDS = [1, 668, 296, 4021, 4036, 283, 3, 261, 386, 660]     # BOS "def f(x):\n    return x"


def _is_018(version: str) -> bool:
    return version.split(".")[:2] == ["0", "18"]


def test_version_is_clear_of_0_18():
    installed = importlib.metadata.version("moe-engine")
    assert installed == moe_engine.__version__
    assert not _is_018(installed) and not _is_018(moe_engine.__version__)


def test_kernels_is_ours():
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert Path(inspect.getsourcefile(kernels.fused_moe)).resolve().parent == ROOT / "kernels"
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(2, 12, 8), torch.randn(2, 8, 6)
    ids, weights = torch.tensor([[0], [1], [0]]), torch.ones(3, 1)
    torch.testing.assert_close(kernels.fused_moe(x, w13, w2, weights, ids),
                               kernels.fused_moe_ref(x, w13, w2, weights, ids))


def test_transformers_does_not_take_ours_for_the_hub_kernels():
    assert not import_utils.is_kernels_available()


def test_transformers_loads_and_runs_tiny_mixtral(tmp_path):
    """A fresh interpreter that imports our packages before transformers, as an application would, loads
    the shipped checkpoint with AutoModelForCausalLM and runs it; its logits match ours."""
    out = tmp_path / "logits.pt"
    script = (
        "import pathlib, kernels, moe_engine, torch, transformers\n"
        "from transformers.utils import import_utils\n"
        f"assert pathlib.Path(kernels.__file__).resolve() == pathlib.Path({str(ROOT / 'kernels' / '__init__.py')!r})\n"
        "assert callable(kernels.fused_moe)\n"
        "assert not import_utils.is_kernels_available()\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(MIXTRAL)!r}, dtype=torch.float32).eval()\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(torch.tensor([{TEXT_IDS}])).logits[0], {str(out)!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(out, weights_only=True)
    assert theirs.shape == (len(TEXT_IDS), 4096) and theirs.isfinite().all()
    ours = LLM(MIXTRAL, device="cpu", dtype="float32", num_kv_blocks=4).prompt_logits(TEXT_IDS)
    assert max_rel_error(ours, theirs) <= 1e-4
