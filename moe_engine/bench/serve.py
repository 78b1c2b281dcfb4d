"""`moe-engine bench serve`: N concurrent streaming clients against `moe-engine serve` in this process,
aggregate tokens/s and time to first token, vs LLM.generate on the same prompts in the same run."""

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from moe_engine.errors import MoeEngineError
from moe_engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent.parent
WORDS = ["def", "class", "import", "The", "Once", "for", "SELECT", "#", "while", "return", "async", "from"]


def prompts(n: int) -> list[str]:
    """n distinct short prompts (varied lengths), the same every run."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + i % 7)) for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_server(app):
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise MoeEngineError("the benchmark server did not start; see the log above")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


async def _astream(http, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens


def load(url: str, clients: int, tokens: int) -> dict:
    """All clients at once from one asyncio loop (this runs in a process of its own, so the clients'
    parsing does not take the server's interpreter lock): per-client results, errors, wall seconds."""
    import asyncio
    import httpx

    async def run():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            await _astream(http, url, "warm up", 4)
            start = time.perf_counter()
            out = await asyncio.gather(*[_astream(http, url, t, tokens) for t in prompts(clients)],
                                       return_exceptions=True)
            return out, time.perf_counter() - start

    out, seconds = asyncio.run(run())
    return {"results": [r for r in out if not isinstance(r, BaseException)], "seconds": seconds,
            "errors": [f"{type(r).__name__}: {r}" for r in out if isinstance(r, BaseException)]}


def client_process(url: str, clients: int, tokens: int) -> dict:
    """One load() run in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "moe_engine.bench.serve", "--load-of", url, "--clients",
                           str(clients), "--tokens", str(tokens)], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise MoeEngineError(f"the client process failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench serve", description=__doc__)
    p.add_argument("--model", default=str(REPO / "weights" / "tiny-mixtral"))
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best is kept)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--load-of", default=None, help=argparse.SUPPRESS)     # the client process: the server's URL
    args = p.parse_args(argv)
    if args.load_of:
        print(json.dumps(load(args.load_of, args.clients, args.tokens)))
        return 0
    from moe_engine.llm import LLM
    from moe_engine.serve.app import create_app
    llm = LLM(args.model, args.device, max_num_seqs=args.clients)
    texts = prompts(args.clients)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate(texts[:2], SamplingParams(max_tokens=4))          # warm-up
    direct_s = float("inf")
    for _ in range(args.repeats):       # the machine may be shared: the best run of each side is kept
        start = time.perf_counter()
        outs = llm.generate(texts, params)
        direct_s = min(direct_s, time.perf_counter() - start)
    direct_tps = sum(len(o.token_ids) for o in outs) / direct_s

    server, thread, url = start_server(create_app(llm, "bench", max_waiting=4 * args.clients))
    try:
        runs = [client_process(url, args.clients, args.tokens) for _ in range(args.repeats)]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    # The machine may be shared: the fastest run is kept, but any errors in any run count.
    best = min(runs, key=lambda r: r["seconds"])
    best["errors"] = [e for r in runs for e in r["errors"]]
    results, errors, served_s = best["results"], best["errors"], best["seconds"]
    served_tps = sum(r[2] for r in results) / served_s
    ttft = [r[0] for r in results] or [float("nan")]
    report = {"clients": args.clients, "tokens": args.tokens, "device": str(llm.device), "errors": len(errors),
              "served_tok_s": round(served_tps, 1), "generate_tok_s": round(direct_tps, 1),
              "ratio": round(served_tps / direct_tps, 3), "ttft_p50_s": round(percentile(ttft, 50), 4),
              "ttft_p99_s": round(percentile(ttft, 99), 4), "served_seconds": round(served_s, 3),
              "generate_seconds": round(direct_s, 3)}
    print(f"{args.clients} streaming clients x {args.tokens} tokens on {llm.device}: {served_tps:.1f} tok/s served "
          f"vs {direct_tps:.1f} tok/s LLM.generate ({100 * report['ratio']:.0f}%); TTFT p50 "
          f"{report['ttft_p50_s'] * 1000:.0f} ms, p99 {report['ttft_p99_s'] * 1000:.0f} ms; {len(errors)} errors")
    for e in errors[:5]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
