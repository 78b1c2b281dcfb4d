"""compressed-tensors pack-quantized checkpoints: made with the compressed-tensors package itself they load
and match the model on its own dequantisation; `moe-engine quantize` output is read back by that package's
unpacker as our weights; broken checkpoints are one-line errors naming the tensor."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, WEIGHTS
from moe_engine import LLM
from moe_engine.cli import main
from moe_engine.quantize import quantized_weights
from quant_checkpoints import assert_broken_copy_refused, assert_same_model, write_pair

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


def _scheme(bits, strategy, group, symmetric):
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group))


def _quantized_name(name: str, attention: bool, head: bool) -> bool:
    """Experts (routed and shared), the attention projections and the LM head when asked; never the router."""
    if name == "lm_head.weight":
        return head
    if not name.endswith(".weight") or "norm" in name or "embed" in name:
        return False
    return ".experts." in name or ".shared_experts." in name or (attention and "self_attn" in name)


def make_ct_checkpoint(src, dst, twin, scheme, attention=False, head=False):
    """dst: src's quantized Linears compressed by compressed-tensors (its qparams, its compressor, its
    config writer); twin: the same model with those weights as compressed-tensors decompresses them (in
    float32). Per-expert names, as the hub checkpoints store them."""
    args = scheme.weights

    def pack(name, w):
        if not _quantized_name(name, attention, head) or (args.group_size and w.shape[1] % args.group_size):
            return None
        N, K = w.shape
        g = w.view(N, K // args.group_size, args.group_size) if args.group_size else w.view(N, 1, K)
        scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
        out = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero},
                                                    scheme)
        exact = dict(out, weight_scale=out["weight_scale"].float())      # decompressed in float32
        module = name.removesuffix(".weight")
        return ({f"{module}.{k}": v for k, v in out.items()},
                PackedQuantizationCompressor.decompress(exact, scheme)["weight"])

    write_pair(src, dst, twin, pack)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=[] if head else ["lm_head"])
    ModelCompressor(quantization_config=qconfig).update_config(str(dst))
    return dst, twin


SCHEMES = [("tiny-mixtral", (4, "group", 128, True), False),
           ("tiny-mixtral", (8, "channel", None, True), True),
           ("tiny-deepseek", (4, "group", 32, False), True),
           ("tiny-deepseek", (4, "channel", None, False), False)]


@pytest.mark.parametrize("name,scheme,attention", SCHEMES)
def test_compressed_tensors_checkpoint_matches_its_dequantisation(tmp_path, name, scheme, attention):
    dst, twin = make_ct_checkpoint(WEIGHTS / name, tmp_path / "ct", tmp_path / "twin", _scheme(*scheme), attention)
    llm, ref = LLM(dst), LLM(twin)
    held = quantized_weights(llm.model)
    bits = scheme[0]
    assert held and all(q.format == f"int{bits}" for q in held.values())
    assert any(".attn." in n for n in held) == attention
    stream = np.load(ROOT / f"tests/data/{name}_val_tokens.npy").astype(np.int64)
    ids = stream[300:364].tolist()
    assert_same_model(llm, ref, ids, [stream[s:s + 7].tolist() for s in (0, 50)], 10)


@pytest.mark.parametrize("name,bits", [("tiny-mixtral", 8), ("tiny-deepseek", 4)])
def test_quantized_lm_head_is_kept(tmp_path, name, bits):
    """A checkpoint that quantizes its (untied) LM head too: the head stays held in the checkpoint's scheme
    and the model matches its dequantisation."""
    scheme = _scheme(bits, "group" if bits == 4 else "channel", 32 if bits == 4 else None, True)
    dst, twin = make_ct_checkpoint(WEIGHTS / name, tmp_path / "ct", tmp_path / "twin", scheme, head=True)
    assert "lm_head.weight_packed" in {n for f in dst.glob("*.safetensors") for n in load_file(f)}
    llm, ref = LLM(dst), LLM(twin)
    held = quantized_weights(llm.model)
    args = llm.model.args
    assert held["lm_head"].format == f"int{bits}" and held["lm_head"].shape == (args.vocab_size, args.hidden_size)
    stream = np.load(ROOT / f"tests/data/{name}_val_tokens.npy").astype(np.int64)
    ids = stream[300:364].tolist()
    assert_same_model(llm, ref, ids, [stream[s:s + 7].tolist() for s in (0, 50)], 10)


@pytest.mark.parametrize("flags,scheme", [(["--quantization", "int4"], (4, "group", 128, True)),
                                          (["--quantization", "int4", "--group-size", "64", "--quant-asymmetric"],
                                           (4, "group", 64, False)),
                                          (["--quantization", "int8"], (8, "channel", None, True))])
def test_quantize_output_read_back_by_compressed_tensors(tmp_path, flags, scheme):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(WEIGHTS / "tiny-deepseek"), "--out", str(out), "--quiet"] + flags) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    qconfig = QuantizationConfig.model_validate(cfg)              # the package parses our config
    (ct_scheme,) = qconfig.config_groups.values()
    assert (ct_scheme.weights.num_bits, ct_scheme.weights.strategy, ct_scheme.weights.group_size,
            ct_scheme.weights.symmetric) == scheme
    # Ours, quantized at load the same way; what the package unpacks from the folder must equal it.
    settings = dict(quantization=f"int{scheme[0]}", quant_group_size=scheme[2] or 128, quant_symmetric=scheme[3])
    ours = quantized_weights(LLM(WEIGHTS / "tiny-deepseek", **settings).model)
    tensors = load_file(out / "model.safetensors")
    checked = 0
    for e in (0, 5, 15):
        for proj, param, rows in (("gate_proj", "w13", slice(0, 128)), ("up_proj", "w13", slice(128, 256)),
                                  ("down_proj", "w2", slice(None))):
            m = f"model.layers.2.mlp.experts.{e}.{proj}"
            state = {k: tensors[f"{m}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape",
                                                      "weight_zero_point") if f"{m}.{k}" in tensors}
            q_ours = ours[f"layers.2.mlp.{param}"]
            assert torch.equal(unpack_from_int32(state["weight_packed"], scheme[0], state["weight_shape"]),
                               q_ours.unpacked((e,))[rows])
            state["weight_scale"] = state["weight_scale"].float()
            theirs = PackedQuantizationCompressor.decompress(state, ct_scheme)["weight"]
            assert torch.equal(theirs, q_ours.dequantize(index=(e,))[rows])
            checked += 1
    assert checked == 9
    # And it loads back here as the same weights.
    back = quantized_weights(LLM(out).model)
    assert all(torch.equal(back[n].dequantize(), q.dequantize()) for n, q in ours.items()) and back.keys() == ours.keys()


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    dst, _ = make_ct_checkpoint(WEIGHTS / "tiny-mixtral", root / "ct", root / "twin", _scheme(4, "group", 128, False))
    return dst


M = "model.layers.1.block_sparse_moe.experts.3.w2"


def _drop(suffix):
    def edit(t):
        del t[f"{M}.{suffix}"]
    return edit


def _reshape_scale(t):
    t[f"{M}.weight_scale"] = t[f"{M}.weight_scale"][:, :2].contiguous()


def _group(size):
    def edit(q):
        q["config_groups"]["group_0"]["weights"]["group_size"] = size
    return edit


def _bits(q):
    q["config_groups"]["group_0"]["weights"]["num_bits"] = 3


def _format(q):
    q["format"] = "float-quantized"
    if q["config_groups"]["group_0"].get("format"):
        q["config_groups"]["group_0"]["format"] = "float-quantized"


def _mixed(q):
    q["config_groups"]["group_1"] = dict(q["config_groups"]["group_0"], targets=["re:.*self_attn.*"],
                                         format="float-quantized")


@pytest.mark.parametrize("edit_tensors,edit_config,message", [
    (_drop("weight_scale"), None, f"{M}.weight_scale is missing"),
    (_reshape_scale, None, rf"{M}.weight_scale is BF16 \[256, 2\], expected a float \[256, 3\]"),
    (_drop("weight_zero_point"), None, f"{M}.weight_zero_point is missing"),
    (None, _group(256), "group size 256 does not divide the input width 384"),
    (None, _bits, "3-bit int weights are not supported"),
    # float-quantized now loads (tests/test_fp8_tensor_channel.py): int weights under it are refused.
    (None, _format, "group_0: 4-bit int weights are not supported by the float-quantized loader"),
    (None, _mixed, "compressed-tensors format 'float-quantized' .* is not supported: .* not mixed"),
])
def test_broken_packed_checkpoint_is_one_line_error(ct_folder, tmp_path, edit_tensors, edit_config, message):
    assert_broken_copy_refused(ct_folder, tmp_path / "broken", M, edit_tensors, edit_config, message)
