"""Quality of weights quantized at load, on the held-out streams (4096 tokens, 256-token windows): experts
in int8 cost at most +0.1% perplexity, in int4 groups of 128 (with the clipping search) at most +1.5%."""

import numpy as np
import pytest

from conftest import ROOT, WEIGHTS
from moe_engine import LLM
from moe_engine.perplexity import perplexity

BOUNDS = {"int8": 0.001, "int4": 0.015}     # relative perplexity increase allowed


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-deepseek"])
def test_quantized_experts_keep_perplexity(name):
    ids = np.load(ROOT / f"tests/data/{name}_val_tokens.npy").astype(np.int64)[:4097].tolist()
    base = perplexity(LLM(WEIGHTS / name, num_kv_blocks=20), ids, 256)
    for method, bound in BOUNDS.items():
        ppl = perplexity(LLM(WEIGHTS / name, quantization=method, num_kv_blocks=20), ids, 256)
        assert base <= ppl * (1 + 0.005), (method, base, ppl)      # quantization does not help much either
        assert ppl <= base * (1 + bound), (method, base, ppl)
