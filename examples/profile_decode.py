"""Where a batch-1 decode step's GPU time goes: kernels by total time, from torch.profiler over eager
decode steps of a random-weight model with a real shape, beside the graph-replayed step's wall time.

    python examples/profile_decode.py deepseek-v2-lite [TUNING_FILE ...]

With TUNING_FILEs (as MOE_ENGINE_TUNING takes), the graph step is also timed with the kernels chosen
under each, all taking turns with the plain one: an A/B(/C...) of tunings on the same weights in one
process.
"""

import contextlib
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moe_engine.bench.models import build_random
from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams


def decode_steps(llm: LLM, steps: int, around=contextlib.nullcontext) -> float:
    """Seconds per decode step of one 512-token request, after its prefill; `around` wraps the steps only."""
    seq = llm._new_sequence(list(range(3, 515)), SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    while not seq.output_ids:
        llm.engine.step()
    torch.cuda.synchronize()
    with around():
        start = time.perf_counter()
        for _ in range(steps):
            llm.engine.step()
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / steps
    while llm.engine.has_work():
        llm.engine.step()
    return elapsed


@contextlib.contextmanager
def tuning_file(path: str | None):
    """MOE_ENGINE_TUNING=path inside (nothing changes for None); kernels choose their tiles when a graph
    is captured, so a graph captured inside keeps them."""
    before = os.environ.get("MOE_ENGINE_TUNING")
    if path:
        os.environ["MOE_ENGINE_TUNING"] = path
    try:
        yield
    finally:
        if path and before is None:
            del os.environ["MOE_ENGINE_TUNING"]
        elif path:
            os.environ["MOE_ENGINE_TUNING"] = before


def main(name: str = "deepseek-v2-lite", *other_tunings: str, steps: int = 20) -> None:
    model = build_random(name, "cuda", torch.bfloat16)
    kw = dict(max_num_seqs=1, max_model_len=600, num_kv_blocks=40, enable_prefix_caching=False)
    graphed, eager = LLM.from_model(model, cuda_graphs=True, **kw), LLM.from_model(model, cuda_graphs=False, **kw)
    decode_steps(graphed, 4)
    decode_steps(eager, 4)
    print(f"{name}: graph step {decode_steps(graphed, steps) * 1e3:.2f} ms, "
          f"eager step {decode_steps(eager, steps) * 1e3:.2f} ms")
    if other_tunings:
        llms = {"as set": graphed}
        for path in other_tunings:
            llms[path] = LLM.from_model(model, cuda_graphs=True, **kw)
            with tuning_file(path):
                decode_steps(llms[path], 4)          # captures its graph under that tuning
        times = {label: [] for label in llms}
        for _ in range(5):
            for label, llm in llms.items():
                times[label].append(decode_steps(llm, steps))
        print(f"{name}: graph step, best of 5 taking turns: "
              + ", ".join(f"{min(t) * 1e3:.3f} ms {'as set' if label == 'as set' else 'under ' + label}"
                          for label, t in times.items()))
        del llms
    prof = profile(activities=[ProfilerActivity.CUDA])
    decode_steps(eager, steps, lambda: prof)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"eager: {launches / steps:.0f} kernels and {total / steps / 1e3:.2f} ms of kernel time per step")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        print(f"  {e.device_time_total / steps:8.1f} us/step  {e.count / steps:6.1f}x  {e.key[:90]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
