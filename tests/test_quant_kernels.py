"""The Triton few-token kernel for int8 / int4 weights (kernels/triton_quant_gemv.py) against the torch
references it stands in for, under the interpreter here (small, ragged shapes; group sizes; zero points)."""

import pytest
import torch
import torch.nn.functional as F

from kernels.backend import triton_available
from kernels.moe import ClampedSwiGLU, fused_moe, fused_moe_ref
from kernels.quant import QuantizedWeight
from kernels.quant_ops import quantized_linear, quantized_linear_ref
from test_cpu_quant import _rel, _weight

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


# (format, group, zero points, N, K): ragged N and K against the 32 x 64 band, groups under and over it
LINEAR = [("int8", None, False, 40, 72), ("int4", 32, False, 33, 96), ("int4", 64, True, 48, 128),
          ("int4", 128, True, 20, 256), ("int4", None, False, 24, 50)]


@pytest.mark.parametrize("case", LINEAR, ids=lambda c: "{}-g{}-z{}-N{}-K{}".format(*c))
@pytest.mark.parametrize("rows", [1, 3])
def test_quantized_linear_kernel_matches_reference(case, rows):
    fmt, group, asym, N, K = case
    qw = _weight(fmt, (N, K), group, asym)
    x, bias = torch.randn(rows, K), torch.randn(N)
    got = quantized_linear(x, qw, bias, backend="triton")
    assert _rel(got, quantized_linear_ref(x, qw, bias)) <= 1e-5


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("fmts", [("int4", "int8"), ("int8", "int4")])
def test_quantized_experts_kernel_matches_reference(tokens, fmts):
    """Gate/up and down held in either format, with and without gpt-oss's biases and clamped activation."""
    E, D, I = 5, 64, 32
    w13 = _weight(fmts[0], (E, 2 * I, D), 32, fmts[0] == "int4")
    w2 = _weight(fmts[1], (E, D, I), 32 if fmts[1] == "int4" else None, seed=1)
    x = torch.randn(tokens, D)
    weights, ids = torch.rand(tokens, E).softmax(-1).topk(2)
    for kw in ({}, {"b13": torch.randn(E, 2 * I), "b2": torch.randn(E, D), "activation": ClampedSwiGLU()}):
        got = fused_moe(x, w13, w2, weights, ids, backend="triton", **kw)
        assert _rel(got, fused_moe_ref(x, w13, w2, weights, ids, **kw)) <= 1e-5


def test_fp8_and_larger_batches_run_the_reference():
    """fp8 has no kernel here, and past QUANT_GEMV_MAX_TOKENS the reference runs: same answers."""
    qw = _weight("fp8", (16, 64))
    x = torch.randn(2, 64)
    assert torch.equal(quantized_linear(x, qw, backend="triton"), quantized_linear_ref(x, qw))
    E, D, I = 3, 32, 16
    w13, w2 = _weight("int8", (E, 2 * I, D)), _weight("int8", (E, D, I))
    x = torch.randn(20, D)
    weights, ids = torch.rand(20, E).softmax(-1).topk(2)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids, backend="triton"), fused_moe_ref(x, w13, w2, weights, ids))


def test_the_entry_points_reach_the_kernel(monkeypatch):
    """backend='triton' (and 'auto' on CUDA) runs the kernel, not the reference it is checked against."""
    import kernels.triton_quant_gemv as tq
    calls = []
    real = tq.quant_gemv
    monkeypatch.setattr(tq, "quant_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    qw = _weight("int4", (16, 64), 32)
    quantized_linear(torch.randn(1, 64), qw, backend="triton")
    assert len(calls) == 1
    w13, w2 = _weight("int8", (3, 32, 32)), _weight("int4", (3, 32, 16), 16)
    weights, ids = torch.rand(1, 3).softmax(-1).topk(2)
    fused_moe(torch.randn(1, 32), w13, w2, weights, ids, backend="triton")
    assert len(calls) == 3
