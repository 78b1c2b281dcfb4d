"""`moe-engine serve` end to end: the real openai client against a server on a free loopback port."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moe_engine.config import EngineConfig  # noqa: E402
from moe_engine.llm import LLM  # noqa: E402
from moe_engine.sampling import SamplingParams  # noqa: E402
from moe_engine.serve.app import create_app  # noqa: E402
from tests.test_chat_templates import TOOLS, USER, hf_ids  # noqa: E402
from tests.test_chat_tools import OPENAI_TURN, as_transformers_sees, qwen3_tokenizers  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "tiny-mixtral"
NAME, KEY = "tiny-mixtral", "sekret"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time",
           "for i in range(", "class Stack:", "# A list of primes", "SELECT * FROM"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm():
    """The references: an LLM of its own, as the server's engine belongs to the server's thread."""
    return LLM(MODEL_DIR, "cpu", max_num_seqs=32)


@pytest.fixture(scope="module")
def server():
    app = create_app(LLM(MODEL_DIR, "cpu", max_num_seqs=32), NAME, api_key=KEY, max_waiting=64)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.loop
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(llm, prompt=None, ids=None, **kw):
    params = SamplingParams(temperature=0.0, **{"max_tokens": 12, **kw})
    if ids is not None:
        return llm.generate(prompt_token_ids=[ids], sampling_params=params)[0]
    return llm.generate(prompt, params)[0]


def wait_idle(loop, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not loop.engine.has_work() and not loop.live and loop.num_queued == 0:
            return
        time.sleep(0.05)
    raise AssertionError("engine still busy")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


def test_completion_matches_generate(llm, client):
    ref = greedy(llm, PROMPTS[0])
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == len(ref.prompt_token_ids) + len(ref.token_ids)
    echoed = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + ref.text
    # Token-id prompts: the same tokens come back, counted the same.
    by_ids = client.completions.create(model=NAME, prompt=ref.prompt_token_ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == ref.text


def test_streamed_completion_matches_generate(llm, client):
    ref = greedy(llm, PROMPTS[1])
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_matches_llm_chat(llm, client):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    ids = llm.tokenizer.encode_chat(messages)
    ref = greedy(llm, ids=ids)
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_tools_and_template_kwargs_reach_the_template(server, client, tmp_path, monkeypatch):
    """tools, chat_template_kwargs, assistant tool_calls (null content) and tool_call_id reach the template: the
    ids the engine gets are transformers' apply_chat_template ids (tiny Qwen3 tokenizer, in the tiny vocab)."""
    url, loop = server
    ours, hf = qwen3_tokenizers(tmp_path)
    got = []
    submit = loop.submit
    monkeypatch.setattr(loop, "tokenizer", ours)
    monkeypatch.setattr(loop, "submit", lambda req: (got.append(list(req.prompt_ids)), submit(req))[1])
    cases = [([USER], {}, {"tool_choice": "auto"}), (OPENAI_TURN, {}, {}),
             (OPENAI_TURN, {"enable_thinking": False}, {"tool_choice": "none"})]
    for messages, kwargs, extra in cases:
        r = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=2, temperature=0,
                                           extra_body={"chat_template_kwargs": kwargs} if kwargs else None, **extra)
        want = hf_ids(hf, as_transformers_sees(messages), tools=TOOLS, add_generation_prompt=True, **kwargs)
        assert got[-1] == want and r.usage.prompt_tokens == len(want)
    assert got[1] != got[2] and "get_weather" in hf.decode(got[0])
    client.chat.completions.create(model=NAME, messages=[USER], max_tokens=2, temperature=0)
    assert got[-1] == hf_ids(hf, [USER], add_generation_prompt=True) != got[0]       # no tools: the plain prompt
    wait_idle(loop)


def test_stop_strings(llm, client):
    full = greedy(llm, PROMPTS[0], max_tokens=16).text
    stop = full.strip()[3:6]
    assert stop and stop in full
    ref = greedy(llm, PROMPTS[0], max_tokens=16, stop=[stop])
    assert ref.text == full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                       stop=[stop, "\u2603"], stream=True)
    assert "".join(c.choices[0].text for c in chunks) == ref.text


