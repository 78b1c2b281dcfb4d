"""Perplexity of a token stream under the model (and under whatever routing override is active)."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from moe_engine.errors import MoeEngineError
from moe_engine.inputs import token_list


def perplexity(llm, token_ids, window: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over token_ids, from llm.prompt_logits. A stream longer than the
    window (default and at most llm.max_model_len) is cut into windows that overlap by one token, so every
    token after the first is predicted exactly once, from the context inside its window."""
    ids = [int(t) for t in token_list(token_ids, "perplexity token ids")]
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise MoeEngineError(f"perplexity window={window!r}: must be an integer >= 2 or None (the model's length)")
    window = effective_window(llm, window)
    if len(ids) < 2 or window < 2:
        raise MoeEngineError(f"perplexity needs at least 2 token ids and a window of at least 2 (got {len(ids)} "
                             f"ids, window {window}); give a longer token stream")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window - 1):
        chunk = ids[start:start + window]                                     # [W]
        logits = llm.prompt_logits(chunk)                                     # [W, V]
        target = torch.tensor(chunk[1:], device=logits.device)                # [W-1]
        total += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
        count += len(chunk) - 1
    return math.exp(total / count)


def effective_window(llm, window: int | None = None) -> int:
    return min(window or llm.max_model_len, llm.max_model_len)


def stream_index(trace, window: int) -> np.ndarray:
    """int [N]: each record's index in the token stream, for a trace of exactly one perplexity() call with
    this (effective) window: call c (request key -1 - c) starts at c * (window - 1)."""
    return (-trace.request_ids - 1) * (window - 1) + trace.positions
