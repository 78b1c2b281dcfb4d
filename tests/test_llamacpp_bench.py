"""llama.cpp beside our engine: our model written as GGUF gives llama.cpp our logits and greedy tokens."""

import os
import tempfile

import numpy as np
import pytest
import torch

from hf_models import max_rel_error
from moe_engine import LLM, SamplingParams
from moe_engine.bench.models import build_random
from moe_engine.errors import MoeEngineError
from moe_engine.quantize import QuantSpec, quantize_weights

gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's writer) is not installed: an optional extra",
                           exc_type=ImportError)
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: an optional extra",
                                exc_type=ImportError)
from moe_engine.bench import llamacpp as L  # noqa: E402

PROMPT = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(1)).tolist()


def ours(model):
    return LLM.from_model(model, max_model_len=64, num_kv_blocks=8, block_size=16)


def llamacpp_logits(path, buffers=None, **kwargs) -> tuple[torch.Tensor, object]:
    """llama.cpp's logits [T, V] at every prompt position (float32 KV cache, so f32 can be compared tightly),
    its weights in the buffers the benchmark would use (on AMX CPUs others crash)."""
    llm = L.open_gguf(path, 64, 1, 32, buffers or L.default_buffers(L.file_qtype(path)), logits_all=True,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs)
    llm.eval(PROMPT)
    return torch.from_numpy(np.array(llm.scores[:len(PROMPT)])), llm


