"""Choosing between a Triton kernel and its torch reference: 'auto', 'triton' or 'torch'."""

import functools
import importlib

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """'auto': Triton when every tensor is on CUDA and triton imports; 'triton' forces it (on the CPU that
    needs TRITON_INTERPRET=1 set before the kernels are imported); 'torch' is the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'moe-engine[triton]'")
        return True
    return all(t.is_cuda for t in tensors) and triton_available()
