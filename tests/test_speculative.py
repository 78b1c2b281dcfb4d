"""Speculative decoding: greedy tokens identical to plain decoding (alone, mixed batches, preemption), the
rejection sampler's output distribution equal to the target's, and seeded sampling's token frequencies
unchanged end to end."""

import math
import random

import numpy as np
import pytest
import torch

from conftest import ROOT, WEIGHTS
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.speculative.config import SpeculativeConfig, parse_speculative
from moe_engine.speculative.control import RequestControl, StepCosts, expected_tokens, plan
from moe_engine.speculative.ngram import NgramIndex, propose_ngram
from moe_engine.speculative.rejection import accept_greedy, rejection_sample

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def spec(k: int, adaptive: bool = False) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4,
            "adaptive": adaptive}


def prompts_for(model: str) -> list[list[int]]:
    """Eight prompts of held-out code of different lengths; two repeat a piece (n-gram drafts accept)."""
    stream = np.load(ROOT / f"tests/data/{model}_val_tokens.npy").astype(np.int64)
    starts = np.random.default_rng(5).integers(0, len(stream) - 300, 8)
    prompts = [stream[s:s + n].tolist() for s, n in zip(starts, [3, 17, 40, 70, 100, 33, 150, 9])]
    prompts[1] = prompts[1] * 3
    prompts[5] = prompts[5] + prompts[5][:20]
    return prompts


def assert_no_leak(llm: LLM):
    blocks = llm.engine.blocks
    assert blocks.num_free == blocks.num_blocks and not any(blocks.ref_counts)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-deepseek"])
