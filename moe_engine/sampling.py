"""Sampling parameters (validated) and next-token selection from logits."""

import math
from dataclasses import dataclass, field

import torch

from moe_engine.errors import MoeEngineError


class StopList(list):
    """SamplingParams.stop: a list that cannot change once validated (a new one goes through
    dataclasses.replace(params, stop=[...]), which validates it again)."""

    def _refuse(self, *args, **kwargs):
        raise MoeEngineError("SamplingParams.stop cannot be changed once made; "
                             "use dataclasses.replace(params, stop=[...]) for other stop strings")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse

    def __hash__(self):
        return hash(tuple(self))

    def __reduce__(self):              # copy/pickle rebuild it whole, not by append
        return StopList, (list(self),)


SEED_LIMIT = 1 << 64                   # torch generators take 64-bit seeds; a larger one would alias


@dataclass(frozen=True)
class SamplingParams:
    """Validated when made and read-only after (dataclasses.replace makes a changed, validated copy)."""
    max_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None           # in [0, 2**64)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)):
            raise MoeEngineError(f"bad sampling value stop={stop!r}: must be a string or a list of strings")
        object.__setattr__(self, "stop", StopList(stop))
        checks = [
            ("max_tokens", _integer(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 = off)"),
            ("seed", self.seed is None or _integer(self.seed) and 0 <= self.seed < SEED_LIMIT,
             "None or an integer in [0, 2**64) (larger or negative seeds would alias others)"),
            ("stop", all(isinstance(s, str) and s and not any("\ud800" <= c <= "\udfff" for c in s)
                         for s in self.stop), "non-empty strings of valid text (no lone surrogates)"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "True or False"),
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
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones (a zero
    logit stays zero whatever the penalty, even one that rounds to 0 or inf in the logits' dtype)."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, torch.where(picked < 0, picked * penalty, picked))
    return logits


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """float64 CPU logits / temperature, shifted so the best is 0: never inf or NaN whatever the values
    (a NaN logit is never drawn; +inf ones share all the mass). None when every token is -inf/NaN."""
    logits = torch.nan_to_num(logits.detach().to("cpu", torch.float64), nan=-math.inf, posinf=math.inf,
                              neginf=-math.inf)
    top = logits.max()
    if top == -math.inf:
        return None
    if top == math.inf:
        return torch.where(logits == math.inf, 0.0, -math.inf)
    return torch.where(logits == -math.inf, -math.inf, (logits - top) / temperature)


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: list[int],
                 generator: torch.Generator | None) -> int:
    """logits [V] float32 -> one token id. Safe for every value SamplingParams accepts: a filter that
    would drop every token keeps the likeliest one."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.nan_to_num(logits, nan=-math.inf).argmax())
    probs = _settings_probs(logits, params)                            # [V] float64 on the CPU
    if probs is None:
        return 0
    return int(torch.multinomial(probs, 1, generator=generator))


def target_probs(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    """The distribution sample_token draws from (not renormalised: its mass is what top_p/min_p kept),
    logits [V] -> probs [V] float32 on the CPU; a greedy request's is one-hot on its argmax."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        best = torch.nan_to_num(logits, nan=-math.inf).argmax().cpu()
        return torch.nn.functional.one_hot(best, logits.numel()).float()
    probs = _settings_probs(logits, params)
    if probs is None:                                                  # every logit -inf/NaN: token 0
        return torch.nn.functional.one_hot(torch.tensor(0), logits.numel()).float()
    return probs.float()


def _settings_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """Penalised logits [V] -> probabilities [V] (float64, CPU) after temperature, top_k, min_p and top_p;
    None when no token has a finite or +inf logit."""
    scaled = _scaled(logits, params.temperature)                       # [V] float64, max 0
    if scaled is None:
        return None
    if params.top_k:
        kth = scaled.topk(min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if params.min_p > 0:     # p < min_p * p_max, in log space: exact even where the probabilities all round equal
        scaled = scaled.masked_fill(scaled < math.log(params.min_p), -math.inf)
    probs = scaled.softmax(-1)                                         # the best token has mass > 0
    if params.top_p < 1.0:
        # Ranked by the logits (probabilities of a huge temperature tie), keep the smallest prefix whose
        # mass reaches top_p; the first token always stays.
        order = scaled.argsort(descending=True, stable=True)
        sorted_probs = probs[order]
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p * sorted_probs.sum()
        drop[0] = False
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if not (torch.isfinite(probs).all() and probs.sum() > 0):          # never expected; never a raise
        return torch.nn.functional.one_hot(scaled.argmax(), scaled.numel()).double()
    return probs
