"""SamplingParams validation, sample_token's filters and seeding, and seeded / stopped generation end to end."""

import math
from collections import Counter

import pytest
import torch

from conftest import WEIGHTS
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.sampling import apply_repetition_penalty, sample_token

PROBS = [0.5, 0.3, 0.15, 0.05]


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def draws(logits, n: int, seed: int = 0, seen=(), **params) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    p = SamplingParams(**params)
    return [sample_token(logits, p, list(seen), gen) for _ in range(n)]


# --- validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -1), ("top_k", 2.5),
    ("min_p", 2), ("min_p", -0.1), ("min_p", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", float("nan")),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5),
    ("seed", "abc"), ("stop", [""]),
])
def test_bad_value_is_refused_naming_the_field(field, value):
    with pytest.raises(MoeEngineError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert field in msg and "\n" not in msg


def test_good_values_are_accepted():
    p = SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=0, min_p=1, repetition_penalty=0.5, seed=3,
                       stop="x")
    assert p.stop == ["x"] and p.greedy
    assert not SamplingParams(temperature=1e-3).greedy


# --- sample_token ---------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9, 2.99])
    assert draws(logits, 5, temperature=0) == [1] * 5
    noisy = torch.randn(1000)
    assert sample_token(noisy, SamplingParams(), [], None) == int(noisy.argmax())


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 1000.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    logits = torch.randn(50)
    assert set(draws(logits, 200, top_k=1, temperature=temperature)) == {int(logits.argmax())}


def test_top_k_keeps_k_best():
    logits = logits_of(PROBS)
    assert set(draws(logits, 2000, top_k=2, temperature=1.0)) == {0, 1}


def test_tiny_top_p_keeps_only_the_best_token():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])      # nearly flat: without top_p all five are drawn
    assert set(draws(logits, 2000, temperature=2.0)) == {0, 1, 2, 3, 4}
    assert set(draws(logits, 2000, top_p=1e-6, temperature=2.0)) == {0}


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = logits_of(PROBS)
    # cumulative .5 .8 .95 1.0: p=.75 needs {0, 1}; p=.9 needs {0, 1, 2}
    assert set(draws(logits, 2000, top_p=0.75, temperature=1.0)) == {0, 1}
    assert set(draws(logits, 2000, top_p=0.9, temperature=1.0)) == {0, 1, 2}


def test_min_p_filters_relative_to_the_best():
    logits = logits_of(PROBS)
    # min_p .2 -> threshold .2 * .5 = .1 drops token 3; min_p .5 -> threshold .25 keeps {0, 1}.
    assert set(draws(logits, 3000, min_p=0.2, temperature=1.0)) == {0, 1, 2}
    got = draws(logits, 4000, min_p=0.5, temperature=1.0)
    assert set(got) == {0, 1}
    assert abs(Counter(got)[0] / len(got) - 0.5 / 0.8) < 0.03     # renormalised over the kept tokens


def test_temperature_sharpens_or_flattens_as_softmax_of_logits_over_t():
    logits = logits_of([0.5, 0.3, 0.2])
    for t in (0.5, 2.0):
        want = [p ** (1 / t) for p in (0.5, 0.3, 0.2)]
        want = [w / sum(want) for w in want]
        got = Counter(draws(logits, 6000, seed=1, temperature=t))
        for tok in range(3):
            assert abs(got[tok] / 6000 - want[tok]) < 0.025, (t, tok, got)


def test_same_seed_same_draws_other_seed_other_draws():
    logits = torch.zeros(20)        # uniform over 20 tokens
    a = draws(logits, 60, seed=1234, temperature=1.0)
    assert a == draws(logits, 60, seed=1234, temperature=1.0)
    assert a != draws(logits, 60, seed=4321, temperature=1.0)
    assert len(set(a)) > 5


def test_repetition_penalty_values():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 2, 2], 2.0)
    # positive seen logits divided, negative seen logits multiplied, unseen untouched
    assert out.tolist() == [1.0, 1.0, -2.0, 0.5]
    assert logits.tolist() == [2.0, 1.0, -1.0, 0.5]          # the input is not modified
    assert torch.equal(apply_repetition_penalty(logits, [0, 2], 1.0), logits)


def test_repetition_penalty_lowers_a_seen_tokens_probability():
    logits = torch.tensor([2.0, 1.5, 0.0, -0.5])
    assert sample_token(logits, SamplingParams(), [], None) == 0
    assert sample_token(logits, SamplingParams(repetition_penalty=2.0), [0], None) == 1
    free = Counter(draws(logits, 4000, seed=2, temperature=1.0))
    penalised = Counter(draws(logits, 4000, seed=2, temperature=1.0, seen=[0], repetition_penalty=1.5))
    want_free = math.exp(2.0) / sum(math.exp(x) for x in (2.0, 1.5, 0.0, -0.5))
    want_pen = math.exp(2.0 / 1.5) / sum(math.exp(x) for x in (2.0 / 1.5, 1.5, 0.0, -0.5))
    assert abs(free[0] / 4000 - want_free) < 0.025
    assert abs(penalised[0] / 4000 - want_pen) < 0.025
    assert penalised[0] < free[0] - 300


# --- end to end -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
    return LLM(WEIGHTS / "tiny-mixtral", device="cpu", dtype="float32", num_kv_blocks=32)


PROMPT = "def fibonacci(n):\n"


def test_same_seed_same_text(llm):
    params = dict(max_tokens=16, temperature=0.8, ignore_eos=True)
    first = llm.generate(PROMPT, SamplingParams(seed=7, **params))[0]
    again = llm.generate(PROMPT, SamplingParams(seed=7, **params))[0]
    assert first.token_ids == again.token_ids and first.text == again.text and len(first.token_ids) == 16
    other = llm.generate(PROMPT, SamplingParams(seed=8, **params))[0]
    assert other.token_ids != first.token_ids        # the seed, not greedy decoding, fixes the text


def test_stop_string_truncates_and_finishes_with_stop(llm):
    full = llm.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = full.text[8:11]                                  # a piece from the middle of the greedy text
    want = full.text[:full.text.find(stop)]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == want and stop not in out.text
    assert len(out.token_ids) < len(full.token_ids)
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
