"""A/B in one process: the compiled CPU decode step through torch.compile's guards against the direct call
of its graph (moe_engine/compiled_step.py), at a real shape (default mixtral-3.6b, random bf16 weights).

Decode tok/s = new tokens / (time of a generate with 1 + N new tokens - time of one with 1), batch 1,
variants taking turns. Usage: python examples/ab_compiled_direct.py [--shape NAME] [--rounds 3] [--out F]
"""

import argparse
import json
import time

import torch

from moe_engine.bench.models import build_random
from moe_engine.compiled_step import CompiledStep
from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams


def timed(llm, prompt, n):
    start = time.perf_counter()
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=n, ignore_eos=True))
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mixtral-3.6b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_random(a.shape, "cpu", torch.bfloat16)
    llm = LLM.from_model(model, compile=True, max_num_seqs=2, max_model_len=256, num_kv_blocks=64)
    prompt = torch.randint(0, model.args.vocab_size, (32,)).tolist()
    record = CompiledStep._record
    results = {"direct": [], "guarded": []}
    for _ in range(a.rounds):
        for variant in ("direct", "guarded"):
            step = llm.engine.graphs.compiled
            step.direct.clear()
            CompiledStep._record = record if variant == "direct" else (lambda *args: None)
            timed(llm, prompt, 2)                                  # records (or not) the direct call
            t1 = timed(llm, prompt, 1)
            tn = timed(llm, prompt, 1 + a.new_tokens)
            results[variant].append(a.new_tokens / (tn - t1))
            print(variant, f"{results[variant][-1]:.2f} tok/s", flush=True)
    CompiledStep._record = record
    best = {k: max(v) for k, v in results.items()}
    summary = {"shape": a.shape, "dtype": "bfloat16", "batch": 1, "new_tokens": a.new_tokens,
               "decode_tok_s": results, "best": best, "direct_over_guarded": best["direct"] / best["guarded"],
               "machine": "2-core AMD EPYC VM (AVX512-BF16), torch " + torch.__version__}
    print(json.dumps(summary, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
