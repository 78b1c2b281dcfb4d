"""compressed-tensors activation ordering (actorder): pack-quantized checkpoints with `X.weight_g_idx`, made
with the compressed-tensors package's own qparams, compressor, packer and config writer, load and match the
model on the package's own dequantisation. Groups permuted whole stay quantized; groups interleaved along
the input are dequantised at load with one warning; a broken g_idx is a one-line error naming it.

compressed-tensors 0.20 dropped actorder="group" (it no longer writes or reads g_idx), so the g_idx layout is
the one its earlier releases published (quantization/lifecycle/forward.py, `_process_quantization`): the
columns sorted by g_idx (argsort) are quantized in contiguous runs of group_size, the j-th run taking scale
column j, and put back in column order; a g_idx holding -1 is "not set", column order. actorder="weight"
reorders only while GPTQ runs and stores no g_idx."""

import warnings

import numpy as np
import pytest
import torch

from conftest import ROOT, WEIGHTS
from moe_engine import LLM
from moe_engine.quantize import quantized_weights
from quant_checkpoints import assert_broken_copy_refused, assert_same_model, edit_config, write_pair

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


def group_index(kind: str, K: int, group: int, gen) -> torch.Tensor | None:
    """A layer's g_idx [K]: "blocks" (whole groups permuted), "interleaved" (GPTQ's activation order: a
    random permutation of the columns), "identity", "unset" (all -1) or "none" (no g_idx stored)."""
    in_order = torch.arange(K) // group
    G = K // group
    if kind == "blocks":
        order = torch.randperm(G, generator=gen)
        return (order if not torch.equal(order, torch.arange(G)) else order.flip(0))[in_order]
    if kind == "interleaved":
        perm = torch.randperm(K, generator=gen)           # the order the inputs were quantized in
        g_idx = torch.empty(K, dtype=torch.long)
        g_idx[perm] = in_order
        return g_idx
    return {"identity": in_order, "unset": torch.full((K,), -1), "none": None}[kind]


def compress_actorder(w: torch.Tensor, g_idx: torch.Tensor | None, scheme):
    """One Linear's compressed tensors and the package's dequantisation of them (float32 [N, K])."""
    args = scheme.weights
    N, K = w.shape
    column_order = g_idx is None or bool((g_idx == -1).any())
    perm = torch.arange(K) if column_order else torch.argsort(g_idx, stable=True)   # [K]: inputs by group
    undo = torch.argsort(perm)
    sorted_w = w[:, perm]                                                             # [N, K], groups contiguous
    runs = sorted_w.view(N, K // args.group_size, args.group_size)
    scale, zero = calculate_qparams(runs.amin(-1), runs.amax(-1), args)
    out = PackedQuantizationCompressor.compress({"weight": sorted_w, "weight_scale": scale,
                                                 "weight_zero_point": zero}, scheme)
    exact = dict(out, weight_scale=out["weight_scale"].float())                       # decompressed in float32
    deq = PackedQuantizationCompressor.decompress(exact, scheme)["weight"][:, undo]
    q = unpack_from_int32(out["weight_packed"], args.num_bits, out["weight_shape"])[:, undo]   # [N, K] int8
    out["weight_packed"] = pack_to_int32(q, args.num_bits)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out, deq


def make_actorder_checkpoint(src, dst, twin, bits, group, symmetric, actorder, kind_of):
    """dst: src's Linears that kind_of(module) names a g_idx kind for, compressed with actorder; twin: the same
    model with those weights as compressed-tensors dequantises them. Returns {module: kind}."""
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group, actorder="weight"))
    gen = torch.Generator().manual_seed(0)
    kinds = {}

    def pack(name, w):
        module = name.removesuffix(".weight")
        kind = kind_of(module) if name.endswith(".weight") else None
        if kind is None:
            return None
        kinds[module] = kind
        out, deq = compress_actorder(w, group_index(kind, w.shape[1], group, gen), scheme)
        return {f"{module}.{k}": v for k, v in out.items()}, deq

    write_pair(src, dst, twin, pack)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=["lm_head"])
    ModelCompressor(quantization_config=qconfig).update_config(str(dst))
    # Written after the package's config writer: compressed-tensors 0.20 refuses actorder "group" itself.
    edit_config(dst, lambda q: q["config_groups"]["group_0"]["weights"].update(actorder=actorder))
    return kinds


def mixtral_kinds(module):
    """Experts permuted whole (one expert unset), but layer 1 expert 3's w1 interleaved; attention interleaved."""
    if module == "model.layers.1.block_sparse_moe.experts.3.w1" or ".self_attn." in module:
        return "interleaved"
    if ".experts.5." in module:
        return "unset"
    return "blocks" if ".experts." in module else None


def deepseek_kinds(module):
    """Routed experts interleaved; shared experts identity; attention (not its norms) permuted whole."""
    if "norm" in module:
        return None
    if ".mlp.experts." in module:
        return "interleaved"
    if ".shared_experts." in module:
        return "identity"
    return "blocks" if ".self_attn." in module else None


