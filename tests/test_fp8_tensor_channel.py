"""FP8 checkpoints with per-tensor and per-channel scales (compressed-tensors float-quantized, made with the
compressed-tensors package itself; quant_method "fp8" per tensor, written by the published AutoFP8 layout)
load kept in FP8 and match the same model run on their independently dequantised weights; broken ones are
one-line errors naming the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import max_rel_error
from moe_engine import LLM, MoeEngineError
from moe_engine.quantize import quantized_weights
from quant_checkpoints import assert_broken_copy_refused, assert_same_model, tiny_mixtral, write_pair

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

FP8_MAX = 448.0
M = "model.layers.1.block_sparse_moe.experts.2.w1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_mixtral(tmp_path_factory.mktemp("fp8tc") / "mixtral")


def _quantized_name(name: str) -> bool:
    """Experts and attention projections; never router, norms, embedding or head."""
    return name.endswith(".weight") and any(k in name for k in (".experts.", ".self_attn.", ".mlp.")) and (
        "norm" not in name and not name.endswith(".gate.weight"))


def _write(src, dst, twin, quantize, config: dict | None):
    """dst: src with each quantized Linear's weight replaced by quantize(w) -> {part: tensor}; twin: the same
    model with weight = q.float() * scale, no quantization."""
    def pack(name, w):
        if not _quantized_name(name) or w.dim() != 2:
            return None
        parts = quantize(w)
        module = name.removesuffix(".weight")
        scale = parts["weight_scale"].float().reshape(-1, 1)                      # [1, 1] or [N, 1]
        return {f"{module}.{k}": v for k, v in parts.items()}, parts["weight"].float() * scale

    return write_pair(src, dst, twin, pack, config)


def _ct_scheme(strategy: str) -> QuantizationScheme:
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy),
        input_activations=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor",
                                           dynamic=False))


def make_ct_fp8(src, dst, twin, strategy: str):
    """compressed-tensors float-quantized (FP8 W8A8, static activations): the package's qparams, compressor and
    config writer; `input_scale` is a made-up static activation scale (we ignore it)."""
    scheme = _ct_scheme(strategy)

    def quantize(w):
        lo, hi = (w.amin().reshape(1), w.amax().reshape(1)) if strategy == "tensor" else (
            w.amin(1, keepdim=True), w.amax(1, keepdim=True))
        scale, zero = calculate_qparams(lo, hi, scheme.weights)
        parts = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero},
                                                     scheme)
        return dict(parts, input_scale=torch.tensor([0.02]))

    _write(src, dst, twin, quantize, None)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="float-quantized",
                                 quantization_status="compressed", ignore=["lm_head", "re:.*block_sparse_moe.gate$"])
    ModelCompressor(quantization_config=qconfig).update_config(str(dst))
    return dst, twin


def make_autofp8(src, dst, twin, activation_scheme="static"):
    """quant_method fp8 per tensor (AutoFP8 / vLLM's fp8 method): a scalar weight_scale (w ~ q * scale) and a
    scalar input_scale, written by that published layout."""
    def quantize(w):
        scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)                   # []
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": scale, "input_scale": torch.tensor(0.05)}

    return _write(src, dst, twin, quantize, {"quant_method": "fp8", "activation_scheme": activation_scheme,
                                             "ignored_layers": ["lm_head"]})


def _check_matches(dst, twin):
    llm, ref = LLM(dst), LLM(twin)
    held = quantized_weights(llm.model)
    # Every expert stack and attention projection kept: float8 values as stored, a scale per row.
    assert len(held) == 2 * (2 + len(list(llm.model.layers[0].attn.projections())))
    assert {q.describe() for q in held.values()} == {"fp8 channel"}
    assert all(q.qweight.dtype == torch.float8_e4m3fn for q in held.values())
    numel = sum(q.numel() for q in held.values())
    assert sum(q.held_bytes() for q in held.values()) <= 0.55 * 2 * numel       # ~half of bf16
    ids = torch.randint(3, 101, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    assert_same_model(llm, ref, ids, [ids[:7], ids[20:31]], 10)
    return llm


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors_fp8_is_kept_and_matches_dequantised(tiny, tmp_path, strategy):
    dst, twin = make_ct_fp8(tiny, tmp_path / "ct", tmp_path / "twin", strategy)
    _check_matches(dst, twin)


@pytest.mark.parametrize("activation_scheme", ["static", "dynamic"])
def test_fp8_per_tensor_is_kept_and_matches_dequantised(tiny, tmp_path, activation_scheme):
    dst, twin = make_autofp8(tiny, tmp_path / "fp8", tmp_path / "twin", activation_scheme)
    llm = _check_matches(dst, twin)
    # The experts' different per-tensor scales became per-row scales of the stack: gate and up of expert 2.
    tensors = load_file(dst / "model.safetensors")
    w13 = quantized_weights(llm.model)["layers.1.mlp.w13"]
    for part, rows in (("w1", slice(0, 96)), ("w3", slice(96, 192))):
        scale = tensors[f"model.layers.1.block_sparse_moe.experts.2.{part}.weight_scale"]
        assert torch.equal(w13.scale[2, rows], scale.float().expand(96, 1))
        assert torch.equal(w13.qweight[2, rows].view(torch.uint8),
                           tensors[f"model.layers.1.block_sparse_moe.experts.2.{part}.weight"].view(torch.uint8))


def test_e5m2_weights_are_dequantised(tiny, tmp_path):
    """e5m2 has no kernel here: such a weight loads exactly as q.float() * scale, in full precision."""
    def quantize(w):
        scale = (w.abs().amax() / 57344.0).clamp(min=1e-12)
        return {"weight": (w / scale).to(torch.float8_e5m2), "weight_scale": scale}

    dst, twin = _write(tiny, tmp_path / "e5m2", tmp_path / "twin", quantize, {"quant_method": "fp8"})
    llm, ref = LLM(dst), LLM(twin)
    assert not quantized_weights(llm.model)
    ids = list(range(3, 40))
    assert max_rel_error(llm.prompt_logits(ids), ref.prompt_logits(ids)) <= 1e-5


def test_mps_dequantises(tiny, tmp_path):
    """MPS has no float8: the loader holds nothing in fp8 there and writes q.float() * scale instead (checked
    on the CPU through the same seam, as no MPS device is here)."""
    from moe_engine.checkpoint import index_tensors
    from moe_engine.fp8_scaled import read_scaled_fp8
    from moe_engine.loader import _Holding
    from safetensors import safe_open
    dst, _ = make_autofp8(tiny, tmp_path / "fp8", tmp_path / "twin")
    llm = LLM(tiny)
    tensors = index_tensors([dst / "model.safetensors"])
    packed = read_scaled_fp8(json.loads((dst / "config.json").read_text()), tensors)
    model = llm.model
    _Holding(None, packed, None, tensors, tensors, False).apply(model, model.checkpoint_targets(packed.tensors), "cpu", "mps")
    assert not quantized_weights(model)
    dest = torch.empty(96, 64)
    with safe_open(dst / "model.safetensors", framework="pt") as f:
        packed.write(f"{M}.weight", {dst / "model.safetensors": f}, tensors, dest)
        assert torch.equal(dest, f.get_tensor(f"{M}.weight").float() * f.get_tensor(f"{M}.weight_scale").float())


@pytest.fixture(scope="module")
def ct_channel(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ctc")
    dst, _ = make_ct_fp8(tiny, root / "ct", root / "twin", "channel")
    return dst


def _drop_scale(t):
    del t[f"{M}.weight_scale"]


def _widen_scale(t):
    t[f"{M}.weight_scale"] = torch.ones(3, 3)


def _int8_weight(t):
    t[f"{M}.weight"] = t[f"{M}.weight"].view(torch.int8)


def _group(**kw):
    def edit(q):
        q["config_groups"]["group_0"]["weights"].update(kw)
    return edit


@pytest.mark.parametrize("edit_tensors,edit_config,message", [
    (_drop_scale, None, rf"{M}.weight is fp8 but its scale {M}.weight_scale is missing"),
    (_widen_scale, None, rf"{M}.weight_scale is F32 \[3, 3\], expected a float \[96, 1\] \(per channel\)"),
    (_int8_weight, None, rf"{M}.weight is I8 beside {M}.weight_scale, expected F8_E4M3"),
    (None, _group(num_bits=4), "group_0: 4-bit float weights are not supported"),
    (None, _group(strategy="diagonal"), "fp8 weight strategy 'diagonal' is not supported"),
])
def test_broken_fp8_checkpoint_is_one_line_error(ct_channel, tmp_path, edit_tensors, edit_config, message):
    assert_broken_copy_refused(ct_channel, tmp_path / "bad", M, edit_tensors, edit_config, message)


def test_per_tensor_scale_of_wrong_shape(tiny, tmp_path):
    dst, _ = make_ct_fp8(tiny, tmp_path / "ct", tmp_path / "twin", "tensor")
    f = dst / "model.safetensors"
    t = load_file(f)
    t[f"{M}.weight_scale"] = torch.ones(96, 1)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(MoeEngineError, match=rf"{M}.weight_scale is F32 \[96, 1\], expected a float \[1\] "
                                             r"\(per tensor\)"):
        LLM(dst)


def test_deepseek_mla_per_tensor(tmp_path):
    """tiny-deepseek (MLA, shared experts, a dense first layer) per tensor: the fused q_a+kv_a stack and the
    experts held in fp8 with a scale per row; MLA's kv_b (not quantizable) gets its dequantised values."""
    from conftest import WEIGHTS
    dst, twin = make_autofp8(WEIGHTS / "tiny-deepseek", tmp_path / "fp8", tmp_path / "twin")
    llm, ref = LLM(dst), LLM(twin)
    held = quantized_weights(llm.model)
    assert {"layers.1.mlp.w13", "layers.1.mlp.w2"} <= set(held) and not any(n.endswith("kv_b") for n in held)
    assert {q.describe() for q in held.values()} == {"fp8 channel"}
    ids = list(range(3, 60))
    assert max_rel_error(llm.prompt_logits(ids), ref.prompt_logits(ids)) <= 1e-4