def test_f32_gguf_matches_our_logits_and_greedy_tokens(tmp_path):
    model = build_random("mixtral-tiny", "cpu", torch.float32)
    L.write_gguf(model, tmp_path / "m.gguf", "f32")
    theirs, llm = llamacpp_logits(tmp_path / "m.gguf")
    engine = ours(model)
    assert max_rel_error(engine.prompt_logits(PROMPT), theirs) <= 1e-4
    expected = engine.generate(prompt_token_ids=[PROMPT],
                               sampling_params=SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    assert L.greedy_run(llm, PROMPT, 16)[0] == expected
    llm.close()


def test_without_the_rope_permutation_llama_cpp_disagrees(tmp_path, monkeypatch):
    """The q/k row permutation is what makes the rotary embeddings agree (the check above can fail)."""
    model = build_random("mixtral-tiny", "cpu", torch.float32)
    monkeypatch.setattr(L, "_rope_permute", lambda w, heads: w)
    L.write_gguf(model, tmp_path / "m.gguf", "f32")
    theirs, llm = llamacpp_logits(tmp_path / "m.gguf")
    llm.close()
    assert max_rel_error(ours(model).prompt_logits(PROMPT), theirs) > 1e-2


@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_0"])
def test_quantized_gguf_matches_our_model_on_the_same_rounded_weights(tmp_path, qtype):
    """Each GGUF type against our model holding the weights quantized and dequantized the same way (gguf's
    own quantizer; rows only permute, so the rounding commutes with the rope permutation). What is left is
    llama.cpp rounding its activations (bf16, or Q8_0 for quantized weights), ~1%, and now and then a
    routing near-tie that flips an expert at one position: the median position is held to 3%."""
    model = build_random("mixtral-tiny", "cpu", torch.float32)
    nbytes = L.write_gguf(model, tmp_path / "m.gguf", qtype)
    assert nbytes == (tmp_path / "m.gguf").stat().st_size
    matrix, embed, head = L._types(gguf, qtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate"):      # routers and norms are written in F32
                kind = embed if name == "embed" else head if name == "lm_head" else matrix
                rounded = gguf.quants.dequantize(gguf.quants.quantize(p.float().numpy(), kind), kind)
                p.copy_(torch.from_numpy(rounded).reshape(p.shape))
    theirs, llm = llamacpp_logits(tmp_path / "m.gguf")
    llm.close()
    logits = ours(model).prompt_logits(PROMPT)
    per_position = (logits - theirs).abs().amax(-1) / theirs.abs().max()             # [T]
    assert per_position.median() <= 3e-2
    assert (logits.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.75


def test_repacked_q4_0_weights_are_repacked_and_give_the_plain_logits(tmp_path, capfd):
    """The "repack" buffers (CPU_REPACK through a tensor override) are used and change nothing but speed."""
    L.write_gguf(build_random("mixtral-tiny", "cpu", torch.float32), tmp_path / "m.gguf", "q4_0")
    plain, llm = llamacpp_logits(tmp_path / "m.gguf", "plain")
    llm.close()
    capfd.readouterr()
    repacked, llm = llamacpp_logits(tmp_path / "m.gguf", "repack", verbose=True)
    llm.close()
    assert "CPU_REPACK model buffer size" in "".join(capfd.readouterr())
    assert max_rel_error(repacked, plain) <= 1e-3


def test_bf16_file_holds_our_bf16_weights_bit_for_bit(tmp_path):
    model = build_random("mixtral-tiny", "cpu", torch.bfloat16)
    L.write_gguf(model, tmp_path / "m.gguf", "bf16")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    I, H = model.args.intermediate_size, model.args.num_attention_heads

    def held(name):
        return torch.from_numpy(np.array(tensors[name].data)).view(torch.bfloat16)

    mlp, attn = model.layers[1].mlp, model.layers[1].attn
    assert torch.equal(held("blk.1.ffn_gate_exps.weight"), mlp.w13[:, :I])
    assert torch.equal(held("blk.1.ffn_up_exps.weight"), mlp.w13[:, I:])
    assert torch.equal(held("blk.1.ffn_down_exps.weight"), mlp.w2)
    assert torch.equal(held("blk.1.attn_v.weight"), attn.wqkv[-attn.n_kv * attn.head_dim:])
    assert torch.equal(held("blk.1.attn_q.weight"), L._rope_permute(attn.wqkv[:H * attn.head_dim], H))
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(torch.from_numpy(np.array(tensors["blk.1.ffn_gate_inp.weight"].data)), mlp.gate)


def test_rows_time_each_type_and_leave_no_file():
    model = build_random("mixtral-tiny", "cpu", torch.float32)
    before = set(os.listdir(tempfile.gettempdir()))
    rows = L.llamacpp_rows(model, ["q4_0", "bf16"], prompt_len=8, new_tokens=4, repeats=1, threads=1)
    assert [r["qtype"] for r in rows] == ["q4_0", "bf16"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and not r["failed"] for r in rows)
    assert [r["weight_buffers"] for r in rows] == [L.default_buffers("q4_0"), L.default_buffers("bf16")]
    assert rows[0]["file_bytes"] < rows[1]["file_bytes"]
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("moe-engine-gguf-")}


def test_a_failing_llama_cpp_child_is_timed_again_plain(monkeypatch):
    """llama.cpp segfaults in some weight buffers on some CPUs: the row is timed again with plain ones."""
    monkeypatch.setattr(L, "default_buffers", lambda qtype: "no-such-buffers")   # the child refuses these
    row, = L.llamacpp_rows(build_random("mixtral-tiny", "cpu", torch.float32), ["q8_0"], 8, 4, 1, threads=1)
    assert row["weight_buffers"] == "plain" and row["decode_tok_s"] > 0
    assert "exit 1" in row["failed"]["no-such-buffers"] and "no-such-buffers" in row["failed"]["no-such-buffers"]


def test_bad_type_and_family_are_refused(tmp_path):
    with pytest.raises(MoeEngineError, match="q5_k"):
        L.write_gguf(build_random("mixtral-tiny", "cpu", torch.float32), tmp_path / "m.gguf", "q5_k")
    with pytest.raises(MoeEngineError, match="buffers"):
        L.open_gguf(tmp_path / "m.gguf", 64, buffers="amx")
    with pytest.raises(MoeEngineError, match="deepseek"):
        L.write_gguf(build_random("deepseek-tiny", "cpu", torch.float32), tmp_path / "m.gguf", "bf16")
    quantized = build_random("mixtral-tiny", "cpu", torch.float32)
    quantize_weights(quantized, QuantSpec("int8"), "cpu")
    with pytest.raises(MoeEngineError, match="before quantizing"):
        L.write_gguf(quantized, tmp_path / "m.gguf", "q8_0")
