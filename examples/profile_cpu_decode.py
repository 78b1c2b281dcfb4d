"""Where a compiled CPU decode step's time goes: per-step wall time of the compiled call, then the step's
kernels and extern calls by self time (torch.profiler, Inductor's kernel names), on a shipped model.

    python examples/profile_cpu_decode.py tiny-mixtral 8

The machine's speed drifts; compare two variants by running them in one process, taking turns, and
reading medians, not one run each.
"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams


def decode(llm: LLM, prompts: list[list[int]], new_tokens: int, around=None) -> list[float]:
    """Runs the prompts to the end; seconds of each compiled decode call after the prefill step."""
    graphs, times = llm.engine.runner.static, []
    forward = graphs.replay

    def timed(bs, rows):
        start = time.perf_counter()
        out = forward(bs, rows)
        times.append(time.perf_counter() - start)
        return out

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seqs = [llm._new_sequence(p, params) for p in prompts]
    while not all(s.output_ids for s in seqs):
        llm.engine.step()
    graphs.replay = timed
    try:
        if around is None:
            while llm.engine.has_work():
                llm.engine.step()
        else:
            with around:
                while llm.engine.has_work():
                    llm.engine.step()
    finally:
        del graphs.replay          # back to the class's method
    return times


def main(name: str = "tiny-mixtral", batch: str = "8", new_tokens: int = 48) -> None:
    torch._inductor.config.cpp.enable_kernel_profile = True     # generated kernels appear by name
    batch = int(batch)
    llm = LLM(f"weights/{name}", dtype=torch.float32, max_num_seqs=batch, max_model_len=128,
              compile=True, enable_prefix_caching=False)
    prompts = torch.randint(3, llm.model.args.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
    prompts = prompts.tolist()
    decode(llm, prompts, new_tokens)                              # compiles the batch's bucket
    times = sorted(t for _ in range(4) for t in decode(llm, prompts, new_tokens))
    print(f"{name}, batch {batch}: compiled decode call min {times[0] * 1e3:.2f} ms, "
          f"median {statistics.median(times) * 1e3:.2f} ms over {len(times)} steps")
    prof = profile(activities=[ProfilerActivity.CPU])
    steps = len(decode(llm, prompts, new_tokens, prof))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for e in events[:25]:
        print(f"  {e.self_cpu_time_total / steps:8.1f} us/step  {e.count / steps:5.1f}x  {e.key[:90]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