def test_logprobs_equal_prompt_logits(llm, client):
    ref = greedy(llm, PROMPTS[2], max_tokens=6)
    ids = ref.prompt_token_ids + ref.token_ids
    logp = torch.log_softmax(llm.prompt_logits(ids[:-1]).float(), -1)[len(ref.prompt_token_ids) - 1:]  # [6, V]
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    want = logp.gather(1, torch.tensor(ref.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs), want, atol=1e-4)
    assert len(lp.tokens) == len(ref.token_ids) and "".join(lp.tokens) == ref.text
    for row, top in zip(logp, lp.top_logprobs):
        assert len(top) == 3
        assert torch.allclose(torch.tensor(sorted(top.values(), reverse=True)), row.topk(3).values, atol=1e-4)
    messages = [{"role": "user", "content": "Hello"}]
    cref = greedy(llm, ids=llm.tokenizer.encode_chat(messages), max_tokens=5)
    cids = cref.prompt_token_ids + cref.token_ids
    clogp = torch.log_softmax(llm.prompt_logits(cids[:-1]).float(), -1)[len(cref.prompt_token_ids) - 1:]
    c = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    got = [t.logprob for t in c.choices[0].logprobs.content]
    assert torch.allclose(torch.tensor(got), clogp.gather(1, torch.tensor(cref.token_ids)[:, None])[:, 0], atol=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)


