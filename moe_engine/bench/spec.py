"""`moe-engine bench spec`: speculative decoding against plain decoding in the same run, on held-out code
(tests/data): "plain" (continue a piece of code) and "edit" (the prompt holds a piece of code and asks for
it rewritten), batch 1 and 8; per method acceptance, tokens per verify step, tok/s and the speed-up over
no speculation; greedy, so every method's tokens must equal plain decoding's. Prints a table, writes JSON.

Methods: none, ngram:K (the never-slower control on) and ngram:K/forced (speculating every step). Runs of
each method are interleaved and the best of --repeats kept: on a shared machine timings are noisy.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from moe_engine.device import pick_device
from moe_engine.llm import LLM, check_compile
from moe_engine.sampling import SamplingParams
from moe_engine.speculative import SpeculativeConfig, Speculator

REPO = Path(__file__).resolve().parent.parent.parent
EDIT_ASK = "\n\n# The code above, rewritten:\n"


def workloads(llm: LLM, model: str, count: int, snippet_tokens: int) -> dict[str, list[list[int]]]:
    """count prompts per workload from the model's held-out tokens (windows far apart)."""
    stream = np.load(REPO / "tests" / "data" / f"{model}_val_tokens.npy").astype(np.int64)
    starts = np.linspace(0, len(stream) - snippet_tokens - 1, count).astype(int)
    snippets = [stream[s:s + snippet_tokens].tolist() for s in starts]
    ask = llm.tokenizer.encode(EDIT_ASK) if llm.tokenizer is not None else []
    return {"plain": snippets, "edit": [s + ask for s in snippets]}


def run_method(llm: LLM, config: SpeculativeConfig | None, prompts: list[list[int]], batch: int,
               params: SamplingParams) -> dict:
    """Generate for prompts in groups of `batch` with this speculative config; time and counts."""
    engine = llm.engine
    engine.spec = Speculator(config) if config is not None else None
    outs, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompt_token_ids=prompts[i:i + batch], sampling_params=params)
    seconds = time.perf_counter() - start
    spec = engine.spec
    engine.spec = None
    row = {"seconds": seconds, "tokens": sum(len(o.token_ids) for o in outs), "token_ids": [o.token_ids for o in outs],
           "draft_tokens": sum(o.num_draft_tokens for o in outs),
           "accepted_tokens": sum(o.num_accepted_tokens for o in outs)}
    if spec is not None:
        row.update(verify_steps=spec.verify_steps,
                   tokens_per_verify=spec.verified_tokens / spec.verified if spec.verified else None,
                   plain_step_ms={b: 1e3 * t for b, t in spec.costs.plain.items()},
                   verify_step_ms={f"{b},{k}": 1e3 * t for (b, k), t in spec.costs.verify.items()})
    return row


def measure(llm: LLM, model: str, batches: list[int], k: int, max_tokens: int, snippet_tokens: int,
            repeats: int, prompts_b1: int) -> list[dict]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    methods = {"none": None,
               f"ngram:{k}": SpeculativeConfig(num_speculative_tokens=k),
               f"ngram:{k}/forced": SpeculativeConfig(num_speculative_tokens=k, adaptive=False)}
    rows = []
    for batch in batches:
        count = prompts_b1 if batch == 1 else batch
        for workload, prompts in workloads(llm, model, count, snippet_tokens).items():
            best: dict[str, dict] = {}
            for _ in range(repeats):           # interleaved: a burst of load on the machine hits every method
                for name, config in methods.items():
                    row = run_method(llm, config, prompts, batch, params)
                    if name not in best or row["seconds"] < best[name]["seconds"]:
                        best[name] = row
            base = best["none"]
            for name, row in best.items():
                out = {"model": model, "workload": workload, "batch": batch, "method": name,
                       "prompts": len(prompts), "tok_s": row["tokens"] / row["seconds"],
                       "speedup": base["seconds"] / row["seconds"],
                       "same_tokens_as_none": row["token_ids"] == base["token_ids"],
                       **{key: v for key, v in row.items() if key != "token_ids"}}
                if row["draft_tokens"]:
                    out["acceptance"] = row["accepted_tokens"] / row["draft_tokens"]
                rows.append(out)
                acc = f"  acceptance {out['acceptance']:4.0%}" if "acceptance" in out else ""
                tpv = (f"  {out['tokens_per_verify']:.2f} tokens/verify ({out['verify_steps']} verify steps)"
                       if out.get("tokens_per_verify") else "")
                print(f"{model:14s} {workload:5s} batch {batch}  {name:16s} {out['tok_s']:7.1f} tok/s  "
                      f"{out['speedup']:4.2f}x{acc}{tpv}{'' if out['same_tokens_as_none'] else '  TOKENS DIFFER'}",
                      flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench spec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default="tiny-mixtral,tiny-deepseek", help="comma list of weights/ folders")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("-k", type=int, default=4, help="drafts per step (num_speculative_tokens)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--snippet-tokens", type=int, default=128, help="code tokens in each prompt")
    p.add_argument("--prompts-b1", type=int, default=4, help="prompts run one by one at batch 1")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed runs (best is kept)")
    p.add_argument("--compile", action="store_true", help="plain decode steps through torch.compile (CPU); "
                                                          "verify steps run eagerly")
    p.add_argument("--out", default=str(REPO / "bench_results" / "spec.json"))
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.compile:
        check_compile(device)
    rows = []
    for model in a.models.split(","):
        llm = LLM(REPO / "weights" / model, device=device, compile=a.compile)
        run_method(llm, None, workloads(llm, model, 1, a.snippet_tokens)["plain"], 1,
                   SamplingParams(max_tokens=8, ignore_eos=True))                     # warm-up
        rows += measure(llm, model, [int(b) for b in a.batches.split(",")], a.k, a.max_tokens,
                        a.snippet_tokens, a.repeats, a.prompts_b1)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "compile": a.compile,
                                   "note": "timings on a shared machine: noisy", "rows": rows}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
