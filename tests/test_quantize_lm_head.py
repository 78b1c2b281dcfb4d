"""The LM head held quantized when asked (quantize_lm_head): int8 per channel whatever the method, never when
tied to the embedding, logits equal to the model run on the dequantised head, and the perplexity it costs."""

import numpy as np
import pytest
import torch

from kernels.quant import QuantizedWeight
from moe_engine import LLM
from moe_engine.cli import main as cli
from moe_engine.perplexity import perplexity

MODELS = ["weights/tiny-mixtral", "weights/tiny-deepseek"]


@pytest.mark.parametrize("path", MODELS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_head_held_in_int8_and_logits_equal_the_dequantised_head(path, method):
    llm = LLM(path, "cpu", torch.float32, quantization=method, quantize_lm_head=True)
    head = llm.model.lm_head
    assert isinstance(head, QuantizedWeight) and head.format == "int8" and head.block == (1, head.shape[-1])
    plain = LLM(path, "cpu", torch.float32, quantization=method)
    assert isinstance(plain.model.lm_head, torch.Tensor)
    # the oracle: the same quantized experts with the head's dequantised values put back as a plain tensor
    plain.model.lm_head = torch.nn.Parameter(head.dequantize().float(), requires_grad=False)
    ids = np.load(path.replace("weights/", "tests/data/") + "_val_tokens.npy")[:200].tolist()
    a, b = llm.prompt_logits(ids), plain.prompt_logits(ids)
    assert (a - b).abs().max() / b.abs().max() <= 1e-4
    dense = LLM(path, "cpu", torch.float32)
    assert (dense.prompt_logits(ids) - a).abs().max() > 0           # it is held quantized, not a no-op


def test_head_int8_costs_little_perplexity():
    path = "weights/tiny-mixtral"
    ids = np.load("tests/data/tiny-mixtral_val_tokens.npy").astype(np.int64)[:1025].tolist()
    base = perplexity(LLM(path, "cpu", torch.float32, quantization="int8"), ids, 256)
    head = perplexity(LLM(path, "cpu", torch.float32, quantization="int8", quantize_lm_head=True), ids, 256)
    assert head != base and abs(head / base - 1) < 0.002


def test_tied_head_is_not_quantized():
    llm = LLM("weights/tiny-mixtral", "cpu", torch.float32, quantization="int8", quantize_lm_head=True)
    tied = type(llm.model)(llm.model.args.__class__(**{**vars(llm.model.args), "tie_word_embeddings": True}))
    assert "lm_head" not in tied.quantizable_weights()


def test_quantize_command_refuses_an_int8_head_in_an_int4_folder(tmp_path, capsys):
    rc = cli(["quantize", "--model", "weights/tiny-mixtral", "--out", str(tmp_path / "q"), "--quantization", "int4",
              "--quantize-lm-head", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--quantize-lm-head" in err, err
    assert not (tmp_path / "q").exists()


def test_quantize_command_writes_an_int8_head_that_loads_back(tmp_path):
    out = tmp_path / "q"
    assert cli(["quantize", "--model", "weights/tiny-mixtral", "--out", str(out), "--quantization", "int8",
                "--quantize-lm-head", "--quiet"]) == 0
    back = LLM(out, "cpu", torch.float32)
    ours = LLM("weights/tiny-mixtral", "cpu", torch.float32, quantization="int8", quantize_lm_head=True)
    assert isinstance(back.model.lm_head, QuantizedWeight)
    assert torch.equal(back.model.lm_head.dequantize(), ours.model.lm_head.dequantize())
