"""Calibrated quantization: GPTQ against a plain loop of the published algorithm and against RTN, the inputs
collected per expert against the routing computed independently, `moe-engine quantize --calibration` end to
end (read back by compressed-tensors' own unpacker), and bad calibration files as one-line errors."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, WEIGHTS
from kernels.quant import dequantize_values, quantize_int
from model_defs.moe import route
from moe_engine import LLM
from moe_engine.calibrate import collect_hessians
from moe_engine.cli import main
from moe_engine.gptq import DAMP, gptq_quantize, gptq_search
from moe_engine.quantize import quantized_weights

CALIBRATION = (ROOT / "examples" / "calibration.txt").read_text(encoding="utf-8")


def reference_gptq(w, H, bits, group, asymmetric):
    """The published algorithm as a plain loop, without the Cholesky form or lazy batches: quantize column i,
    spread its error over the later columns by the inverse Hessian, then drop i from the inverse (Gaussian
    elimination). float64."""
    N, K = w.shape
    W, H = w.double().clone(), H.double().clone()
    H += DAMP * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    q = torch.zeros(N, K, dtype=torch.int8)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for i in range(K):
        if i % group == 0:
            _, s, z = quantize_int(W[:, i:i + group], bits, group, asymmetric, False)
            scale, zero = s[:, 0].double(), (z[:, 0].double() if asymmetric else torch.zeros(N, dtype=H.dtype))
        level = (torch.round(W[:, i] / scale) + zero).clamp(qmin, qmax)
        q[:, i] = level.to(torch.int8)
        err = (W[:, i] - (level - zero) * scale) / Hinv[i, i]
        W[:, i + 1:] -= err[:, None] * Hinv[i, i + 1:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return q


def correlated(n, K, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K // 4, generator=g) @ torch.randn(K // 4, K, generator=g) + 0.1 * torch.randn(n, K, generator=g)
    return X                                                                   # [n, K], strongly correlated


@pytest.mark.parametrize("asymmetric,group", [(False, 16), (True, 32)])
def test_gptq_matches_a_plain_loop_of_the_algorithm(asymmetric, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 320, generator=g, dtype=torch.float64)              # 320: three lazy batches of 128
    X = correlated(800, 320, 1).double()
    q, scale, zero = gptq_quantize(w[None], (X.t() @ X)[None], 4, group, asymmetric)
    assert torch.equal(q[0], reference_gptq(w, X.t() @ X, 4, group, asymmetric))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 16, 128, generator=g)
    H = torch.diag_embed(torch.rand(3, 128, generator=g) + 0.5)               # a diagonal Hessian: no feedback
    for asym in (False, True):
        q, scale, zero = gptq_quantize(w, H, 4, 32, asym)
        rq, rs, rz = quantize_int(w, 4, 32, asym, clip_search=False)
        assert torch.equal(q, rq) and torch.equal(scale, rs) and (zero is None or torch.equal(zero, rz))


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    X = correlated(512, 128, 4)
    H = (X.t() @ X)[None]

    def out_err(q, scale, zero):                  # ||X wᵀ - X ŵᵀ||, symmetric: no zero points
        return float((X @ (w - dequantize_values(q.reshape(w.shape), scale.reshape(32, -1), None, (1, 32))).t()).norm())
    rtn, clip = out_err(*quantize_int(w, 4, 32, False, False)), out_err(*quantize_int(w, 4, 32, False, True))
    assert out_err(*gptq_quantize(w[None], H, 4, 32)) < 0.7 * rtn
    assert out_err(*gptq_search(w[None], H, 4, 32)) < 0.7 * clip

def test_collected_inputs_are_the_tokens_routed_to_each_expert():
    llm = LLM(WEIGHTS / "tiny-deepseek", "cpu", torch.float32)
    ids = llm.tokenizer.encode(CALIBRATION[:1500])[:300]                       # two windows: 256 + 44
    blocks = llm.model.moe_blocks
    seen = [[] for _ in blocks]                                                # independent: own hook, own route()
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
             for i, b in enumerate(blocks)]
    try:
        hessians = collect_hessians(llm, ids, keep_tokens=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen[0]) == 2
    for i, (b, h) in enumerate(zip(blocks, hessians)):
        E = b.routing.num_experts
        total = torch.zeros(E, dtype=torch.int64)
        for window, x in enumerate(seen[i]):
            logits = x.float() @ b.gate.float().t()                           # [T, E]
            _, topk_ids = route(logits, b.routing, b.bias)
            for e in range(E):
                want = (topk_ids == e).any(-1).nonzero().flatten()
                assert torch.equal(h.tokens[window][e], want), (i, window, e)
                total[e] += want.numel()
        assert torch.equal(h.counts, total) and int(total.sum()) == len(ids) * b.routing.top_k
        x = torch.cat(seen[i])                                                 # [300, D]
        rows = torch.cat([h.tokens[0][3], h.tokens[1][3] + 256])
        assert torch.allclose(h.h_in[3], x[rows].t() @ x[rows], rtol=1e-4, atol=1e-3)
        assert h.shared_count == len(ids) and torch.allclose(h.shared_in, x.t() @ x, rtol=1e-4, atol=1e-3)


def test_quantize_with_calibration_end_to_end(tmp_path, capsys):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION[:12000], encoding="utf-8")        # ~3500 tokens: some experts fall back
    out, plain = tmp_path / "q", tmp_path / "plain"
    assert main(["quantize", "--model", str(WEIGHTS / "tiny-deepseek"), "--out", str(out), "--quantization", "int4",
                 "--calibration", str(text)]) == 0
    said = capsys.readouterr().err
    assert "experts by GPTQ" in said and "fell back to the clip search" in said
    calibrated, fallback = (int(said.split(s)[0].split()[-1]) for s in (" experts by GPTQ", " fell back"))
    assert calibrated + fallback == 3 * 17 and calibrated > 0 and fallback > 0
    assert main(["quantize", "--model", str(WEIGHTS / "tiny-deepseek"), "--out", str(plain), "--quantization",
                 "int4", "--quiet"]) == 0
    back, clip = quantized_weights(LLM(out, "cpu", torch.float32).model), quantized_weights(LLM(plain).model)
    assert back.keys() == clip.keys()
    # The shared experts saw every token (GPTQ); some routed ones saw too few (the clip search, as without).
    assert not torch.equal(back["layers.2.mlp.shared.w13"].unpacked(), clip["layers.2.mlp.shared.w13"].unpacked())
    same = [torch.equal(back["layers.2.mlp.w2"].unpacked((e,)), clip["layers.2.mlp.w2"].unpacked((e,)))
            for e in range(16)]
    assert any(same)
    tensors = load_file(out / "model.safetensors")
    for e in (0, 7, 15):
        for proj, param, rows in (("gate_proj", "w13", slice(0, 128)), ("down_proj", "w2", slice(None))):
            m = f"model.layers.2.mlp.experts.{e}.{proj}"
            q = unpack_from_int32(tensors[f"{m}.weight_packed"], 4, tensors[f"{m}.weight_shape"])
            assert torch.equal(q, back[f"layers.2.mlp.{param}"].unpacked((e,))[rows])
            assert torch.equal(tensors[f"{m}.weight_scale"], back[f"layers.2.mlp.{param}"].scale[e][rows])
    m = "model.layers.1.mlp.shared_experts.down_proj"
    q = unpack_from_int32(tensors[f"{m}.weight_packed"], 4, tensors[f"{m}.weight_shape"])
    assert torch.equal(q, back["layers.1.mlp.shared.w2"].unpacked())


@pytest.mark.parametrize("content,problem", [(None, "does not exist"), (b"", "is empty"), (b"  \n\t", "is empty"),
                                             (b"def f():\n    return '\xff\xfe'\n", "is not UTF-8")])
def test_bad_calibration_files_are_one_line_errors(tmp_path, capsys, content, problem):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    rc = main(["quantize", "--model", str(WEIGHTS / "tiny-mixtral"), "--out", str(tmp_path / "q"),
               "--quantization", "int4", "--calibration", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and problem in err and str(path) in err, err
    assert not (tmp_path / "q").exists()


def test_a_zero_point_row_of_one_group_per_row_packs():
    # GPTQ and the clip search give a weight with one group per row zero points [N, 1]; written transposed,
    # that is a [1, N] row whose stride .contiguous() leaves as it was (this failed before for any writer).
    from moe_engine.compressed_tensors import pack_int32, unpack_int32
    zero = torch.randint(-8, 8, (256, 4), dtype=torch.int8)[:, :1]            # [256, 1], strides (4, 1)
    packed = pack_int32(zero.t().contiguous(), 4)                             # [1, 32]
    assert torch.equal(unpack_int32(packed, 4, 256), zero.t())
