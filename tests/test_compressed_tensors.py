"""compressed-tensors pack-quantized checkpoints: made with the compressed-tensors package itself they load
and match the model on its own dequantisation; `moe-engine quantize` output is read back by that package's
unpacker as our weights; broken checkpoints are one-line errors naming the tensor."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, WEIGHTS
from hf_models import max_rel_error
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.cli import main
from moe_engine.quantize import quantized_weights

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


def _scheme(bits, strategy, group, symmetric):
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group))


def _quantized_name(name: str, attention: bool) -> bool:
    """Experts (routed and shared), and the attention projections when asked; never router or head."""
    if not name.endswith(".weight") or "norm" in name or "embed" in name or name == "lm_head.weight":
        return False
    return ".experts." in name or ".shared_experts." in name or (attention and "self_attn" in name)


def make_ct_checkpoint(src, dst, twin, scheme, attention=False):
    """dst: src's quantized Linears compressed by compressed-tensors (its qparams, its compressor, its
    config writer); twin: the same model with those weights as compressed-tensors decompresses them (in
    float32). Per-expert names, as the hub checkpoints store them."""
    shutil.copytree(src, dst)
    shutil.copytree(src, twin)
    args = scheme.weights
    for f in sorted(src.glob("*.safetensors")):
        packed, plain = {}, {}
        for name, w in load_file(f).items():
            if not _quantized_name(name, attention) or (args.group_size and w.shape[1] % args.group_size):
                packed[name], plain[name] = w, w
                continue
            N, K = w.shape
            g = w.view(N, K // args.group_size, args.group_size) if args.group_size else w.view(N, 1, K)
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
            state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
            out = PackedQuantizationCompressor.compress(state, scheme)
            module = name.removesuffix(".weight")
            packed.update({f"{module}.{k}": v for k, v in out.items()})
            exact = dict(out, weight_scale=out["weight_scale"].float())      # decompressed in float32
            plain[name] = PackedQuantizationCompressor.decompress(exact, scheme)["weight"]
        (dst / f.name).unlink()
        save_file(packed, dst / f.name, metadata={"format": "pt"})
        save_file(plain, twin / f.name, metadata={"format": "pt"})
    for folder in (dst, twin):
        index = folder / "model.safetensors.index.json"
        if index.is_file():       # the shards' names changed: rebuild the map from the files
            weight_map = {n: p.name for p in folder.glob("*.safetensors") for n in load_file(p)}
            index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=["lm_head"])
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
    assert max_rel_error(llm.prompt_logits(ids), ref.prompt_logits(ids)) <= 1e-4
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [stream[s:s + 7].tolist() for s in (0, 50)]
    assert ([o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
            == [o.token_ids for o in ref.generate(prompt_token_ids=prompts, sampling_params=params)])


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


def _broken(ct_folder, tmp_path, edit_tensors=None, edit_config=None):
    dst = tmp_path / "broken"
    shutil.copytree(ct_folder, dst)
    if edit_tensors:
        for f in dst.glob("*.safetensors"):
            tensors = load_file(f)
            if edit_tensors(tensors):
                save_file(tensors, f, metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


M = "model.layers.1.block_sparse_moe.experts.3.w2"


def _drop(suffix):
    def edit(t):
        return t.pop(f"{M}.{suffix}", None) is not None
    return edit


def _reshape_scale(t):
    if f"{M}.weight_scale" not in t:
        return False
    t[f"{M}.weight_scale"] = t[f"{M}.weight_scale"][:, :2].contiguous()
    return True


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
    with pytest.raises(MoeEngineError, match=message) as e:
        LLM(_broken(ct_folder, tmp_path, edit_tensors, edit_config))
    assert "\n" not in str(e.value)
