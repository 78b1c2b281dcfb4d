"""Model quality against the figures published with the shipped checkpoints (../shared/models/README.md):
mean next-token loss over 16 random 256-token windows drawn with torch.Generator().manual_seed(1) from
the held-out stream, measured there with transformers in float32."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, WEIGHTS
from moe_engine import LLM

PUBLISHED_LOSS = {"tiny-mixtral": 1.740, "tiny-deepseek": 1.527}


@pytest.mark.parametrize("name", sorted(PUBLISHED_LOSS))
def test_held_out_loss_matches_published_figure(name):
    stream = np.load(ROOT / f"tests/data/{name}_val_tokens.npy").astype(np.int64)
    llm = LLM(WEIGHTS / name)
    starts = torch.randint(0, len(stream) - 257, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    losses = []
    for s in starts:
        ids = stream[s:s + 256].tolist()
        logits = llm.prompt_logits(ids)                                  # [256, V]
        losses.append(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert abs(np.mean(losses) - PUBLISHED_LOSS[name]) < 0.005
