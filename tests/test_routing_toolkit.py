"""The routing toolkit on the shipped tiny checkpoints: traces match a recomputation, analyses are
consistent, interventions do what they say, replay reproduces a run, export and the CLI write their files."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_defs.moe import route
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.routing import Trace, weights_for
from moe_engine.study import CLASSES, classify_tokens
from moe_engine.perplexity import stream_index

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):"]


def load(name: str, **kwargs) -> LLM:
    return LLM(ROOT / "weights" / name, "cpu", torch.float32, **kwargs)


@pytest.fixture(scope="module")
def mixtral():
    return load("tiny-mixtral")


@pytest.fixture(scope="module")
def deepseek():
    return load("tiny-deepseek")


@pytest.fixture(params=["mixtral", "deepseek"])
def llm(request):
    return request.getfixturevalue(request.param)


def val_tokens(llm: LLM, n: int) -> list[int]:
    name = llm.path.name
    return np.load(ROOT / "tests" / "data" / f"{name}_val_tokens.npy")[:n].tolist()


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def test_recorded_routing_equals_recomputation_from_router_scores(llm):
    with llm.trace_routing(scores=True) as trace:
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=5))
        llm.prompt_logits(val_tokens(llm, 24))
    assert llm.engine.routing_hook is None
    blocks = llm.model.moe_blocks
    assert trace.num_layers == len(blocks) and trace.scores.shape == (len(blocks), len(trace), trace.num_experts)
    for layer, block in enumerate(blocks):
        logits = torch.from_numpy(trace.scores[layer])                                  # [N, E]
        weights, ids = route(logits, block.routing, block.bias)
        assert torch.equal(ids, torch.from_numpy(trace.topk_ids[layer]).long())
        # Up to float rounding: the recomputation runs the softmax over another row count than the step did.
        torch.testing.assert_close(weights, torch.from_numpy(trace.topk_weights[layer]), rtol=1e-6, atol=1e-7)
        # weights_for (used by random routing) scores any choice exactly as route() scores its own.
        torch.testing.assert_close(weights_for(logits, ids, block.routing), weights, rtol=1e-6, atol=1e-7)
    if llm.model.moe_blocks[0].routing.scoring == "softmax":       # Mixtral by hand: softmax, top-2, renormalise
        probs = torch.from_numpy(trace.scores[0]).softmax(-1)
        top = probs.topk(2, -1)
        assert set(map(tuple, top.indices.sort(-1).values.tolist())) == \
            set(map(tuple, np.sort(trace.topk_ids[0], -1).tolist()))
        torch.testing.assert_close(top.values / top.values.sum(-1, keepdim=True),
                                   torch.from_numpy(trace.topk_weights[0]), rtol=1e-5, atol=1e-6)
    assert len(set(trace.request_ids.tolist())) == 3           # two generated requests, one prompt_logits call


def test_analyses_are_consistent(mixtral):
    code = "import os\n\n\ndef main(path, n=42):\n    # walk it\n    return [os.path.join(path, 'x')] * n\n"
    with mixtral.trace_routing() as trace:
        mixtral.prompt_logits(mixtral.tokenizer.encode(code))
    load = trace.expert_load()
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    assert load.shape == (L, E)
    np.testing.assert_allclose(load.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(trace.expert_load(weighted=True).sum(1), 1.0, rtol=1e-6)
    coact = trace.coactivation()
    np.testing.assert_allclose(np.diagonal(coact, axis1=1, axis2=2), load * k, rtol=1e-5)
    assert (trace.imbalance()["max_over_mean"] >= 1).all() and (trace.load_entropy() <= math.log2(E) + 1e-9).all()
    agreement = trace.adjacent_agreement()
    assert agreement.shape == (L - 1,) and ((agreement >= 0) & (agreement <= 1 + 1e-9)).all()
    transitions = trace.layer_transitions()
    np.testing.assert_allclose(transitions.sum(-1)[load[:-1] > 0], 1.0, rtol=1e-5)
    by_class = trace.load_by_class()
    assert set(by_class) <= set(CLASSES) and set(by_class) >= {"identifier", "whitespace", "punctuation", "keyword",
                                                                   "number", "string", "comment"}
    for class_load in by_class.values():
        np.testing.assert_allclose(class_load.sum(1), 1.0, rtol=1e-6)
    same = trace.compare(trace)
    assert same["matched_tokens"] == len(trace) and (same["top1_agreement"] == 1).all()
    with pytest.raises(MoeEngineError, match="scores=True"):
        trace.token_entropy()


def test_disabled_expert_gets_no_load_and_changes_the_output(mixtral):
    ids = val_tokens(mixtral, 64)
    with mixtral.trace_routing() as before:
        base = mixtral.prompt_logits(ids)
    busiest = int(before.expert_load()[0].argmax())
    with mixtral.override_routing(disabled_experts={0: [busiest], 2: [1, 5]}), mixtral.trace_routing() as after:
        changed = mixtral.prompt_logits(ids)
    load = after.expert_load()
    assert load[0, busiest] == 0 and load[2, 1] == 0 and load[2, 5] == 0
    np.testing.assert_allclose(load.sum(1), 1.0, rtol=1e-6)
    assert not torch.allclose(base, changed)


def test_top_k_equal_to_the_models_own_changes_nothing(llm):
    params = SamplingParams(max_tokens=6)
    k = llm.model.moe_blocks[0].routing.top_k
    plain = llm.generate(PROMPTS[:2], params)
    plain_logits = llm.prompt_logits(val_tokens(llm, 32))
    with llm.override_routing(top_k=k):
        same = llm.generate(PROMPTS[:2], params)
        same_logits = llm.prompt_logits(val_tokens(llm, 32))
    assert tokens(same) == tokens(plain)
    assert torch.equal(same_logits, plain_logits)
    with llm.override_routing(top_k=1), llm.trace_routing() as trace:
        fewer = llm.prompt_logits(val_tokens(llm, 32))
    assert trace.top_k == 1 and not torch.allclose(fewer, plain_logits)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=8),
                                    SamplingParams(max_tokens=8, temperature=0.9, seed=11)],
                         ids=["greedy", "seeded"])
def test_replaying_a_trace_reproduces_the_traced_run(mixtral, params):
    # Trace a run under random routing, so that reproducing it proves the replay is used.
    with mixtral.override_routing(random=3), mixtral.trace_routing() as recorded:
        traced = mixtral.generate(PROMPTS, params)
    plain = mixtral.generate(PROMPTS, params)
    with mixtral.override_routing(replay=recorded) as override, mixtral.trace_routing() as again:
        replayed = mixtral.generate(PROMPTS, params)
    assert tokens(replayed) == tokens(traced)
    assert tokens(plain) != tokens(traced)
    assert override.replay_misses == 0
    same = recorded.compare(again)
    assert same["matched_tokens"] == len(recorded.final()) and (same["topk_overlap"] == 1).all()


def test_batched_trace_attributes_tokens_to_the_right_request(mixtral):
    params = SamplingParams(max_tokens=6)
    with mixtral.trace_routing() as batched:
        outputs = mixtral.generate(PROMPTS, params)
    assert len(set(batched.steps[batched.request_ids >= 0].tolist())) < len(batched)   # really batched
    for prompt, out in zip(PROMPTS, outputs):
        with mixtral.trace_routing() as alone:
            single = mixtral.generate(prompt, params)[0]
        assert single.token_ids == out.token_ids
        mine = batched.for_request(out.request_id)
        ref = alone.for_request(single.request_id)
        # Every token fed to the model: the prompt and all generated tokens but the last (never fed back).
        assert mine.token_ids.tolist() == out.prompt_token_ids + out.token_ids[:-1] == ref.token_ids.tolist()
        assert mine.positions.tolist() == list(range(len(mine)))
        np.testing.assert_array_equal(np.sort(mine.topk_ids, -1), np.sort(ref.topk_ids, -1))
        np.testing.assert_allclose(np.sort(mine.topk_weights, -1), np.sort(ref.topk_weights, -1), atol=1e-5)


def test_preempted_tokens_are_recorded_again_and_flagged():
    llm = load("tiny-mixtral", block_size=4, num_kv_blocks=10)
    with llm.trace_routing() as trace:
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
    assert sum(o.num_preemptions for o in outputs) > 0
    assert (~trace.latest).any()
    final = trace.final()
    keys = list(zip(final.request_ids.tolist(), final.positions.tolist()))
    assert len(keys) == len(set(keys)) == len(set(zip(trace.request_ids.tolist(), trace.positions.tolist())))
    for out in outputs:
        assert trace.for_request(out.request_id).token_ids.tolist() == out.prompt_token_ids + out.token_ids[:-1]
    # Replaying under preemption again matches by (request, position): the same tokens come out.
    with llm.override_routing(replay=trace) as override:
        again = llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
    assert tokens(again) == tokens(outputs) and override.replay_misses == 0


def test_random_routing_is_seeded_and_weighted_by_the_model(deepseek):
    ids = val_tokens(deepseek, 24)
    runs = []
    for _ in range(2):
        with deepseek.override_routing(random=5), deepseek.trace_routing(scores=True) as trace:
            deepseek.prompt_logits(ids)
        runs.append(trace)
    np.testing.assert_array_equal(runs[0].topk_ids, runs[1].topk_ids)
    cfg = deepseek.model.moe_blocks[0].routing
    topk_ids = torch.from_numpy(runs[0].topk_ids[0]).long()
    np.testing.assert_allclose(weights_for(torch.from_numpy(runs[0].scores[0]), topk_ids, cfg).numpy(),
                               runs[0].topk_weights[0], rtol=1e-6)
    _, own_ids = route(torch.from_numpy(runs[0].scores[0]), cfg, deepseek.model.moe_blocks[0].bias)
    assert not np.array_equal(np.sort(topk_ids.numpy(), -1), np.sort(own_ids.numpy(), -1))


def test_bad_interventions_raise_one_clear_error(mixtral):
    bad = [dict(disabled_experts={9: [0]}), dict(disabled_experts={0: [8]}),
           dict(disabled_experts={0: list(range(7))}), dict(top_k=0), dict(top_k=9), dict(random="x")]
    for kwargs in bad:
        with pytest.raises(MoeEngineError):
            with mixtral.override_routing(**kwargs):
                pass
    with mixtral.trace_routing() as trace:
        mixtral.prompt_logits([1, 2, 3])
    with pytest.raises(MoeEngineError, match="cannot combine"):
        mixtral.override_routing(replay=trace, top_k=1)
    with mixtral.override_routing(top_k=1):
        with pytest.raises(MoeEngineError, match="already active"):
            with mixtral.override_routing(top_k=2):
                pass
    with pytest.raises(RuntimeError):
        with mixtral.override_routing(top_k=1):
            raise RuntimeError("boom")
    assert mixtral.engine.routing_hook is None and mixtral.engine.blocks.enable_prefix_caching
    with pytest.raises(MoeEngineError, match="empty"):
        Trace().expert_load()


def test_perplexity_is_exp_of_the_mean_next_token_loss(mixtral):
    ids = val_tokens(mixtral, 40)
    logits = mixtral.prompt_logits(ids)
    want = math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert mixtral.perplexity(ids) == pytest.approx(want, rel=1e-5)
    # Windows of 16 overlapping by one token: every token after the first is predicted once.
    total, count = 0.0, 0
    for start in (0, 15, 30):
        chunk = ids[start:start + 16]
        part = mixtral.prompt_logits(chunk)
        total += F.cross_entropy(part[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    assert count == 39
    with mixtral.trace_routing() as trace:
        assert mixtral.perplexity(ids, window=16) == pytest.approx(math.exp(total / count), rel=1e-5)
    # Each window is its own call (request -1, -2, -3); stream_index maps records back into the stream.
    assert trace.request_ids.min() == -3
    np.testing.assert_array_equal(np.array(ids)[stream_index(trace, 16)], trace.token_ids)
    with pytest.raises(MoeEngineError):
        mixtral.perplexity([1])


def test_token_classes_of_code():
    texts = ["def", " foo", "(", "x", ")", ":", "\n    ", "return", " \"a", "b c", "\"", " +", " 12", " #", " hi",
             "\n", "if", "_x", " '''doc", "\n more", "'''"]
    want = ["keyword", "identifier", "punctuation", "identifier", "punctuation", "punctuation", "whitespace",
            "keyword", "string", "string", "string", "punctuation", "number", "comment", "comment", "whitespace",
            "identifier", "identifier", "string", "string", "string"]
    assert [CLASSES[c] for c in classify_tokens(texts)] == want


def test_trace_save_and_load_round_trip(mixtral, tmp_path):
    with mixtral.trace_routing(scores=True) as trace:
        mixtral.generate(PROMPTS[:2], SamplingParams(max_tokens=4))
    path = trace.save(tmp_path / "run" / "trace")
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = Trace.load(tmp_path / "run" / "trace.npz")
    for name in ("request_ids", "token_ids", "positions", "steps", "topk_ids", "topk_weights", "scores"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(trace, name))
    assert loaded.routing == trace.routing and loaded.summary() == trace.summary()
    # Token classes were saved, so they work without the tokenizer.
    assert loaded.tokenizer is None and loaded.load_by_class().keys() == trace.load_by_class().keys()
    with pytest.raises(MoeEngineError, match="no saved trace"):
        Trace.load(tmp_path / "missing")


def test_plots_write_png_files(mixtral, tmp_path):
    pytest.importorskip("matplotlib")
    from moe_engine.study import plots
    with mixtral.trace_routing() as trace:
        mixtral.prompt_logits(val_tokens(mixtral, 64))
    for path in (plots.plot_expert_load(trace, tmp_path / "load.png"),
                 plots.plot_coactivation(trace, tmp_path / "coact.png"),
                 plots.plot_class_affinity(trace, tmp_path / "classes.png")):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_cli_routing_writes_the_trace_plots_and_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from moe_engine.cli import main
    text = tmp_path / "code.py"
    text.write_text("import os\n\n\ndef main(path):\n    # list a folder\n    for name in os.listdir(path):\n"
                    "        print(name, 42)\n")
    out = tmp_path / "out"
    argv = ["routing", "--model", "weights/tiny-mixtral", "--device", "cpu", "--dtype", "float32", "--quiet",
            "--text-file", str(text), "--out", str(out)]
    assert main(argv) == 0
    for name in ("trace.npz", "trace.json", "expert_load.png", "coactivation.png", "class_affinity.png",
                 "summary.md"):
        assert (out / name).is_file(), name
    assert "| MoE layer |" in (out / "summary.md").read_text() and "perplexity" in capsys.readouterr().out
    assert main(argv[:-4] + ["--text-file", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
