"""Tracing overhead: P prompts x N tokens generated with and without a trace (`python -m moe_engine.bench.routing`)."""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent.parent
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n", "for i in range(10):", "# parse the file\n",
           "def main(argv):\n    ", "with open(path) as f:", "try:\n    import numpy", "x = [i * i for i in",
           "async def fetch(url):", "if __name__ == '__main__':", "return sorted(items, key="]


def timed(llm: LLM, prompts: list[str], params: SamplingParams, mode: str) -> tuple[float, float]:
    """(generation seconds, seconds to read the trace back as numpy) for one run."""
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if mode == "off":
        llm.generate(prompts, params)
        sync()
        return time.perf_counter() - start, 0.0
    with llm.trace_routing(scores=mode == "trace+scores") as trace:
        llm.generate(prompts, params)
    sync()
    generated = time.perf_counter() - start
    trace.arrays()
    return generated, time.perf_counter() - start - generated


def recording_cost(llm: LLM, batch: int, calls: int = 20000) -> float:
    """Seconds one MoE layer call spends in Trace.record (plus its share of begin_step), measured alone:
    the wall-time comparison above is only as good as the machine is quiet."""
    from moe_engine.routing.trace import Trace
    blocks = llm.model.moe_blocks
    cfg = blocks[0].routing
    logits = torch.randn(batch, cfg.num_experts, device=llm.device)                   # [T, E]
    weights, ids = torch.rand(batch, cfg.top_k, device=llm.device), torch.zeros(batch, cfg.top_k, dtype=torch.long,
                                                                                   device=llm.device)
    trace, owners, positions = Trace(), list(range(batch)), list(range(batch))
    start = time.perf_counter()
    for i in range(calls):
        if i % len(blocks) == 0:
            trace.begin_step(owners, owners, positions)
        trace.record(i % len(blocks), logits, cfg, weights, ids)
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_engine.bench.routing", description=__doc__)
    p.add_argument("--model", default=str(REPO / "weights" / "tiny-mixtral"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own); 1 is steadier on a busy machine")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args(argv)
    if a.out:
        from moe_engine.cli import check_output_path
        check_output_path(a.out, folder=False)
    if a.threads:
        torch.set_num_threads(a.threads)
    # No prefix cache: a repeat would otherwise skip the prefill that an earlier repeat cached (a trace
    # switches the cache off while active, so the untraced runs would get an unfair advantage).
    llm = LLM(a.model, a.device, enable_prefix_caching=False)
    prompts = (PROMPTS * (a.prompts // len(PROMPTS) + 1))[:a.prompts]
    params = SamplingParams(max_tokens=a.tokens, ignore_eos=True)
    modes = ["off", "trace", "trace+scores"]
    timed(llm, prompts, params, "off")                                     # warm-up
    times = {m: [] for m in modes}
    reads = {m: [] for m in modes}
    for r in range(a.repeats):
        for m in modes[r % 3:] + modes[:r % 3]:                            # rotate the order: no mode always first
            gen, read = timed(llm, prompts, params, m)
            times[m].append(gen)
            reads[m].append(read)
    base = statistics.median(times["off"])
    print(f"{a.prompts} prompts x {a.tokens} tokens on {llm.device} ({os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads), {a.model}, median of {a.repeats}")
    print(f"{'mode':<14}{'median s':>10}{'min s':>9}{'max s':>9}{'vs off':>9}{'read s':>9}")
    result = {"prompts": a.prompts, "tokens": a.tokens, "repeats": a.repeats, "device": str(llm.device), "modes": {}}
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:<14}{med:>10.3f}{min(times[m]):>9.3f}{max(times[m]):>9.3f}{med / base - 1:>+9.1%}"
              f"{statistics.median(reads[m]):>9.3f}")
        result["modes"][m] = {"seconds": times[m], "read_seconds": reads[m], "median": med, "vs_off": med / base - 1}
    per_call = recording_cost(llm, a.prompts)
    calls = a.tokens * len(llm.model.moe_blocks)           # one step per generated token (the first: prefill)
    result["record_seconds_per_layer_call"] = per_call
    print(f"recording alone: {per_call * 1e6:.2f} us per MoE layer call; x {calls} calls per run = "
          f"{per_call * calls * 1e3:.2f} ms = {per_call * calls / base:.3%} of the untraced run")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
