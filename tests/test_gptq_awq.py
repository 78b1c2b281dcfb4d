"""GPTQ and AWQ (GEMM) checkpoints, packed here by the published layouts from a tiny random Mixtral (experts
and attention quantized, per-expert hub names), load and match the same model on their dequantised values;
broken ones are one-line errors naming the tensor.

The packers below are written from the published layouts, not from moe_engine.gptq_awq:
  GPTQ: AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py `QuantLinear.pack` (qweight [K*b/32, N]:
    input k = i*32/b + j at bits j*b of row i; qzeros [G, N*b/32] the same along the output, written as
    zeros - 1 in the v1 format); GPTQModel gptqmodel/utils/model.py `convert_gptq_v1_to_v2_format` (v2: zeros
    as they are, v1 -> v2 adds one to each packed zero); vLLM vllm/model_executor/layers/quantization/gptq.py
    (g_idx [K], the input's group; desc_act quantizes inputs in a permuted order, g_idx[perm[j]] = j // g).
  AWQ GEMM: AutoAWQ awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear` and awq/utils/packing_utils.py
    (qweight [K, N/8], qzeros [G, N/8]: nibble i of word w holds output w*8 + [0, 2, 4, 6, 1, 3, 5, 7][i];
    weight = (q - zero) * scale, scales [G, N]); vLLM vllm/model_executor/layers/quantization/awq.py."""


import pytest
import torch
from safetensors.torch import load_file

from moe_engine import LLM
from moe_engine.quantize import quantized_weights
from quant_checkpoints import assert_broken_copy_refused, tiny_mixtral, write_pair
from quant_checkpoints import assert_same_model as shared_assert_same_model

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _quantized(name, skip=()):
    return (name.endswith(".weight") and (".experts." in name or ".self_attn." in name)
            and not any(name.startswith(s + ".") for s in skip))


def _word(values, bits, order=None):
    """[.., 32/bits] unsigned ints -> int32 words, value i at bits i*bits (order: value order[i] there)."""
    per = 32 // bits
    v = values.long() if order is None else values.long()[..., order]
    word = sum(v[..., i] << (bits * i) for i in range(per))
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32).contiguous()


def _qparams(w, bits, sym, g_idx, G, v1):
    """Round-to-nearest per group (the inputs k with g_idx[k] == g): unsigned q [N, K], zeros [G, N], fp16
    scales [G, N], and the dequantised weight (float32, from the fp16 scales)."""
    maxq = (1 << bits) - 1
    lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(G)]).clamp(max=0)      # [G, N]
    hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(G)]).clamp(min=0)
    if sym:
        scale = (torch.maximum(-lo, hi) / ((maxq - 1) / 2)).clamp(min=1e-6).half()
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.long)
    else:
        scale = ((hi - lo) / maxq).clamp(min=1e-6).half()
        zero = torch.round(-lo / scale.float()).long().clamp(1 if v1 else 0, maxq)    # v1 cannot store 0
    s, z = scale.float().t()[:, g_idx], zero.t()[:, g_idx]                              # [N, K]
    q = (torch.round(w / s) + z).clamp(0, maxq).long()
    return q, zero, scale, (q - z).float() * s


