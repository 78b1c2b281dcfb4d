"""Never slower: per request, speculate only while the expected tokens of a verify step pay for its
measured cost against a plain decode step; shorten k or pause speculation (and retry later) otherwise.

A verify step with k drafts and a per-draft acceptance rate a yields E(k) = 1 + a + ... + a^k tokens
(accepted drafts + the target's own token); a plain step yields 1. With T_p the measured time of a plain
decode step and T_v(k) that of a verify step (both shared by all requests, per batch size), k pays while
E(k) * T_p > T_v(k). Cascade (arXiv 2506.20675) bounds MoE speculation's slowdown the same way.
"""

from dataclasses import dataclass, field

DECAY = 0.8                  # weight of the past in the step-time and acceptance averages
PRIOR_ACCEPTED, PRIOR_TRIALS = 1.0, 2.0   # a = 0.5 before a request has verified anything
FIRST_PAUSE, LONGEST_PAUSE = 8, 256      # steps without speculation after it did not pay (doubling)


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verify step of k drafts yields at per-draft acceptance a: 1 + a + ... + a^k."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


class StepCosts:
    """Measured seconds of plain decode steps (per batch size) and verify steps (per batch size and the
    most drafts a sequence had), as decaying averages; steps with prefill chunks are not counted."""

    def __init__(self):
        self.plain: dict[int, float] = {}
        self.verify: dict[tuple[int, int], float] = {}

    def record(self, num_tokens: list[int], drafts: list[list[int]], seconds: float) -> None:
        if any(n != 1 for n in num_tokens):
            return
        bs, k = len(num_tokens), max((len(d) for d in drafts), default=0)
        table, key = (self.verify, (bs, k)) if k else (self.plain, bs)
        old = table.get(key)
        table[key] = seconds if old is None else DECAY * old + (1 - DECAY) * seconds

    def plain_time(self, bs: int) -> float | None:
        if not self.plain:
            return None
        return self.plain[min(self.plain, key=lambda b: (abs(b - bs), b))]

    def verify_time(self, bs: int, k: int, plain: float) -> float:
        """The measured time for (bs, k); else a line from (0, plain) through the nearest measured k at
        the nearest measured batch size; else plain (untried: assume it pays, so it gets tried)."""
        if (bs, k) in self.verify:
            return self.verify[(bs, k)]
        if not self.verify:
            return plain
        b = min({b for b, _ in self.verify}, key=lambda x: (abs(x - bs), x))
        near = min((kk for bb, kk in self.verify if bb == b), key=lambda x: (abs(x - k), x))
        return plain + (self.verify[(b, near)] - plain) * k / near


@dataclass
class RequestControl:
    """One request's speculation state: its acceptance averages, when it may speculate again, and while it
    does not, the drafts it would have proposed (scored against the tokens that came instead: for n-gram
    drafts a match is exactly an acceptance, greedy or sampled, so the rate stays measured for free)."""
    accepted: float = PRIOR_ACCEPTED
    trials: float = PRIOR_TRIALS
    paused_until: int = 0
    pause: int = FIRST_PAUSE
    k: int = 1                 # the k chosen last (0: paused; a new request counts as speculating)
    shadow: list[int] = field(default_factory=list)   # drafts not verified, proposed when it had shadow_at tokens
    shadow_at: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.trials

    def update(self, num_drafts: int, num_accepted: int) -> None:
        """A verify step: drafts accepted up to the first rejected one (a trial each, the rejection one)."""
        self.accepted = DECAY * self.accepted + num_accepted
        self.trials = DECAY * self.trials + num_accepted + (num_accepted < num_drafts)

    def observe(self, ids: list[int]) -> None:
        """Score the shadow drafts against the tokens that followed them, once those tell."""
        if not self.shadow:
            return
        got = ids[self.shadow_at:self.shadow_at + len(self.shadow)]
        a = next((i for i, (g, d) in enumerate(zip(got, self.shadow)) if g != d), len(got))
        if a < len(got) or len(got) == len(self.shadow):
            self.update(len(self.shadow), a)
            self.shadow = []


def choose_k(ctl: RequestControl, costs: StepCosts, k_max: int, bs: int, step: int) -> int:
    """How many drafts the request proposes this step (0: none). Where no k pays, speculation pauses
    (doubling pauses); it resumes as soon as the measured rate says it pays, or for one probing verify
    step when the pause is over (the verify cost is measured again)."""
    plain = costs.plain_time(bs)
    if plain is None:
        # Nothing to weigh a verify step against yet: speculate until one is measured, then take one plain
        # step to measure that (a proposer that always drafts, unlike n-gram, would otherwise never have one).
        if costs.verify:
            return 0
        ctl.k = k_max
        return k_max
    gain, k = max((expected_tokens(ctl.rate, k) * plain / costs.verify_time(bs, k, plain), k)
                  for k in range(1, k_max + 1))
    if gain >= 1.0:
        ctl.pause, ctl.k = FIRST_PAUSE, k
        return k
    if ctl.k > 0:                       # it just stopped paying: pause
        ctl.k, ctl.paused_until = 0, step + ctl.pause
        ctl.pause = min(2 * ctl.pause, LONGEST_PAUSE)
        return 0
    if step < ctl.paused_until:
        return 0
    ctl.k = k                           # the pause is over: one probe
    return k
