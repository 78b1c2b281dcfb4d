"""Quantized weights: the in-memory formats, their ops against dequantised references, quantizing at load
(exactness against the dequantised model, bytes held, bad settings) and the CLI flags."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, WEIGHTS
from hf_models import max_rel_error
from kernels.moe import fused_moe, fused_moe_ref
from kernels.linear import linear
from kernels.quant import CLIP_GRID, QuantizedWeight, pack_int4, quantize_fp8, quantize_int
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.cli import main
from moe_engine.cli.info import tensor_groups
from moe_engine.quantize import held_weight, quantized_weights

# block None: one scale per output channel.
FORMATS = [("int8", None, False), ("int4", (1, 128), False), ("int4", (1, 32), True),
           ("fp8", None, False), ("fp8", (128, 128), False)]


def _filled(fmt, block, asym, w):
    qw = QuantizedWeight(fmt, w.shape, block or (1, w.shape[-1]), asym)
    qw.copy_(w)
    return qw


@pytest.mark.parametrize("fmt,block,asym", FORMATS)
def test_dequantize_is_close_and_written_by_parts_equals_whole(fmt, block, asym):
    w = torch.randn(3, 256, 256)
    qw = _filled(fmt, block, asym, w)
    d = qw.dequantize()
    bound = {"int8": 0.01, "int4": 0.12, "fp8": 0.04}[fmt]          # relative Frobenius error
    assert float((d - w).norm() / w.norm()) < bound
    parts = QuantizedWeight(fmt, w.shape, block or (1, 256), asym)
    for e in range(3):               # as the loader writes stacked experts: gate rows, then up rows
        parts[e, 0:128].copy_(w[e, :128])
        parts[e, 128:256].copy_(w[e, 128:])
    assert torch.equal(parts.dequantize(), d)
    assert torch.equal(qw.dequantize(index=(1,)), d[1])


def test_int_values_follow_the_stated_layout():
    """Independent of QuantizedWeight.dequantize: int4 bytes hold (q + 8), even k in the low nibble."""
    w = torch.randn(4, 64)
    q, scale, zero = quantize_int(w, 4, 32, asymmetric=True)
    assert q.min() >= -8 and q.max() <= 7 and zero.min() >= -8 and zero.max() <= 7
    packed = pack_int4(q)
    assert packed.shape == (4, 32)
    assert torch.equal((packed & 0xF).to(torch.int16) - 8, q[:, 0::2].to(torch.int16))
    assert torch.equal((packed >> 4).to(torch.int16) - 8, q[:, 1::2].to(torch.int16))
    qw = QuantizedWeight("int4", w.shape, (1, 32), asymmetric=True)
    qw.copy_(w)
    ref = (q.float() - zero.float().repeat_interleave(32, 1)) * scale.float().repeat_interleave(32, 1)
    assert torch.equal(qw.dequantize(), ref)
    f8, s8 = quantize_fp8(w, (1, 64))
    assert float((f8.float() * s8.float() - w).abs().max()) <= float(w.abs().max()) / 16


@pytest.mark.parametrize("asym", [False, True])
def test_clip_search_never_worse_than_round_to_nearest(asym):
    """Per group: the search includes the full range (CLIP_GRID[0] == 1), so its error is at most RTN's,
    and on heavy-tailed weights it is strictly better overall."""
    assert CLIP_GRID[0] == 1.0
    w = torch.distributions.StudentT(3.0).sample((64, 256))
    errs = []
    for search in (False, True):
        q, s, z = quantize_int(w, 4, 128, asym, clip_search=search)
        z = torch.zeros_like(s, dtype=torch.float32) if z is None else z.float()
        d = (q.float() - z.repeat_interleave(128, 1)) * s.float().repeat_interleave(128, 1)
        errs.append((d - w).square().view(64, 2, 128).sum(-1))
    assert bool((errs[1] <= errs[0] * (1 + 1e-6)).all())
    assert float(errs[1].sum()) < 0.97 * float(errs[0].sum())


@pytest.mark.parametrize("fmt,block,asym", FORMATS)
def test_quantized_linear_equals_linear_on_dequantised_weight(fmt, block, asym):
    w, x, bias = torch.randn(256, 256), torch.randn(5, 256), torch.randn(256)
    qw = _filled(fmt, block, asym, w)
    assert torch.allclose(linear(x, qw, bias), F.linear(x, qw.dequantize(), bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("fmt,block,asym", FORMATS[:3] + FORMATS[4:])
def test_quantized_moe_equals_reference_on_dequantised_experts(fmt, block, asym, T):
    """Ragged routing: expert 0 never chosen, one token per expert at T=1, shared experts added."""
    E, D, I, k = 4, 256, 128, 2
    w13, w2 = _filled(fmt, block, asym, torch.randn(E, 2 * I, D) / 16), _filled(fmt, block, asym,
                                                                                  torch.randn(E, D, I) / 16)
    x = torch.randn(T, D)
    ids = torch.stack([torch.randint(1, E, (T,)), torch.randint(1, E, (T,))], 1)
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], ids[:, 0] % (E - 1) + 1, ids[:, 1])
    weights = torch.rand(T, k).softmax(-1)
    shared = (torch.randn(2 * I, D) / 16, torch.randn(D, I) / 16)
    out = fused_moe(x, w13, w2, weights, ids, shared=shared)
    ref = fused_moe_ref(x, w13.dequantize(), w2.dequantize(), weights, ids)
    ref = ref + F.linear(F.silu(F.linear(x, shared[0][:I])) * F.linear(x, shared[0][I:]), shared[1])
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


# -- quantizing at load -------------------------------------------------------------------------------------

def _dequantised_twin(llm_q, name):
    """The same architecture with each quantized weight replaced by its dequantisation (float32)."""
    plain = LLM(WEIGHTS / name)
    for n, qw in quantized_weights(llm_q.model).items():
        held_weight(plain.model, n).copy_(qw.dequantize())
    plain.model.post_load()
    return plain


CASES = [("tiny-mixtral", dict(quantization="int4")),
         ("tiny-mixtral", dict(quantization="int8", quantize_attention=True)),
         ("tiny-deepseek", dict(quantization="int4", quant_group_size=32, quant_symmetric=False,
                                quantize_attention=True, quantize_dense_mlp=True)),
         ("tiny-deepseek", dict(quantization="fp8"))]


@pytest.mark.parametrize("name,settings", CASES)
def test_quantized_model_equals_model_on_dequantised_weights(name, settings):
    llm = LLM(WEIGHTS / name, **settings)
    kinds = {k for n, k in llm.model.quantizable_weights().items() if isinstance(held_weight(llm.model, n),
                                                                                QuantizedWeight)}
    want = {"experts"} | ({"shared"} if name == "tiny-deepseek" else set()) | (
        {"attention"} if settings.get("quantize_attention") else set()) | (
        {"dense"} if settings.get("quantize_dense_mlp") else set())
    assert kinds == want
    twin = _dequantised_twin(llm, name)
    stream = np.load(ROOT / f"tests/data/{name}_val_tokens.npy").astype(np.int64)
    ids = stream[500:564].tolist()
    assert max_rel_error(llm.prompt_logits(ids), twin.prompt_logits(ids)) <= 1e-4
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [stream[s:s + 9].tolist() for s in (0, 100, 200)]
    ours = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert ours == [o.token_ids for o in twin.generate(prompt_token_ids=prompts, sampling_params=params)]


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek"])
def test_expert_bytes_held(name):
    """int4 g128 experts <= 0.27x, int8 <= 0.52x their bf16 bytes, over the buffers the model holds; the
    router, norms and embeddings stay as they were."""
    for method, bound in (("int4", 0.27), ("int8", 0.52)):
        model = LLM(WEIGHTS / name, quantization=method, num_kv_blocks=4).model
        groups = tensor_groups(model)
        for group in ("experts", "shared") if name == "tiny-deepseek" else ("experts",):
            (ts,) = groups[group].values()
            held = sum(b.numel() * b.element_size() for t in ts for b in t.buffers())
            assert held <= bound * 2 * sum(t.numel() for t in ts)
        for group in ("router", "norms", "embedding", "attention"):
            assert set(groups[group]) == {"float32"}


def test_bad_quantization_settings_are_one_line_errors():
    with pytest.raises(MoeEngineError, match="quantization='int3'"):
        LLM(WEIGHTS / "tiny-mixtral", quantization="int3")
    with pytest.raises(MoeEngineError, match="quant_group_size=12"):
        LLM(WEIGHTS / "tiny-mixtral", quantization="int4", quant_group_size=12)
    with pytest.raises(MoeEngineError, match="asymmetric quantization is for int4"):
        LLM(WEIGHTS / "tiny-mixtral", quantization="int8", quant_symmetric=False)
    # q_b's input is q_lora_rank = 96: 128 does not divide it, and the error names the tensor.
    with pytest.raises(MoeEngineError, match=r"does not divide the input width 96 of layers\.0\.attn\.q_b"):
        LLM(WEIGHTS / "tiny-deepseek", quantization="int4", quantize_attention=True)


def test_cli_quantization_flags(capsys):
    assert main(["generate", "--model", str(WEIGHTS / "tiny-mixtral"), "--quantization", "int4",
                 "--quant-group-size", "64", "--max-tokens", "4", "--quiet", "Once"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    assert main(["info", "--model", str(WEIGHTS / "tiny-deepseek"), "--quantization", "int8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"routed experts +int8 channel sym", out) and re.search(r"shared experts +int8 channel sym", out)
    assert main(["info", "--model", str(WEIGHTS / "tiny-mixtral"), "--quantization", "int4",
                 "--quant-group-size", "48"]) == 2
    assert "does not divide the input width 256 of layers.0.mlp.w13" in capsys.readouterr().err


def test_quantized_model_refuses_compiled_steps_in_one_line():
    with pytest.raises(MoeEngineError, match="a quantized model runs eagerly for now"):
        LLM(WEIGHTS / "tiny-mixtral", quantization="int8", compile=True)


def test_fp8_block_checkpoint_is_kept_in_fp8(tmp_path):
    """The DeepSeek-V3-style FP8 checkpoint of tests/test_fp8.py: experts, shared experts, the dense MLP
    and the attention projections that lie on whole 128-row blocks stay float8 with their block scales;
    wq_kv_a (q_a's 96 rows then kv_a's, straddling a block) and kv_b are dequantised as before."""
    from test_fp8 import make_fp8_copy
    make_fp8_copy(WEIGHTS / "tiny-deepseek", tmp_path / "fp8", tmp_path / "fake")
    llm, fake = LLM(tmp_path / "fp8"), LLM(tmp_path / "fake")
    held = quantized_weights(llm.model)
    assert {q.describe() for q in held.values()} == {"fp8 block 128x128"}
    assert {"layers.1.mlp.w13", "layers.1.mlp.shared.w2", "layers.0.mlp.w13", "layers.2.attn.q_b",
            "layers.3.attn.wo"} <= set(held)
    assert not any(n.endswith(("wq_kv_a", "kv_b")) for n in held)
    assert held["layers.1.mlp.w13"].qweight.dtype == torch.float8_e4m3fn
    ids = list(range(3, 70))
    assert max_rel_error(llm.prompt_logits(ids), fake.prompt_logits(ids)) <= 1e-5
