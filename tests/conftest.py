"""Test set-up: float32 on the CPU, Triton in interpreter mode when there is no GPU, shared fixtures."""

import os
from pathlib import Path

import torch

# Triton reads this when a kernel is defined, so it must be set before kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The parity tests compare against transformers in float32: on a CPU with native bf16 the default would
# be bfloat16, so the suite (and the CLI processes it starts, which inherit this) asks for float32.
os.environ.setdefault("MOE_ENGINE_DTYPE", "float32")

# Tiny models: one thread per process is as fast and does not thrash when the 2 cores are shared.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """test_kernels runs CPU tensors through Triton's interpreter; with a GPU (and no TRITON_INTERPRET)
    those tests cannot run, and its gpu-marked tests check the same kernels compiled."""
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET"):
        return
    skip = pytest.mark.skip(reason="interpreter test: run without a GPU, or with TRITON_INTERPRET=1")
    for item in items:
        if item.module.__name__.endswith("test_kernels") and "gpu" not in item.keywords:
            item.add_marker(skip)
