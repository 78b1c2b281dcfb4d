"""The default run dtype: by the device's capability, MOE_ENGINE_DTYPE over it, --dtype over both."""

import pytest
import torch

from moe_engine import device as dev
from moe_engine.errors import MoeEngineError

CPU = torch.device("cpu")


def test_cpu_default_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("MOE_ENGINE_DTYPE", raising=False)
    monkeypatch.setattr(dev, "cpu_bf16_reason", lambda: "AVX512-BF16")
    assert dev.default_dtype(CPU) == (torch.bfloat16, "the CPU has AVX512-BF16")
    assert dev.pick_dtype(None, CPU) is torch.bfloat16 and dev.pick_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_bf16_reason", lambda: None)
    assert dev.default_dtype(CPU) == (torch.float32, "the CPU has no native bf16")


def test_env_and_explicit_dtype_win(monkeypatch):
    monkeypatch.setattr(dev, "cpu_bf16_reason", lambda: "AMX-BF16")
    monkeypatch.setenv("MOE_ENGINE_DTYPE", "float32")
    assert dev.pick_dtype(None, CPU) is torch.float32
    assert dev.pick_dtype("bf16", CPU) is torch.bfloat16
    monkeypatch.setenv("MOE_ENGINE_DTYPE", "int8")
    with pytest.raises(MoeEngineError, match="MOE_ENGINE_DTYPE='int8' is not a dtype"):
        dev.pick_dtype(None, CPU)


def test_cpu_feature_detection_reads_the_flags(monkeypatch, tmp_path):
    """The flags line of /proc/cpuinfo names the feature (x86: amx_bf16 before avx512_bf16; ARM: bf16)."""
    monkeypatch.setattr(dev.platform, "system", lambda: "Linux")
    cases = [("flags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n", "AMX-BF16"),
             ("flags\t\t: fpu sse2 avx512f avx512_bf16\n", "AVX512-BF16"),
             ("Features\t: fp asimd bf16 i8mm\n", "ARMv8.6 BF16"),
             ("flags\t\t: fpu sse2 avx2 fma\n", None)]
    for text, want in cases:
        info = tmp_path / "cpuinfo"
        info.write_text(text)
        monkeypatch.setattr(dev, "Path", lambda _p, info=info: info)
        assert dev.cpu_bf16_reason() == want, text
