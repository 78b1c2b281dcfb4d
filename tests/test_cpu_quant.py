"""The CPU's fused quantized products (kernels.cpu_quant, torch's int8 / int4 packed-weight ops) and the
half-precision few-row products, each against the torch reference it stands in for."""

import pytest
import torch
import torch.nn.functional as F

import kernels.moe as moe
from kernels import cpu_quant, linear as lin
from kernels.cpu_quant import cpu_quantized_linear
from kernels.moe import ClampedSwiGLU, fused_moe, fused_moe_ref
from kernels.quant import QuantizedWeight
from kernels.quant_ops import quantized_linear, quantized_linear_ref

needs_int4_op = pytest.mark.skipif(cpu_quant.int4_pack_block() == 0,
                                   reason="this torch build has no CPU int4 packed-weight op")


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _weight(fmt, shape, group=None, asym=False, seed=0):
    torch.manual_seed(seed)
    qw = QuantizedWeight(fmt, shape, (1, group or shape[-1]), asym)
    qw.copy_(torch.randn(shape) / shape[-1] ** 0.5)
    return qw


CASES = [("int8", None, False), ("int4", 32, False), ("int4", 64, True), ("int4", 128, False), ("int4", 128, True)]


@pytest.mark.parametrize("fmt,group,asym", CASES)
def test_fused_product_matches_the_dequantised_weight(fmt, group, asym):
    """bf16 activations: the op's sums against F.linear in float32 on the dequantised expert, within bf16
    rounding; float32 activations and prefill-sized batches are left to the reference (None)."""
    if fmt == "int4" and cpu_quant.int4_pack_block() == 0:
        pytest.skip("this torch build has no CPU int4 packed-weight op")
    qw = _weight(fmt, (3, 128, 256), group, asym)
    bias = torch.randn(128)
    for rows in (1, 5):
        x = torch.randn(rows, 256).bfloat16()
        got = cpu_quantized_linear(x, qw, (2,), bias.bfloat16())
        want = F.linear(x.float(), qw.dequantize(torch.float32, (2,)), bias)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 128)
        assert _rel(got, want) <= 2e-2, rows
        assert cpu_quantized_linear(x.float(), qw, (2,)) is None
    many = torch.randn(cpu_quant.FUSED_MAX_ROWS[fmt] + 1, 256).bfloat16()
    assert cpu_quantized_linear(many, qw, (2,)) is None


@needs_int4_op
@pytest.mark.parametrize("asym", [False, True])
def test_int4_in_the_op_order_keeps_its_values_bytes_and_writes(asym):
    """Packing for the op changes no value (values() reads it back exactly), holds no more bytes than the
    limit the quantization issue sets (int4 g128 <= 0.27x bf16), takes writes, and leaves for our order."""
    qw = _weight("int4", (2, 128, 256), 128, asym)
    before = qw.values((1,))
    qw.cpu_packed()
    assert qw.op_order
    after = qw.values((1,))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert (before[2] is None) == (after[2] is None) and (before[2] is None or torch.equal(before[2], after[2]))
    assert qw.held_bytes() <= 0.27 * qw.numel() * 2
    rows = qw.values((0, slice(64, 128)))                    # a row slice reads the right rows
    assert torch.equal(rows[0], qw.values((0,))[0][64:])
    expert0 = qw.values((0,))[0]
    new = torch.randn(128, 256)
    qw[1].copy_(new)                                         # a write goes back to our order first
    fresh = QuantizedWeight("int4", (2, 128, 256), (1, 128), asym)
    fresh[1].copy_(new)
    assert not qw.op_order and torch.equal(qw.values((1,))[0], fresh.values((1,))[0])
    assert torch.equal(qw.values((0,))[0], expert0)        # the other expert is untouched
    qw.cpu_packed()
    qw.to(torch.float32)                                     # any .to() leaves the op's order
    assert not qw.op_order and torch.equal(qw.values((1,))[0], fresh.values((1,))[0])


def test_formats_the_ops_do_not_take_run_the_reference():
    """fp8 and int8 in groups: no fused op (None), and the entry point's answer is the reference's."""
    for qw in (_weight("fp8", (64, 128)), _weight("int8", (64, 128), 32)):
        x = torch.randn(3, 128)
        assert cpu_quantized_linear(x, qw) is None
        assert torch.equal(quantized_linear(x, qw), quantized_linear_ref(x, qw))


