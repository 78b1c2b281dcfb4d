"""Test set-up: float32 on the CPU, Triton in interpreter mode when there is no GPU, shared fixtures."""

import os
from pathlib import Path

import torch

# Triton reads this when a kernel is defined, so it must be set before kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
