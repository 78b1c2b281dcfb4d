"""Sampling parameters (validated) and next-token selection from logits."""

import math
from dataclasses import dataclass, field

import torch

from moe_engine.errors import MoeEngineError


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif not isinstance(self.stop, (list, tuple)):
            raise MoeEngineError(f"bad sampling value stop={self.stop!r}: must be a string or a list of strings")
        self.stop = list(self.stop)
        checks = [
            ("max_tokens", _integer(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 = off)"),
            ("seed", self.seed is None or _integer(self.seed), "an integer or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise MoeEngineError(f"bad sampling value {name}={getattr(self, name)!r}: must be {allowed}")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 a softmax of logits / temperature overflows; it is greedy in all but name.
        return self.temperature < 1e-5


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: list[int],
                 generator: torch.Generator | None) -> int:
    """logits [V] float32 -> one token id."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(_settings_probs(logits, params).cpu(), 1, generator=generator))


def target_probs(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    """The distribution sample_token draws from (not renormalised: its mass is what top_p/min_p kept),
    logits [V] -> probs [V] float32; a greedy request's is one-hot on its argmax."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    return _settings_probs(logits, params)


def _settings_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Penalised logits [V] -> probabilities [V] after temperature, top_k, min_p and top_p."""
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p * sorted_probs.sum()
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return probs