def case(request):
    model = request.param
    prompts = prompts_for(model)
    plain = LLM(WEIGHTS / model)
    reference = [o.token_ids for o in plain.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
    return plain, prompts, reference


def run_mixed(llm: LLM, prompts, speculative: list[bool]) -> list:
    """Half the requests first, the rest added a few steps later (their prefill chunks share steps with
    the others' verify steps); speculative[i] says whether request i may propose drafts."""
    seqs, mixed = [], []
    verify = llm.engine.spec.verify

    def watched(engine, batch, *args):
        mixed.append(any(n > 1 for n in batch.num_tokens))
        return verify(engine, batch, *args)

    llm.engine.spec.verify = watched
    for i, p in enumerate(prompts):
        if i == len(prompts) // 2:
            for _ in range(3):
                llm.engine.step()
        seq = llm._new_sequence(p, GREEDY)
        seq.speculative = speculative[i]
        seqs.append(seq)
    llm._run_until_done(seqs)
    return seqs, any(mixed)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_identical_alone_and_mixed_batch(case, k):
    plain, prompts, reference = case
    alone = LLM.from_model(plain.model, plain.tokenizer, speculative_config=spec(k))
    out = alone.generate(prompt_token_ids=[prompts[1]], sampling_params=GREEDY)[0]
    assert out.token_ids == reference[1]
    assert out.num_draft_tokens > 0 and 0 < out.num_accepted_tokens <= out.num_draft_tokens
    assert_no_leak(alone)

    llm = LLM.from_model(plain.model, plain.tokenizer, speculative_config=spec(k), max_num_batched_tokens=48)
    which = [i % 2 == 1 for i in range(len(prompts))]              # odd ones speculate
    seqs, mixed_prefill = run_mixed(llm, prompts, which)
    assert [s.output_ids for s in seqs] == reference
    assert all(s.num_draft_tokens == 0 for s, w in zip(seqs, which) if not w)
    assert sum(s.num_draft_tokens for s in seqs) > 0 and sum(s.num_accepted_tokens for s in seqs) > 0
    assert mixed_prefill                                           # a verify step carried prefill chunks
    assert_no_leak(llm)


def test_greedy_identical_under_preemption(case):
    plain, prompts, reference = case
    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    llm = LLM.from_model(plain.model, plain.tokenizer, speculative_config=spec(3), block_size=16,
                         num_kv_blocks=longest // 16 + 3)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_draft_tokens for o in outs) > 0
    assert_no_leak(llm)


def test_greedy_with_repetition_penalty_and_prefix_cache():
    llm = LLM(WEIGHTS / "tiny-mixtral")
    prompt = prompts_for("tiny-mixtral")[1]
    params = SamplingParams(max_tokens=30, ignore_eos=True, repetition_penalty=1.3)
    want = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    fast = LLM.from_model(llm.model, llm.tokenizer, speculative_config=spec(4), block_size=16)
    for _ in range(2):      # the second run reuses the blocks the first registered (accepted tokens only)
        out = fast.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
        assert out.token_ids == want and out.num_draft_tokens > 0
    assert fast.engine.blocks.prefix_hits > 0
    assert_no_leak(fast)


def test_ngram_proposer_longest_most_recent_match():
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert propose_ngram(ids, 2, 1, 4) == [7, 8]           # suffix [2, 3]: latest earlier occurrence
    assert propose_ngram([4, 5, 4, 6, 1, 4], 3, 1, 4) == [6, 1, 4]   # [4] last at 2: ids 3..5
    assert propose_ngram([1, 2, 3], 3, 1, 4) == []
    assert propose_ngram([1, 2, 1, 2, 5, 1, 2], 2, 2, 2) == [5, 1]
    assert propose_ngram([7, 7], 4, 1, 4) == [7]          # the drafts may run into the suffix itself


def scan_ngram(ids, k, n_min, n_max):
    """The lookup by a plain scan: the latest window of the last n tokens that ends before the last token."""
    for n in range(min(n_max, len(ids) - 1), n_min - 1, -1):
        hits = [i for i in range(len(ids) - n) if ids[i:i + n] == ids[len(ids) - n:]]
        if hits and k >= 1:
            return ids[hits[-1] + n:hits[-1] + n + k]
    return []


def test_ngram_index_grown_step_by_step_equals_a_scan():
    gen = random.Random(0)
    for n_min, n_max in ((1, 4), (2, 3), (1, 1)):
        ids, index = [], NgramIndex(n_min, n_max)
        for _ in range(300):
            ids += [gen.randrange(6) for _ in range(gen.choice((1, 1, 3)))]     # accepted drafts come in runs
            k = gen.randrange(0, 5)
            assert index.propose(ids, k) == scan_ngram(ids, k, n_min, n_max), (ids, k)


def test_speculative_config_errors():
    with pytest.raises(MoeEngineError, match="unknown speculative_config key"):
        SpeculativeConfig.of({"method": "ngram", "k": 3})
    with pytest.raises(MoeEngineError, match="method"):
        SpeculativeConfig.of({"method": "eagle"})
    with pytest.raises(MoeEngineError, match="prompt_lookup_min=5 is above"):
        SpeculativeConfig.of({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2})
    with pytest.raises(MoeEngineError, match="num_speculative_tokens"):
        SpeculativeConfig.of({"method": "ngram", "num_speculative_tokens": 0})
    assert parse_speculative("ngram:5") == {"method": "ngram", "num_speculative_tokens": 5}
    with pytest.raises(MoeEngineError, match="K must be a whole number"):
        parse_speculative("ngram:five")


def choose_k(ctl, costs, k_max, step):
    """plan() for one request alone."""
    return plan([(ctl, k_max)], costs, 1, step)[0]


def test_never_slower_control():
    """A verify step costing more than its expected tokens are worth pauses speculation, then retries."""
    costs = StepCosts()
    for _ in range(5):
        costs.record([1], [[]], 0.010)
        costs.record([1], [[3, 4, 5]], 0.030)               # 3x a plain step
    ctl = RequestControl(accepted=1.0, trials=10.0)           # a = 0.1: E(3) = 1.11 tokens < 3
    assert choose_k(ctl, costs, 3, step=1) == 0
    assert all(choose_k(ctl, costs, 3, step=s) == 0 for s in range(2, ctl.paused_until))
    assert choose_k(ctl, costs, 3, step=ctl.paused_until) >= 1     # a probe once the pause is over
    assert choose_k(ctl, costs, 3, step=ctl.paused_until + 1) == 0  # still does not pay: a longer pause
    # An n-gram request's rate is measured while it is paused (shadow drafts) and this batch size's verify
    # cost is measured: its pause ends in a longer pause, not a probe that would only confirm it.
    shadowed = RequestControl(accepted=1.0, trials=10.0, shadowed=True)
    assert choose_k(shadowed, costs, 3, step=1) == 0
    first_end = shadowed.paused_until
    assert choose_k(shadowed, costs, 3, step=first_end) == 0 and shadowed.paused_until == first_end + 16
    assert choose_k(RequestControl(1.0, 10.0, shadowed=True), StepCosts(), 3, step=1) == 0  # no plain step yet
    good = RequestControl(accepted=9.5, trials=10.0)          # a = 0.95: E(3) = 3.7 tokens > 3
    assert choose_k(good, costs, 3, step=1) == 3
    assert choose_k(RequestControl(accepted=9.5, trials=10.0, shadowed=True), costs, 3, step=1) == 3
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    # Paused, the drafts it would have proposed are scored against the tokens that came: a run of matches
    # raises the rate until speculation pays again, before the pause is over.
    step = ctl.paused_until - 12                              # inside the (16-step) pause
    while choose_k(ctl, costs, 3, step) == 0 and step < ctl.paused_until:
        ctl.shadow, ctl.shadow_at = [1, 2, 3], 10
        ctl.observe([0] * 10 + [1, 2])                        # not yet told: kept
        assert ctl.shadow
        ctl.observe([0] * 10 + [1, 2, 3])
        assert not ctl.shadow
        step += 1
    assert step < ctl.paused_until and ctl.rate > 0.6
    ctl.shadow, ctl.shadow_at = [1, 2, 3], 0
    before = ctl.trials
    ctl.observe([1, 5])                                       # rejected at the 2nd: 1 accepted, 1 rejection
    assert not ctl.shadow and abs(ctl.trials - (0.8 * before + 2)) < 1e-9


def test_never_slower_control_weighs_the_whole_batch():
    """A verify step slows every request in the batch: one request's drafts that would pay alone (3.7
    tokens for 1.6x a plain step) do not pay beside seven requests that gain nothing from them."""
    costs = StepCosts()
    for bs in (1, 8):
        for _ in range(5):
            costs.record([1] * bs, [[]] * bs, 0.010)
            costs.record([1] * bs, [[3, 4, 5]] + [[]] * (bs - 1), 0.016)     # 2 ms a draft, whatever the batch
    good, poor = RequestControl(accepted=9.5, trials=10.0), RequestControl(accepted=1.0, trials=10.0)
    assert plan([(good, 3)], costs, 1, step=1) == [3]                        # alone: 3.71 tokens in 1.6x
    assert plan([(RequestControl(9.5, 10.0), 3)] + [(RequestControl(1.0, 10.0), 3) for _ in range(7)],
                costs, 8, step=1) == [0] * 8                                 # (8 + 2.7) / 1.6 < 8 tokens
    cheap = StepCosts()                         # drafts at 0.5 ms: a likely request's pay, a poor one's not
    for _ in range(5):
        cheap.record([1] * 8, [[]] * 8, 0.010)
        cheap.record([1] * 8, [[3, 4, 5]] + [[]] * 7, 0.0115)
    assert plan([(RequestControl(9.5, 10.0), 3)] + [(RequestControl(1.0, 10.0), 3) for _ in range(7)],
                cheap, 8, step=1) == [3] + [0] * 7
    assert plan([(poor, 3), (RequestControl(9.5, 10.0), 0)], costs, 2, step=1)[1] == 0   # k_max 0: none


def test_accept_greedy():
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert accept_greedy([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert accept_greedy([4, 9], [5]) == [4]


def _emitted_first(p, q, draft_from_q: bool, n: int, gen) -> torch.Tensor:
    """Counts [V] of the first emitted token over n trials of one draft (drawn from q, or q's argmax
    fixed as an n-gram draft with q = None)."""
    V = p.shape[-1]
    counts = torch.zeros(V)
    fixed = int(q.argmax())
    for _ in range(n):
        if draft_from_q:
            d = int(torch.multinomial(q, 1, generator=gen))
            token = rejection_sample(p[None].expand(2, V), [d], q[None], gen)[0]
        else:
            token = rejection_sample(p[None].expand(2, V), [fixed], None, gen)[0]
        counts[token] += 1
    return counts


def test_rejection_sampler_preserves_target_distribution():
    """vLLM-style: small vocabulary, random target/draft pairs; the emitted tokens' histogram converges
    to the target (and away from the draft) as samples grow. Per token the frequency error is within
    4.5 standard errors sqrt(p (1 - p) / n) + 1/n: over the 8 pairs x 6 tokens x 2 draft kinds checked,
    a false alarm has probability below 1e-3 (normal tail 6.8e-6 per check)."""
    gen = torch.Generator().manual_seed(1234)
    V, n, pairs = 6, 2000, 8
    far_from_q = 0
    for i in range(pairs):
        p = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
        q = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
        for from_q in (True, False):
            freq = _emitted_first(p, q, from_q, n, gen) / n
            tol = 4.5 * torch.sqrt(p * (1 - p) / n) + 1 / n
            assert torch.all((freq - p).abs() <= tol), (i, from_q, freq, p)
            tv_p, tv_q = 0.5 * (freq - p).abs().sum(), 0.5 * (freq - q).abs().sum()
            if 0.5 * (p - q).abs().sum() > 0.2:
                assert tv_p < tv_q
                far_from_q += 1
    assert far_from_q >= 3
    # Convergence: the distance to the target shrinks with the sample count (one pair, 100 -> 10000).
    p = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    tv = [0.5 * (_emitted_first(p, q, True, m, gen) / m - p).abs().sum() for m in (100, 5000)]
    assert tv[1] < tv[0] and tv[1] < 0.04


def chi_square_homogeneity(a: list[int], b: list[int], min_expected: float = 5.0) -> tuple[float, int, float]:
    """Two-sample chi-square test of equal token frequencies: (statistic, degrees of freedom, p-value);
    tokens with a small pooled count are merged into one bin."""
    tokens = sorted(set(a) | set(b))
    na, nb = len(a), len(b)
    ca = {t: a.count(t) for t in tokens}
    cb = {t: b.count(t) for t in tokens}
    big = [t for t in tokens if (ca[t] + cb[t]) * min(na, nb) / (na + nb) >= min_expected]
    rows = [(ca[t], cb[t]) for t in big]
    rest = (sum(ca[t] for t in tokens if t not in big), sum(cb[t] for t in tokens if t not in big))
    if sum(rest):
        rows.append(rest)
    stat = 0.0
    for x, y in rows:
        tot = x + y
        ex, ey = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    dof = len(rows) - 1
    pvalue = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                           torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, dof, pvalue


def test_seeded_sampling_frequencies_unchanged():
    """Each request samples 4 tokens at temperature 1 (top_k 12) after a repetitive prompt (n-gram drafts
    are proposed and some accepted, some rejected). The 2nd..4th tokens (from verify steps) must be
    distributed as without speculation: chi-square homogeneity at significance 0.001 per position. The
    same test tells apart temperature 1 from 0.5 at this sample size (its power is not nil)."""
    plain = LLM(WEIGHTS / "tiny-mixtral")
    fast = LLM.from_model(plain.model, plain.tokenizer, speculative_config=spec(3))
    prompt = prompts_for("tiny-mixtral")[1][:40]
    n = 320

    def sample(llm, offset, temperature=1.0):
        params = [SamplingParams(max_tokens=4, temperature=temperature, top_k=12, seed=offset + i, ignore_eos=True)
                  for i in range(n)]
        return llm.generate(prompt_token_ids=[prompt] * n, sampling_params=params)

    base, spec_out, cooler = sample(plain, 0), sample(fast, 100_000), sample(plain, 200_000, 0.5)
    assert sum(o.num_draft_tokens for o in spec_out) > n
    assert 0 < sum(o.num_accepted_tokens for o in spec_out) < sum(o.num_draft_tokens for o in spec_out)
    for pos in (1, 2, 3):
        _, _, p_same = chi_square_homogeneity([o.token_ids[pos] for o in base], [o.token_ids[pos] for o in spec_out])
        assert p_same > 1e-3, (pos, p_same)
    _, _, p_diff = chi_square_homogeneity([o.token_ids[1] for o in base], [o.token_ids[1] for o in cooler])
    assert p_diff < 1e-3
    assert_no_leak(fast)
