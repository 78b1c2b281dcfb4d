"""Never slower: speculate only while a verify step's expected tokens pay for its measured cost against a
plain decode step, judged for the whole batch; shorten k or pause a request's speculation (and retry later)
otherwise.

A request drafting k tokens at per-draft acceptance rate a yields E(k) = 1 + a + ... + a^k tokens in a
verify step (accepted drafts + the target's own token); in a plain step it yields 1. A verify step costs
the whole batch: with bs requests, T_p the measured time of a plain step and T_v(D) that of a verify step
carrying D drafts in all, drafts pay while (bs + sum of (E_i - 1)) / T_v(D) > bs / T_p. Judging each
request alone (E(k) T_p > T_v) would let one request's drafts slow the other bs - 1 down. Cascade
(arXiv 2506.20675) bounds MoE speculation's slowdown the same way, per request.
"""

import bisect
from dataclasses import dataclass, field

DECAY = 0.8                  # weight of the past in the step-time and acceptance averages
PRIOR_ACCEPTED, PRIOR_TRIALS = 1.0, 2.0   # a = 0.5 before a request has verified anything
FIRST_PAUSE, LONGEST_PAUSE = 8, 256      # steps without speculation after it did not pay (doubling)


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verify step of k drafts yields at per-draft acceptance a: 1 + a + ... + a^k."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


class StepCosts:
    """Measured seconds of plain decode steps (per batch size) and verify steps (per batch size and the
    drafts they carried in all), as decaying averages; steps with prefill chunks are not counted."""

    def __init__(self):
        self.plain: dict[int, float] = {}
        self.verify: dict[tuple[int, int], float] = {}

    def record(self, num_tokens: list[int], drafts: list[list[int]], seconds: float) -> None:
        if any(n != 1 for n in num_tokens):
            return
        bs, k = len(num_tokens), sum(len(d) for d in drafts)
        table, key = (self.verify, (bs, k)) if k else (self.plain, bs)
        old = table.get(key)
        table[key] = seconds if old is None else DECAY * old + (1 - DECAY) * seconds

    def plain_time(self, bs: int) -> float | None:
        """The measured plain step at this batch size (None: not yet; another size's would mislead)."""
        return self.plain.get(bs)

    def verify_times(self, bs: int, plain: float):
        """k -> the seconds of a verify step of bs requests carrying k drafts in all: measured where it was;
        else a line from (0, plain) through the nearest measured k at the nearest measured batch size (its
        cost over that size's plain step); else plain (untried: assume it pays, so it gets tried). The
        nearest batch size and its k's are found once, as plan asks for many k's each step."""
        if not self.verify:
            return lambda k: plain
        b = min({b for b, _ in self.verify}, key=lambda x: (abs(x - bs), x))
        ks = sorted(kk for bb, kk in self.verify if bb == b)
        base = self.plain.get(b, plain)

        def seconds(k: int) -> float:
            measured = self.verify.get((bs, k))
            if measured is not None:
                return measured
            i = bisect.bisect_left(ks, k)
            near = min(ks[max(i - 1, 0):i + 1], key=lambda x: (abs(x - k), x))
            return plain + (self.verify[(b, near)] - base) * k / near
        return seconds


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
    ngrams: object = None      # its n-gram index (speculative.ngram.NgramIndex), for the n-gram method
    shadowed: bool = False     # its rate is measured while paused (shadow drafts): no probe needed for it

    @property
    def rate(self) -> float:
        return self.accepted / self.trials

    def pause_from(self, step: int) -> None:
        """No speculation until step + the current pause; the next pause is twice as long (up to a bound)."""
        self.paused_until = step + self.pause
        self.pause = min(2 * self.pause, LONGEST_PAUSE)

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


def plan(wants: list[tuple[RequestControl, int]], costs: StepCosts, bs: int, step: int) -> list[int]:
    """How many drafts each (request, most it may draft) proposes this step (0: none), for the batch's
    most expected tokens per second. Requests are taken likeliest first; each drafts the k that raises
    the batch's rate most, or nothing. At a batch size, the first decode step is plain and the first
    verify step holds one request's drafts, to measure. A request that stops paying pauses (doubling
    pauses); it resumes as soon as its measured rate says it pays, or for one probing verify step when
    its pause is over (not needed, so not taken, when its rate is shadow-measured and this batch size's
    verify cost is measured)."""
    plain = costs.plain_time(bs)
    if plain is None:                   # a plain step at this batch size first, to weigh drafts against
        return [0] * len(wants)
    untried = all(b != bs for b, _ in costs.verify)     # at this batch size: one request tries first
    verify_time = costs.verify_times(bs, plain)
    ks, probes, tokens, drafts = [0] * len(wants), [1] * len(wants), float(bs), 0
    order = sorted(range(len(wants)), key=lambda i: -wants[i][0].rate)
    for i in order:
        ctl, k_max = wants[i]
        now = tokens / verify_time(drafts) if drafts else tokens / plain
        if k_max < 1:
            continue
        rate, probes[i] = max(((tokens + expected_tokens(ctl.rate, k) - 1) / verify_time(drafts + k), k)
                              for k in range(1, k_max + 1))
        if rate > now and not (untried and drafts):
            ks[i], tokens, drafts = probes[i], tokens + expected_tokens(ctl.rate, probes[i]) - 1, drafts + probes[i]
    for i in order:
        ctl, k_max = wants[i]
        if k_max < 1:                   # at its last token: nothing to decide
            continue
        if ks[i]:
            ctl.pause, ctl.k = FIRST_PAUSE, ks[i]
        elif ctl.k > 0:                 # it just stopped paying: pause
            ctl.k = 0
            ctl.pause_from(step)
        elif step < ctl.paused_until:
            continue
        elif ctl.shadowed and not untried:
            # Its rate (from shadow drafts) and this batch size's verify cost are both measured, and they
            # say it does not pay: probing would only confirm it at a verify step's cost. Pause longer.
            ctl.pause_from(step)
        else:                           # the pause is over: one probe, at the k that came closest to paying
            ks[i] = ctl.k = probes[i]
    return ks