def test_streamed_logprobs_equal_prompt_logits(llm, client):
    """Streaming with logprobs: each chunk carries its own tokens' log-probabilities, and together they
    equal the log-softmax of prompt_logits at the positions that chose them."""
    ref = greedy(llm, PROMPTS[4], max_tokens=8)
    ids = ref.prompt_token_ids + ref.token_ids
    logp = torch.log_softmax(llm.prompt_logits(ids[:-1]).float(), -1)[len(ref.prompt_token_ids) - 1:]  # [8, V]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=8, temperature=0,
                                            logprobs=2, stream=True))
    got = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    want = logp.gather(1, torch.tensor(ref.token_ids)[:, None])[:, 0]
    assert len(got) == len(ref.token_ids)
    assert torch.allclose(torch.tensor(got), want, atol=1e-4)
    words = [w for c in chunks if c.choices and c.choices[0].logprobs for w in c.choices[0].logprobs.tokens]
    assert "".join(words) == ref.text
    messages = [{"role": "user", "content": "Hi there"}]
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    content = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    cref = greedy(llm, ids=llm.tokenizer.encode_chat(messages), max_tokens=5)
    assert len(content) == len(cref.token_ids)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_usage_counts_cached_prompt_tokens(llm, client):
    """A prompt whose leading blocks are in the prefix cache says how many tokens it reused."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    n = len(llm.tokenizer.encode(prompt))
    first = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == n
    block = llm.engine.blocks.block_size
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // block * block > 0
    assert again.choices[0].text == first.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def once(seed):
        return client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=16, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text
    a, b = once(7), once(7)
    assert a == b
    assert any(once(s) != a for s in (8, 9, 10))


def test_32_concurrent_streams_equal_solo(llm, server, client):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    refs = {p: greedy(llm, p, max_tokens=8).text for p in set(prompts)}

    def one(p):
        chunks = client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, prompts))
    assert texts == [refs[p] for p in prompts]
    wait_idle(server[1])


def test_disconnects_free_every_block(server):
    url, loop = server
    blocks = loop.engine.blocks
    wait_idle(loop)

    def one(i):
        body = {"model": NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 400, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    return True     # leaving the block closes the connection mid-stream

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(8)))
    wait_idle(loop)
    assert blocks.num_free == blocks.num_blocks
    assert httpx.get(url + "/health").status_code == 200


def test_full_waiting_queue_answers_503(server, client):
    url, loop = server
    wait_idle(loop)
    loop.admit.clear()           # hold admission so the waiting queue fills for certain
    try:
        with ThreadPoolExecutor(loop.max_waiting) as pool:
            futures = [pool.submit(client.completions.create, model=NAME, prompt=PROMPTS[0], max_tokens=2)
                       for _ in range(loop.max_waiting)]
            deadline = time.time() + 20
            while loop.num_queued < loop.max_waiting:
                assert time.time() < deadline
                time.sleep(0.02)
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                           headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 503 and r.headers["retry-after"]
            assert "busy" in r.json()["error"]["message"]
            loop.admit.set()
            assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in futures)
    finally:
        loop.admit.set()
    assert client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=2).usage.completion_tokens >= 1


def test_bad_requests_answer_clearly(llm, server):
    url, loop = server
    auth = {"Authorization": f"Bearer {KEY}"}
    comp, chat = url + "/v1/completions", url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (comp, b"{not json", auth, 400, "not valid JSON"),
        (comp, b"[1, 2]", auth, 400, "JSON object"),
        (comp, {"prompt": "x", "max_tokens": "ten"}, auth, 400, "max_tokens"),
        (comp, {"prompt": "x", "max_tokens": 0}, auth, 400, "max_tokens"),
        (comp, {"prompt": "x", "temperature": -1}, auth, 400, "temperature"),
        (comp, {"prompt": "x", "top_p": 0}, auth, 400, "top_p"),
        (comp, {"prompt": "x", "top_p": 1.5}, auth, 400, "top_p"),
        (comp, {"prompt": "x", "top_k": -3}, auth, 400, "top_k"),
        (comp, {"prompt": "x", "min_p": 2}, auth, 400, "min_p"),
        (comp, {"prompt": "x", "repetition_penalty": 0}, auth, 400, "repetition_penalty"),
        (comp, {"prompt": "x", "seed": 1.5}, auth, 400, "seed"),
        (comp, {"prompt": "x", "stop": 5}, auth, 400, "stop"),
        (comp, {"prompt": "x", "stop": [""]}, auth, 400, "stop"),
        (comp, {"prompt": "x", "n": 2}, auth, 400, "n=2"),
        (comp, {"prompt": "x", "stream": "yes"}, auth, 400, "stream"),
        (comp, {"prompt": 5}, auth, 400, "prompt"),
        (comp, {"prompt": [-1, 5]}, auth, 400, "outside the vocabulary"),
        (comp, {"prompt": "x" * 5000}, auth, 400, "shorten the prompt"),
        (comp, {"prompt": "x" * 5000, "stream": True}, auth, 400, "shorten the prompt"),
        (comp, {"prompt": "x", "model": "gpt-17"}, auth, 404, "does not exist"),
        (comp, {"prompt": "x"}, {}, 401, "API key"),
        (comp, {"prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
        (chat, {"messages": "hi"}, auth, 400, "messages"),
        (chat, {"messages": []}, auth, 400, "messages"),
        (chat, {"messages": [{"role": "user"}]}, auth, 400, "content"),
        (chat, {"messages": msgs, "top_logprobs": 2}, auth, 400, "top_logprobs needs logprobs=true"),
        (chat, {"messages": msgs, "logprobs": True, "top_logprobs": 21}, auth, 400, "0..20"),
        (comp, {"prompt": "x", "logprobs": 30}, auth, 400, "0..20"),
        (chat, {"messages": msgs, "max_completion_tokens": -1}, auth, 400, "max_tokens"),
        (chat, {"messages": msgs, "tools": {"type": "function"}}, auth, 400, "'tools' must be a list"),
        (chat, {"messages": msgs, "tools": ["get_weather"]}, auth, 400, "'tools' must be a list"),
        (chat, {"messages": msgs, "chat_template_kwargs": "enable_thinking"}, auth, 400, "must be an object"),
        (chat, {"messages": msgs, "chat_template_kwargs": {"messages": []}}, auth, 400, "may not set messages"),
        (chat, {"messages": msgs, "tool_choice": "required"}, auth, 400, "not supported"),
        (chat, {"messages": msgs, "tool_choice": {"type": "function", "function": {"name": "f"}}}, auth, 400,
         "not supported"),
        (chat, {"messages": [{"role": "assistant", "content": None}]}, auth, 400, "content"),
        (chat, {"messages": [{"role": "assistant", "content": None, "tool_calls": "f()"}]}, auth, 400, "tool_calls"),
        (url + "/v1/nothing", {}, auth, 404, "Not Found"),
    ]
    too_long = None
    for target, body, headers, status, needle in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(target, headers=headers, timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert needle in err["message"], (needle, err)
        if needle == "shorten the prompt":
            too_long = err["message"]
    # The same one-line message the Python API (and so the CLI) gives for a prompt past the context.
    with pytest.raises(Exception) as refused:
        llm._new_sequence(llm.tokenizer.encode("x" * 5000), SamplingParams())
    assert str(refused.value) == too_long
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    wait_idle(loop)
    assert loop.engine.blocks.num_free == loop.engine.blocks.num_blocks


def test_metrics(server):
    text = httpx.get(server[0] + "/metrics").text
    for name in ("moe_engine_requests_running", "moe_engine_requests_waiting", "moe_engine_cache_blocks_used",
                 "moe_engine_generated_tokens_total", "moe_engine_time_to_first_token_seconds_bucket",
                 "moe_engine_time_per_output_token_seconds_count"):
        assert name in text
    generated = int(next(line.split()[1] for line in text.splitlines()
                         if line.startswith("moe_engine_generated_tokens_total ")))
    assert generated > 0


def test_cli_serve_subprocess():
    """`moe-engine serve` itself: loads the model, binds the loopback port it is given, names the model."""
    import os
    import subprocess
    import sys
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(MODEL_DIR.parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "moe_engine", "serve", "--model", str(MODEL_DIR), "--device", "cpu",
                             "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "little", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "moe-engine serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["little"]
        r = httpx.post(url + "/v1/completions", json={"model": "little", "prompt": "def", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def process_server():
    """The server as `moe-engine serve` runs it: the engine in a process of its own."""
    from moe_engine.serve.process import EngineProcess
    engine = EngineProcess(MODEL_DIR, "cpu", config=EngineConfig(max_num_seqs=32), max_waiting=64).start()
    app = create_app(engine, NAME, api_key=KEY, max_waiting=64)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=30)
    assert not engine.process.is_alive()         # the app's shutdown stopped the engine process


def metric(url: str, name: str) -> float:
    lines = [ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(name + " ")]
    return float(lines[0].split()[1])


def test_engine_process_serves_what_generate_gives(llm, process_server):
    url, engine = process_server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    refs = [greedy(llm, p, max_tokens=10) for p in PROMPTS]

    def one(i):
        if i % 2:
            return client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=10, temperature=0).choices[0].text
        chunks = client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=10, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [r.text for r in refs]
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    ref = greedy(llm, ids=llm.tokenizer.encode_chat(messages))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids) == len(r.choices[0].logprobs.content)
    bad = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": NAME, "prompt": "x" * 5000}, timeout=30)
    assert bad.status_code == 400 and "shorten the prompt" in bad.json()["error"]["message"]


def test_engine_process_frees_blocks_of_disconnected_clients(process_server):
    url, engine = process_server

    def one(_):
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(8)))
    deadline = time.time() + 20
    while metric(url, "moe_engine_cache_blocks_used") or metric(url, "moe_engine_requests_running"):
        assert time.time() < deadline, "blocks still in use after the clients went away"
        time.sleep(0.1)
    assert metric(url, "moe_engine_cache_blocks_total") > 0
    assert httpx.get(url + "/health").status_code == 200


def test_engine_process_that_cannot_load_says_why(tmp_path):
    from moe_engine.errors import MoeEngineError
    from moe_engine.serve.process import EngineProcess
    with pytest.raises(MoeEngineError) as e:
        EngineProcess(tmp_path / "missing", "cpu").start()
    assert "missing" in str(e.value) and "\n" not in str(e.value)
