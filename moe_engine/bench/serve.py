"""`moe-engine bench serve`: N concurrent streaming clients against `moe-engine serve` in this process,
aggregate tokens/s and time to first token, vs LLM.generate on the same prompts in the same run."""

import argparse
import json
import re
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


FIRST_TEXT = re.compile(rb'"text": "[^"]')          # a chunk with text in it (not the empty finish chunk)
USAGE = re.compile(rb'"completion_tokens": (\d+)')


async def _astream(host: str, port: int, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streaming completion over a raw HTTP/1.1 connection: (time to first text, total time, tokens
    the usage chunk counts). A lean client on purpose: on a 2-core machine an httpx + json client spends
    about as much CPU parsing 64 streams as the server spends serving them, and it shares the cores."""
    import asyncio
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    start, first = time.perf_counter(), None
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
    await writer.drain()
    data = bytearray()
    while b"data: [DONE]" not in data[-64:]:
        piece = await reader.read(65536)
        if not piece:
            break
        if first is None and FIRST_TEXT.search(piece):
            first = time.perf_counter() - start
        data += piece
    writer.close()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{bytes(data[:200])!r}")
    if b"data: [DONE]" not in data:
        raise RuntimeError("the stream ended without data: [DONE]")
    used = USAGE.findall(bytes(data))
    return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, \
        int(used[-1]) if used else 0


def load(url: str, clients: int, tokens: int) -> dict:
    """All clients at once from one asyncio loop (this runs in a process of its own, so the clients'
    parsing does not take the server's interpreter lock): per-client results, errors, wall seconds."""
    import asyncio
    host, port = url.split("//")[1].split(":")

    async def run():
        await _astream(host, int(port), "warm up", 4)
        start = time.perf_counter()
        out = await asyncio.gather(*[_astream(host, int(port), t, tokens) for t in prompts(clients)],
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


def serve_runs(args, llm, engine: str) -> dict:
    """The timed client runs against a server whose engine runs in a process of its own or in a thread
    (over `llm` itself): the best run's figures, every run's errors."""
    from moe_engine.config import EngineConfig
    from moe_engine.serve.app import create_app
    from moe_engine.serve.process import EngineProcess
    source = llm
    if engine == "process":
        source = EngineProcess(args.model, str(llm.device), llm.dtype, EngineConfig(max_num_seqs=args.clients),
                               4 * args.clients).start()
    server, thread, url = start_server(create_app(source, "bench", max_waiting=4 * args.clients))
    try:
        runs = [client_process(url, args.clients, args.tokens) for _ in range(args.repeats)]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    # The machine may be shared: the fastest run is kept, but any errors in any run count.
    best = min(runs, key=lambda r: r["seconds"])
    ttft = [r[0] for r in best["results"]] or [float("nan")]
    return {"served_tok_s": round(sum(r[2] for r in best["results"]) / best["seconds"], 1),
            "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p99_s": round(percentile(ttft, 99), 4),
            "served_seconds": round(best["seconds"], 3), "errors": [e for r in runs for e in r["errors"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench serve", description=__doc__)
    p.add_argument("--model", default=str(REPO / "weights" / "tiny-mixtral"))
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best is kept)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--engine", choices=["process", "thread", "both"], default="both",
                   help="the server's engine in a process of its own (serve's default), a thread, or both")
    p.add_argument("--load-of", default=None, help=argparse.SUPPRESS)     # the client process: the server's URL
    args = p.parse_args(argv)
    if args.load_of:
        print(json.dumps(load(args.load_of, args.clients, args.tokens)))
        return 0
    from moe_engine.llm import LLM
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

    report = {"clients": args.clients, "tokens": args.tokens, "device": str(llm.device),
              "generate_tok_s": round(direct_tps, 1), "generate_seconds": round(direct_s, 3)}
    errors = []
    for engine in ["process", "thread"] if args.engine == "both" else [args.engine]:
        served = serve_runs(args, llm, engine)
        errors += served["errors"]
        served["ratio"] = round(served["served_tok_s"] / direct_tps, 3)
        report[engine] = served
        print(f"{args.clients} streaming clients x {args.tokens} tokens on {llm.device}, engine in a {engine}: "
              f"{served['served_tok_s']:.1f} tok/s served vs {direct_tps:.1f} tok/s LLM.generate "
              f"({100 * served['ratio']:.0f}%); TTFT p50 {served['ttft_p50_s'] * 1000:.0f} ms, "
              f"p99 {served['ttft_p99_s'] * 1000:.0f} ms; {len(served['errors'])} errors")
    for e in errors[:5]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