def weight_kinds(module):
    """actorder="weight": no g_idx stored."""
    return "none" if ".experts." in module or ".self_attn." in module else None


# (model, bits, group, symmetric, actorder label, kinds, held quantized after load)
CASES = [("tiny-mixtral", 4, 128, False, "group", mixtral_kinds,
          {f"layers.{i}.mlp.{w}" for i in range(4) for w in ("w13", "w2")} - {"layers.1.mlp.w13"}),
         ("tiny-deepseek", 8, 32, True, "dynamic", deepseek_kinds, None),
         ("tiny-mixtral", 4, 64, True, "weight", weight_kinds, None)]


@pytest.mark.parametrize("name,bits,group,symmetric,actorder,kind_of,held_names", CASES,
                         ids=[c[0] + "-" + c[4] for c in CASES])
def test_actorder_checkpoint_matches_its_dequantisation(tmp_path, name, bits, group, symmetric, actorder, kind_of,
                                                        held_names):
    dst, twin = tmp_path / "ct", tmp_path / "twin"
    kinds = make_actorder_checkpoint(WEIGHTS / name, dst, twin, bits, group, symmetric, actorder, kind_of)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(dst, dtype=torch.float32)
    messages = [str(w.message) for w in caught if "actorder" in str(w.message)]
    interleaved = sum(k == "interleaved" for k in kinds.values())
    assert len(messages) == (1 if interleaved else 0)
    if interleaved:
        assert messages[0].startswith(f"compressed-tensors actorder: {interleaved} of {len(kinds)} quantized layers")
    ref = LLM(twin, dtype=torch.float32)
    held = quantized_weights(llm.model)
    assert held and all(q.format == f"int{bits}" and q.group_size == group and q.asymmetric != symmetric
                        for q in held.values())
    if held_names is not None:
        assert set(held) == held_names
    if name == "tiny-deepseek":        # routed experts dequantised; shared experts and attention held
        assert not any(n.endswith((".mlp.w13", ".mlp.w2")) for n in held)
        assert any(".attn." in n for n in held) and any("shared" in n for n in held)
    stream = np.load(ROOT / f"tests/data/{name}_val_tokens.npy").astype(np.int64)
    ids = stream[300:364].tolist()
    assert_same_model(llm, ref, ids, [stream[s:s + 7].tolist() for s in (0, 50)], 10)


# -- bad input ------------------------------------------------------------------------------------------------

M = "model.layers.1.block_sparse_moe.experts.3.w2"     # [256, 384], group 128: G = 3


@pytest.fixture(scope="module")
def actorder_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("actorder")
    make_actorder_checkpoint(WEIGHTS / "tiny-mixtral", root / "ct", root / "twin", 4, 128, False, "group",
                             lambda m: "blocks" if ".experts." in m else None)
    return root / "ct"


def _g_idx(change):
    def edit(t):
        t[f"{M}.weight_g_idx"] = change(t[f"{M}.weight_g_idx"].clone()).contiguous()
    return edit


def _set(k, value):
    def change(g):
        g[k] = value
        return g
    return change


def _stray(t):
    t["model.layers.0.block_sparse_moe.gate.weight_g_idx"] = torch.zeros(256, dtype=torch.int32)


def _actorder(q):
    q["config_groups"]["group_0"]["weights"]["actorder"] = "sideways"


@pytest.mark.parametrize("edit_tensors,edit_config,message", [
    (_g_idx(lambda g: g.float()), None, rf"{M}.weight_g_idx is F32 \[384\], expected I32 \[384\]"),
    (_g_idx(lambda g: g[:383]), None, rf"{M}.weight_g_idx is I32 \[383\], expected I32 \[384\]"),
    (_g_idx(lambda g: g[None]), None, rf"{M}.weight_g_idx is I32 \[1, 384\], expected I32 \[384\]"),
    (_g_idx(_set(7, 3)), None, rf"{M}.weight_g_idx holds groups outside 0\.\.2 \(min 0, max 3\)"),
    (_g_idx(_set(0, -2)), None, rf"{M}.weight_g_idx holds groups outside 0\.\.2 \(min -2"),
    (_g_idx(_set(slice(0, 5), -1)), None, rf"{M}.weight_g_idx holds groups outside 0\.\.2 \(min -1"),
    (_stray, None, r"model\.layers\.0\.block_sparse_moe\.gate\.weight_g_idx has no .*gate\.weight_packed"),
    (None, _actorder, r"actorder 'sideways' is not known"),
])
def test_broken_g_idx_is_one_line_error(actorder_folder, tmp_path, edit_tensors, edit_config, message):
    assert_broken_copy_refused(actorder_folder, tmp_path / "broken", M, edit_tensors, edit_config, message,
                               dtype=torch.float32)
