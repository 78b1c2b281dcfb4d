"""MXFP4 checkpoints kept in 4 bits: gpt-oss experts held as mxfp4 QuantizedWeights with the checkpoint's bytes,
their torch reference bit for bit moe_engine.mxfp4.dequantize_mxfp4, the model equal to the dequantised one."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import max_rel_error
from kernels.moe import ClampedSwiGLU, fused_moe, fused_moe_ref
from kernels.quant import MXFP4_BLOCK, QuantizedWeight
from moe_engine import LLM, SamplingParams
from moe_engine.mxfp4 import dequantize_mxfp4
from test_gpt_oss import mxfp4_checkpoint, prompt  # noqa: F401  (a fixture)

F32 = dict(device="cpu", dtype=torch.float32)


def random_mxfp4(E: int, N: int, K: int, seed: int = 0, lo: int = 100, hi: int = 150):
    """(blocks [E, N, K/32, 16], scales [E, N, K/32]) uint8: every code, exponents in [lo, hi)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(lo, hi, (E, N, K // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def held(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    E, N, G, _ = blocks.shape
    qw = QuantizedWeight("mxfp4", (E, N, 32 * G), MXFP4_BLOCK)
    for e in range(E):
        qw[e].store_packed(blocks[e].flatten(-2), scales[e])
    return qw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_are_dequantize_mxfp4_bit_for_bit(dtype):
    """Every code, exponents over e8m0's whole range (0 and the all-ones NaN exponent included)."""
    blocks, scales = random_mxfp4(3, 10, 64, lo=0, hi=256)
    qw = held(blocks, scales)
    ref = dequantize_mxfp4(blocks, scales, dtype)                            # [3, 10, 64]
    torch.testing.assert_close(qw.dequantize(dtype), ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(qw.dequantize(dtype, 1), ref[1], rtol=0, atol=0, equal_nan=True)
    codes, exps, zero = qw.values((2,))
    assert zero is None and torch.equal(exps, scales[2])
    packed = blocks[2].flatten(-2)                                          # [10, 32]
    assert torch.equal(codes[:, 0::2], packed & 0xF) and torch.equal(codes[:, 1::2], packed >> 4)
    twin = QuantizedWeight("mxfp4", qw.shape, MXFP4_BLOCK)                  # unpacked codes pack back to the bytes
    twin.store_quantized((), *qw.values()[:2])
    assert torch.equal(twin.qweight, qw.qweight) and torch.equal(twin.scale, qw.scale)


def test_mxfp4_weight_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedWeight("mxfp4", (2, 8, 48), MXFP4_BLOCK)
    qw = QuantizedWeight("mxfp4", (2, 8, 64), MXFP4_BLOCK)
    with pytest.raises(ValueError, match="not quantized here"):
        qw.copy_(torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="store_packed wants"):
        qw[0].store_packed(torch.zeros(8, 32, dtype=torch.int8), torch.zeros(8, 2, dtype=torch.uint8))
    assert qw.describe() == "mxfp4 g32 e8m0" and qw.held_bytes() == 2 * 8 * (32 + 2)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_moe_on_mxfp4_experts_keeps_biases_and_clamp(T, backend):
    """fused_moe over mxfp4 experts (with biases and the clamped SwiGLU) equals the reference on their
    dequantised values; an expert without tokens is never dequantised (E > T * k)."""
    E, D, I, k = 6, 64, 32, 2
    b13, s13 = random_mxfp4(E, 2 * I, D, seed=1, lo=120, hi=128)
    b2, s2 = random_mxfp4(E, D, I, seed=2, lo=120, hi=128)
    w13, w2 = held(b13, s13), held(b2, s2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=gen)
    topk_weights = torch.rand(T, k, generator=gen)
    topk_ids = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(T)])   # expert E-1 unused
    bias13, bias2 = torch.randn(E, 2 * I, generator=gen), torch.randn(E, D, generator=gen)
    act = ClampedSwiGLU(1.702, 2.0)
    ours = fused_moe(x, w13, w2, topk_weights, topk_ids, backend=backend, b13=bias13, b2=bias2, activation=act)
    ref = fused_moe_ref(x, w13.dequantize(), w2.dequantize(), topk_weights, topk_ids, bias13, bias2, act)
    assert max_rel_error(ours, ref) <= 1e-6


@pytest.fixture(scope="module")
def dequantised_twin(mxfp4_checkpoint, tmp_path_factory):
    """The same model as a float32 checkpoint of transformers' dequantised tensors (the dequantise-at-load
    path's values, read as plain weights)."""
    path = tmp_path_factory.mktemp("gpt_oss_dequantised")
    state = load_file(mxfp4_checkpoint / "model.safetensors")
    for name in [n for n in state if n.endswith("_blocks")]:
        base = name.removesuffix("_blocks")
        state[base] = dequantize_mxfp4(state.pop(name), state.pop(base + "_scales")).transpose(-1, -2).contiguous()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((mxfp4_checkpoint / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_experts_are_held_as_the_checkpoints_bytes(mxfp4_checkpoint):
    llm = LLM(mxfp4_checkpoint, **F32)
    state = load_file(mxfp4_checkpoint / "model.safetensors")
    for i, layer in enumerate(llm.model.layers):
        w13, w2 = layer.mlp.w13, layer.mlp.w2
        assert all(isinstance(w, QuantizedWeight) and w.format == "mxfp4" for w in (w13, w2))
        for w in (w13, w2):          # 4.25 bits a value: 0.5 + 1/32 bytes against bf16's 2
            assert w.held_bytes() / (2 * w.numel()) == pytest.approx(17 / 64)
        down = f"model.layers.{i}.mlp.experts.down_proj"
        assert torch.equal(w2.qweight, state[down + "_blocks"].flatten(-2))
        assert torch.equal(w2.scale, state[down + "_scales"])
        gate_up = f"model.layers.{i}.mlp.experts.gate_up_proj"            # rows: gate (even), then up (odd)
        blocks, scales = state[gate_up + "_blocks"].flatten(-2), state[gate_up + "_scales"]
        assert torch.equal(w13.qweight, torch.cat([blocks[:, 0::2], blocks[:, 1::2]], 1))
        assert torch.equal(w13.scale, torch.cat([scales[:, 0::2], scales[:, 1::2]], 1))


def test_kept_model_equals_the_dequantised_one(mxfp4_checkpoint, dequantised_twin):
    kept, plain = LLM(mxfp4_checkpoint, **F32), LLM(dequantised_twin, **F32)
    assert not isinstance(plain.model.layers[0].mlp.w13, QuantizedWeight)
    for a, b in zip(kept.model.layers, plain.model.layers):
        assert torch.equal(a.mlp.w13.dequantize(), b.mlp.w13) and torch.equal(a.mlp.w2.dequantize(), b.mlp.w2)
    ids = prompt(20, seed=2)
    assert max_rel_error(kept.prompt_logits(ids), plain.prompt_logits(ids)) <= 1e-4
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    assert (kept.generate(prompt_token_ids=[ids], sampling_params=params)[0].token_ids
            == plain.generate(prompt_token_ids=[ids], sampling_params=params)[0].token_ids)


def test_quantization_asked_for_still_requantizes(mxfp4_checkpoint):
    llm = LLM(mxfp4_checkpoint, **F32, quantization="int8")
    assert llm.model.layers[0].mlp.w13.format == "int8"


def test_info_reports_mxfp4_bytes(mxfp4_checkpoint, capsys):
    from moe_engine.cli import main
    from test_cli import CPU
    assert main(["info", "--model", str(mxfp4_checkpoint), *CPU, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mxfp4 g32 e8m0" in out and "(0.266x bf16)" in out


def test_row_order_only_where_rows_are_reordered():
    from model_defs.gpt_oss import GptOssModel
    from moe_engine.mxfp4 import row_order

    class Plain:                     # no arrangement: transformers' [K, N] as it comes, blocks along K broken
        def arrange_checkpoint_tensor(self, name, t):
            return t

    class GptOss:
        arrange_checkpoint_tensor = GptOssModel.arrange_checkpoint_tensor

    assert torch.equal(row_order(GptOss(), "m.layers.0.mlp.experts.gate_up_proj", 6, 64),
                       torch.tensor([0, 2, 4, 1, 3, 5]))
    assert torch.equal(row_order(GptOss(), "m.layers.0.mlp.experts.down_proj", 64, 32), torch.arange(64))
    assert row_order(Plain(), "x", 64, 64) is None and row_order(Plain(), "x", 6, 64) is None


def test_a_tensor_that_cannot_be_kept_is_dequantised_as_before(mxfp4_checkpoint, dequantised_twin, monkeypatch):
    import moe_engine.mxfp4 as mx
    real = mx.row_order
    monkeypatch.setattr(mx, "row_order", lambda model, name, N, K: None if "down_proj" in name
                        else real(model, name, N, K))
    llm, plain = LLM(mxfp4_checkpoint, **F32), LLM(dequantised_twin, **F32)
    mlp = llm.model.layers[0].mlp
    assert isinstance(mlp.w13, QuantizedWeight) and isinstance(mlp.w2, torch.nn.Parameter)
    assert torch.equal(mlp.w2, plain.model.layers[0].mlp.w2)
    ids = prompt(12, seed=3)
    assert max_rel_error(llm.prompt_logits(ids), plain.prompt_logits(ids)) <= 1e-4