def gptq_tensors(module, w, bits, group, sym, v1, order="sorted"):
    """One Linear's GPTQ tensors and its dequantised weight. order: g_idx sorted (desc_act off), "blocks"
    (desc_act, each group a contiguous run, runs permuted) or "interleaved" (desc_act, a random permutation)."""
    N, K = w.shape
    gs = group if group > 0 else K
    G = K // gs
    g_idx = torch.arange(K) // gs
    if order == "blocks":
        g_idx = torch.randperm(G)[g_idx]
    elif order == "interleaved":
        perm = torch.randperm(K)                          # the order the inputs were quantized in
        g_idx = torch.empty(K, dtype=torch.long)
        g_idx[perm] = torch.arange(K) // gs
    q, zero, scale, deq = _qparams(w, bits, sym, g_idx, G, v1)
    per = 32 // bits
    stored = zero - 1 if v1 else zero
    return {f"{module}.qweight": _word(q.t().reshape(K // per, per, N).transpose(1, 2), bits),   # [K*b/32, N]
            f"{module}.qzeros": _word(stored.reshape(G, N // per, per), bits),                  # [G, N*b/32]
            f"{module}.scales": scale.contiguous(), f"{module}.g_idx": g_idx.to(torch.int32)}, deq


def awq_tensors(module, w, group):
    N, K = w.shape
    G = K // group
    q, zero, scale, deq = _qparams(w, 4, False, torch.arange(K) // group, G, False)
    return {f"{module}.qweight": _word(q.t().reshape(K, N // 8, 8), 4, AWQ_PACK_ORDER),        # [K, N/8]
            f"{module}.qzeros": _word(zero.reshape(G, N // 8, 8), 4, AWQ_PACK_ORDER),          # [G, N/8]
            f"{module}.scales": scale.contiguous()}, deq


def make_checkpoint(src, dst, twin, qconfig, pack):
    """dst: src with its expert and attention Linears packed by pack(module, w) -> (parts, dequantised);
    twin: src with those weights replaced by their dequantised values (float32)."""
    skip = qconfig.get("modules_to_not_convert") or ()
    return write_pair(src, dst, twin, lambda name, w: pack(name.removesuffix(".weight"), w.float())
                      if _quantized(name, skip) else None, qconfig)


def gptq_config(bits, group, sym, v2, desc_act=False):
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
            "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq_v2" if v2 else "gptq"}


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
              "modules_to_not_convert": ["model.layers.0.self_attn"]}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_mixtral(tmp_path_factory.mktemp("mixtral") / "float")


def assert_same_model(dst, twin):
    llm, ref = LLM(dst, dtype=torch.float32), LLM(twin, dtype=torch.float32)
    ids = torch.randint(3, 101, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    shared_assert_same_model(llm, ref, ids, [ids[:7], ids[9:20]], 8)
    return quantized_weights(llm.model)


# (bits, group, sym, v2): 4 and 8 bits, sym and asym, v1 and v2, group 32 and per channel.
GPTQ_CASES = [(4, 32, True, False), (4, 32, False, True), (8, -1, False, False), (8, 32, True, True),
              (4, -1, True, True)]


@pytest.mark.parametrize("bits,group,sym,v2", GPTQ_CASES)
def test_gptq_checkpoint_matches_its_dequantisation(src, tmp_path, bits, group, sym, v2):
    dst, twin = make_checkpoint(src, tmp_path / "gptq", tmp_path / "twin", gptq_config(bits, group, sym, v2),
                                lambda m, w: gptq_tensors(m, w, bits, group, sym, not v2))
    held = assert_same_model(dst, twin)
    assert {n.rsplit(".", 1)[-1] for n in held} == {"w13", "w2", "wqkv", "wo"} and len(held) == 8
    assert all(q.format == f"int{bits}" and q.asymmetric != sym and q.group_size == (q.shape[-1] if group < 0 else 32)
               for q in held.values())


def test_gptq_desc_act(src, tmp_path):
    """Experts: activation-ordered groups that are contiguous runs (held quantized, scales reordered);
    attention: groups interleaved along the input (dequantised at load, with a warning)."""
    def pack(module, w):
        return gptq_tensors(module, w, 4, 32, sym=False, v1=True,
                            order="interleaved" if ".self_attn." in module else "blocks")

    dst, twin = make_checkpoint(src, tmp_path / "gptq", tmp_path / "twin", gptq_config(4, 32, sym=False, v2=False,
                                                                                   desc_act=True), pack)
    with pytest.warns(UserWarning, match=r"desc_act: 8 of 32 quantized layers .* dequantised"):
        held = assert_same_model(dst, twin)
    assert sorted(held) == [f"layers.{i}.mlp.{w}" for i in (0, 1) for w in ("w13", "w2")]


def test_awq_checkpoint_matches_its_dequantisation(src, tmp_path):
    dst, twin = make_checkpoint(src, tmp_path / "awq", tmp_path / "twin", AWQ_CONFIG,
                                lambda m, w: awq_tensors(m, w, 32))
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(dst / "model.safetensors")   # not converted
    held = assert_same_model(dst, twin)
    assert "layers.0.attn.wqkv" not in held and "layers.1.attn.wqkv" in held and len(held) == 6
    assert all(q.format == "int4" and q.asymmetric and q.group_size == 32 for q in held.values())


# -- bad input ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    gptq, _ = make_checkpoint(src, root / "gptq", root / "gptq-twin", gptq_config(4, 32, sym=False, v2=True),
                              lambda m, w: gptq_tensors(m, w, 4, 32, sym=False, v1=False))
    awq, _ = make_checkpoint(src, root / "awq", root / "awq-twin", AWQ_CONFIG, lambda m, w: awq_tensors(m, w, 32))
    return {"gptq": gptq, "awq": awq}


M = "model.layers.1.block_sparse_moe.experts.2.w2"


def _drop(part):
    def edit(t):
        del t[f"{M}.{part}"]
    return edit


def _narrow_scales(t):
    t[f"{M}.scales"] = t[f"{M}.scales"][:2].contiguous()


def _config(**changes):
    def edit(q):
        q.update(changes)
    return edit


@pytest.mark.parametrize("kind,edit_tensors,edit_config,message", [
    ("gptq", _drop("scales"), None, f"{M}.scales is missing"),
    ("gptq", _drop("qzeros"), None, f"{M}.qzeros is missing"),
    ("awq", _drop("scales"), None, f"{M}.scales is missing"),
    ("awq", _drop("qzeros"), None, f"{M}.qzeros is missing"),
    ("gptq", _narrow_scales, None, rf"{M}.scales is F16 \[2, 64\], expected a float \[3, 64\]"),
    ("awq", _narrow_scales, None, rf"{M}.scales is F16 \[2, 64\], expected a float \[3, 64\]"),
    ("gptq", None, _config(sym=True), r"experts\.0\.w1\.qzeros: sym is true but the zero points are not 8"),
    ("gptq", None, _config(bits=3), "GPTQ bits=3 is not supported"),
    ("gptq", None, _config(bits=2), "GPTQ bits=2 is not supported"),
    ("awq", None, _config(bits=8), "AWQ bits=8 is not supported"),
    ("awq", None, _config(version="gemv"), "AWQ version 'gemv' is not supported"),
    ("gptq", None, _config(group_size=48), r"\.qweight: group size 48 does not divide the input width 64"),
    ("awq", None, _config(group_size=64), r"experts\.0\.w2\.qweight: group size 64 does not divide the input width 96"),
])
def test_broken_checkpoint_is_one_line_error(folders, tmp_path, kind, edit_tensors, edit_config, message):
    assert_broken_copy_refused(folders[kind], tmp_path / "broken", M, edit_tensors, edit_config, message,
                               dtype=torch.float32)
