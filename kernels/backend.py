"""Choosing an op's form: a Triton kernel, a torch formulation for the CPU (eager or compiled), or the reference."""

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
    for t in tensors:        # a loop, not all(...): asked by every op of a decode step
        if not t.is_cuda:
            return False
    return triton_available()


FORMS = ("triton", "compiled", "cpu", "torch")


def form(backend: str, *tensors: torch.Tensor) -> str:
    """The one dispatch decision of a kernel entry point, for the tensors it would hand a kernel: 'triton'
    where use_triton says so; else, for CPU tensors (the first one's device) under backend 'auto',
    'compiled' while torch.compile traces (the formulations it fuses: gathers inside reductions, no host
    round trip, no data-pointer test) and 'cpu' when run eagerly (the few-call forms measured faster
    there); else 'torch', the reference. The only place kernels/ asks whether torch.compile is tracing."""
    if use_triton(backend, *tensors):
        return "triton"
    if backend != "auto" or tensors[0].device.type != "cpu":
        return "torch"
    return "compiled" if torch.compiler.is_compiling() else "cpu"
