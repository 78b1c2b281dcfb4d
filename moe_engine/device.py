"""Choosing the device and the run dtype."""

import torch

from moe_engine.errors import MoeEngineError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def pick_device(device: str | torch.device | None) -> torch.device:
    """None/'auto': CUDA, then MPS, then CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoeEngineError(f"unknown device {device!r}; use auto, cuda, cuda:N, mps or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoeEngineError("device cuda asked for but CUDA is not available here; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MoeEngineError("device mps asked for but MPS is not available here; use --device cpu or auto")
    if dev.type not in ("cuda", "mps", "cpu"):
        raise MoeEngineError(f"unsupported device {device!r}; use auto, cuda, mps or cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU (bf16 matmul is ~100x slower there), bfloat16 on CUDA, float16 on MPS."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":   # bf16 where the card has it (Ampere on), else fp16
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in RUN_DTYPES:      # integer, bool, complex or float8: no run dtype for the model's math
            raise MoeEngineError(f"dtype {dtype} cannot run the model; use torch.float32, torch.bfloat16 or "
                                 "torch.float16 (or the strings float32, bfloat16, float16)")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MoeEngineError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or a torch float dtype)")
    return DTYPES[dtype]