@pytest.mark.parametrize("tokens", [1, 6])
def test_quantized_experts_on_the_cpu_match_the_reference(tokens):
    """fused_moe with int4 gate/up and int8 down, biases and gpt-oss's clamped activation, eagerly on the
    CPU in bf16 (the fused path) against fused_moe_ref in float32 (dequantised experts)."""
    E, D, I = 6, 128, 64
    w13 = _weight("int4" if cpu_quant.int4_pack_block() else "int8", (E, 2 * I, D), 32)
    w2 = _weight("int8", (E, D, I), seed=1)
    b13, b2 = torch.randn(E, 2 * I), torch.randn(E, D)
    x = torch.randn(tokens, D).bfloat16()
    weights, ids = torch.rand(tokens, E).softmax(-1).topk(2)
    for kw in ({}, {"b13": b13, "b2": b2, "activation": ClampedSwiGLU()}):
        got = fused_moe(x, w13, w2, weights, ids, **{n: v.bfloat16() if torch.is_tensor(v) else v for n, v in kw.items()})
        assert got.dtype == torch.bfloat16
        assert _rel(got, fused_moe_ref(x.float(), w13, w2, weights, ids, **kw)) <= 3e-2


def test_the_entry_points_take_the_fused_ops_eagerly_on_the_cpu_only(monkeypatch):
    calls = []
    real = cpu_quant.cpu_quantized_linear

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(moe, "cpu_quantized_linear", spy)
    E, D, I = 4, 64, 32
    w13, w2 = _weight("int8", (E, 2 * I, D)), _weight("int8", (E, D, I))
    weights, ids = torch.rand(2, E).softmax(-1).topk(2)
    x = torch.randn(2, D).bfloat16()
    fused_moe(x, w13, w2, weights, ids, backend="torch")
    assert not calls
    fused_moe(x, w13, w2, weights, ids)
    assert calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("routes", [("mv", "mm"), ("linear", "linear"), None])
def test_narrow_rows_product_is_f_linear(monkeypatch, dtype, rows, routes):
    """Every route narrow_routes can pick (None: the one measured on this machine) gives F.linear's product."""
    if routes is not None:
        monkeypatch.setattr(lin, "narrow_routes", lambda dtype: routes)
    w = torch.randn(256, 512).to(dtype)
    x = torch.randn(rows, 512).to(dtype)
    assert _rel(lin.narrow_rows_product(x, w), F.linear(x.float(), w.float())) <= 1e-2


def test_narrow_routes_are_measured_once():
    routes = lin.narrow_routes(torch.bfloat16)
    assert routes[0] in ("mv", "linear") and routes[1] in ("mm", "linear")
    assert lin.narrow_routes(torch.bfloat16) is routes


def test_large_half_precision_weights_take_the_narrow_rows_forms(monkeypatch):
    """kernels.linear.linear and the MoE's CPU path pick them for bf16 weights over NARROW_MIN_WEIGHT at
    decode sizes (not for float32, small weights or prefill-sized batches), and agree with the reference."""
    w = torch.randn(256, 512).bfloat16()
    assert not lin.takes_narrow_rows(torch.randn(2, 512).bfloat16(), w)          # too small
    monkeypatch.setattr(lin, "NARROW_MIN_WEIGHT", 1)
    monkeypatch.setattr(moe, "NARROW_MIN_WEIGHT", 1)
    assert lin.takes_narrow_rows(torch.randn(2, 512).bfloat16(), w)
    assert not lin.takes_narrow_rows(torch.randn(2, 512), w.float())
    assert not lin.takes_narrow_rows(torch.randn(lin.NARROW_MAX_ROWS + 1, 512).bfloat16(), w)
    E, D, I = 8, 128, 64
    w13, w2 = (torch.randn(E, 2 * I, D) / D ** 0.5).bfloat16(), (torch.randn(E, D, I) / I ** 0.5).bfloat16()
    for tokens in (1, 5):
        x = torch.randn(tokens, D).bfloat16()
        weights, ids = torch.rand(tokens, E).softmax(-1).topk(2)
        assert moe._cpu_path(x, w13, w2, ids) is moe.fused_moe_narrow
        assert moe._cpu_path(x.float(), w13.float(), w2.float(), ids) is not moe.fused_moe_narrow
        assert _rel(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x.float(), w13.float(), w2.float(),
                                                                        weights, ids)) <= 2e-2
