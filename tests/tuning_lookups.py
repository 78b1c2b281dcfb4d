"""Every tuning lookup over a grid of devices and shapes, as JSON: dumped from the pre-data kernels/tuning.py
into tests/data/tuning_lookups.json, and compared against the current lookups by tests/test_tuning.py."""

import json
import sys
from dataclasses import asdict
from unittest import mock

import torch

DEVICES = ("sm90", "sm80", "interpreter")
DTYPES = (torch.bfloat16, torch.float32)
MOE_SHAPES = [(8, 4096, 14336), (64, 2048, 1408), (8, 32, 48), (16, 1024, 512)]      # (experts, dim, inter)
LINEAR_SHAPES = [(8, 4096), (64, 2048), (4096, 512), (2048, 2048), (2048, 2816), (3648, 2048), (5632, 2048),
                 (4096, 4096), (2048, 10944), (6144, 4096), (21888, 2048), (32000, 4096), (102400, 2048),
                 (128, 256)]
ABSORB_SHAPES = [(16, 128, 512), (4, 16, 32), (128, 128, 512), (2, 8, 16)]


def lookups() -> dict[str, object]:
    """'kind|device|args...' -> the lookup's result as a dict (None: no entry)."""
    from kernels import tuning
    cpu, out = torch.device("cpu"), {}
    for dev in DEVICES:
        with mock.patch.object(tuning, "device_key", lambda d, dev=dev: dev):
            for dt in DTYPES:
                name = str(dt).removeprefix("torch.")
                for E, D, I in MOE_SHAPES:
                    for pairs in (1, 2, 8, 16 * E, 64 * E, 256 * E, 1024 * E):
                        out[f"moe|{dev}|{pairs}|{E}|{name}|{D}|{I}"] = asdict(
                            tuning.moe_tuning(cpu, pairs, E, dt, D, I))
                    out[f"gemv|{dev}|{D}|{I}|{name}"] = asdict(tuning.gemv_tuning(cpu, D, I, dt))
                for head_dim in (64, 128, 256, 576):
                    for group in (1, 8, 16, 32):
                        out[f"decode|{dev}|{head_dim}|{group}|{name}"] = asdict(
                            tuning.decode_tuning(cpu, head_dim, group, dt))
            for n, k in LINEAR_SHAPES:
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    t = tuning.linear_tuning(cpu, n, k, dt)
                    out[f"linear|{dev}|{n}|{k}|{str(dt).removeprefix('torch.')}"] = t and asdict(t)
            for H, nope, lora in ABSORB_SHAPES:
                out[f"absorb|{dev}|{H}|{nope}|{lora}"] = asdict(tuning.absorb_tuning(cpu, H, nope, lora))
    return out


if __name__ == "__main__":
    json.dump(lookups(), open(sys.argv[1], "w"), indent=0, sort_keys=True)
