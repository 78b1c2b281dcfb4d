"""`moe-engine bench spec`: speculative decoding against plain decoding in the same run, on held-out code
(tests/data): "plain" (continue a piece of code) and "edit" (the prompt holds a piece of code and asks for
it rewritten), batch 1 and 8; per method acceptance, tokens per verify step, tok/s and the speed-up over
no speculation; greedy, so every method's tokens must equal plain decoding's. Prints a table, writes JSON.

Methods: none, ngram:K (the never-slower control on) and ngram:K/forced (speculating every step); with
--draft, draft:K and draft:K/forced (a draft model: a quantized copy of the model, or a folder); with
--self TOPK, self:K and self:K/forced (the model drafting for itself with its best TOPK experts);
--forward-cost SHAPE times what bounds self at a real shape instead (forward_costs). Runs of
each method are interleaved and the best of --repeats kept: on a shared machine timings are noisy.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_engine.device import DTYPES, pick_device
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


class ExpertCounter:
    """A routing hook that routes as usual and counts, per MoE layer, the distinct experts each decoding
    sequence's rows touch in a step: 1 row in a plain step (top_k experts), 1 + k in a verify step."""

    def __init__(self, most_rows: int):
        self.most_rows = most_rows
        self.by_rows: dict[int, list[int]] = {}      # rows of a sequence -> distinct experts per layer seen
        self.groups: list[torch.Tensor] = []

    def begin_step(self, owners: list[int], token_ids: list[int], positions: list[int]) -> None:
        starts = [i for i in range(len(owners)) if i == 0 or owners[i] != owners[i - 1]] + [len(owners)]
        spans = list(zip(starts, starts[1:]))
        # a step with a prefill chunk longer than a verify step is left out
        self.groups = [] if any(b - a > self.most_rows for a, b in spans) else spans

    def route(self, moe_index, router_logits, cfg, bias):
        from model_defs.moe import route
        topk_weights, topk_ids = route(router_logits, cfg, bias)            # [T, k] each
        for a, b in self.groups:
            self.by_rows.setdefault(b - a, []).append(int(topk_ids[a:b].unique().numel()))
        return topk_weights, topk_ids

    def summary(self) -> dict[int, float]:
        """rows per sequence -> mean distinct experts per MoE layer."""
        return {rows: sum(v) / len(v) for rows, v in sorted(self.by_rows.items())}


def distinct_experts(llm: LLM, config: SpeculativeConfig, prompts: list[list[int]], batch: int,
                     params: SamplingParams, proposers: dict | None = None) -> dict[int, float]:
    """An untimed run with the expert counter on."""
    counter = ExpertCounter(1 + config.num_speculative_tokens)
    llm.engine.routing_hook = counter
    try:
        run_method(llm, config, prompts, batch, params, proposers)
    finally:
        llm.engine.routing_hook = None
    return counter.summary()


def run_method(llm: LLM, config: SpeculativeConfig | None, prompts: list[list[int]], batch: int,
               params: SamplingParams, proposers: dict | None = None) -> dict:
    """Generate for prompts in groups of `batch` with this speculative config (a draft model's proposer
    from proposers, by its folder; method "self" drafts on the engine itself); time and counts."""
    proposers = proposers or {}
    engine = llm.engine
    proposer = None
    if config is not None and config.method == "self":
        from moe_engine.speculative.self_draft import SelfDraft
        proposer = SelfDraft(engine, config.draft_top_k, config.draft_layers)
    elif config is not None:
        proposer = proposers.get(config.model)
    engine.spec = Speculator(config, proposer) if config is not None else None
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
        if getattr(proposer, "forwards", 0):     # method self: the cost of one of its draft forwards
            row["draft_forward_ms"] = 1e3 * proposer.seconds / proposer.forwards
    return row


def measure(llm: LLM, model: str, batches: list[int], k: int, max_tokens: int, snippet_tokens: int,
            repeats: int, prompts_b1: int, draft=None, self_top_k: int | None = None) -> list[dict]:
    """draft: a draft model's folder, timed as draft:K (and draft:K/forced) beside n-gram; self_top_k: the
    model's own draft with that many experts per token, timed as self:K (and self:K/forced)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    methods = {"none": None,
               f"ngram:{k}": SpeculativeConfig(num_speculative_tokens=k),
               f"ngram:{k}/forced": SpeculativeConfig(num_speculative_tokens=k, adaptive=False)}
    proposers = {}
    if draft is not None:
        from moe_engine.speculative.draft import DraftModel
        proposers[str(draft)] = DraftModel(draft, llm.device, llm.dtype, llm.model.args.vocab_size,
                                           llm.max_model_len, max(batches), llm.tokenizer)
        methods[f"draft:{k}"] = SpeculativeConfig("draft", k, model=str(draft))
        methods[f"draft:{k}/forced"] = SpeculativeConfig("draft", k, adaptive=False, model=str(draft))
    if self_top_k is not None:
        methods[f"self:{k}"] = SpeculativeConfig("self", k, draft_top_k=self_top_k)
        methods[f"self:{k}/forced"] = SpeculativeConfig("self", k, adaptive=False, draft_top_k=self_top_k)
    rows = []
    for batch in batches:
        count = prompts_b1 if batch == 1 else batch
        for workload, prompts in workloads(llm, model, count, snippet_tokens).items():
            best: dict[str, dict] = {}
            for _ in range(repeats):           # interleaved: a burst of load on the machine hits every method
                for name, config in methods.items():
                    row = run_method(llm, config, prompts, batch, params, proposers)
                    if name not in best or row["seconds"] < best[name]["seconds"]:
                        best[name] = row
            base = best["none"]
            experts = distinct_experts(llm, methods[f"ngram:{k}/forced"], prompts, batch, params, proposers)
            print(f"{model:14s} {workload:5s} batch {batch}  distinct experts per MoE layer by rows per sequence: "
                  + ", ".join(f"{r}: {e:.2f}" for r, e in experts.items()), flush=True)
            for name, row in best.items():
                out = {"model": model, "workload": workload, "batch": batch, "method": name,
                       "prompts": len(prompts), "tok_s": row["tokens"] / row["seconds"],
                       "speedup": base["seconds"] / row["seconds"],
                       "same_tokens_as_none": row["token_ids"] == base["token_ids"],
                       "distinct_experts_by_rows": experts,
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


def forward_costs(shape: str, device, dtype, context: int = 64, repeats: int = 4) -> dict:
    """What bounds method self at a real shape (random weights): one batch-1 forward's time routed to the
    model's top_k, to fewer experts (a self draft's forward), and over 2 and 4 rows (verify steps of k = 1
    and 3), best of `repeats` interleaved, with the distinct experts per MoE layer those rows touch."""
    from kernels.attention import AttentionMetadata
    from moe_engine.bench.models import build_random
    from moe_engine.speculative.self_draft import CheapRouting
    model = build_random(shape, device, dtype)
    top_k = model.moe_blocks[0].routing.top_k
    llm = LLM.from_model(model, None, max_model_len=context + 16, max_num_seqs=1)
    seq = llm._new_sequence(list(range(100, 100 + context)), SamplingParams(max_tokens=8, ignore_eos=True))
    engine = llm.engine
    engine.step()                                           # the prompt is cached
    engine.blocks.grow(seq, 5)
    runner = engine.runner

    def forward(rows: int, hook) -> float:
        c = seq.num_cached
        meta = AttentionMetadata.build([seq.blocks], [c + rows], [rows], engine.block_size, device, c + 16)
        start = time.perf_counter()
        hidden = runner.forward([7 + j for j in range(rows)], list(range(c, c + rows)), [0] * rows, meta,
                                runner.kv_caches, hook)
        with torch.inference_mode():
            model.compute_logits(hidden).argmax(-1).tolist()
        return time.perf_counter() - start

    cases = {f"1 row top-{top_k} (plain step)": (1, None)}
    cases.update({f"1 row top-{k} (self draft)": (1, CheapRouting(k)) for k in (1, 2, top_k // 2) if k < top_k})
    cases.update({f"{r} rows top-{top_k} (verify k={r - 1})": (r, None) for r in (2, 4)})
    best = {name: float("inf") for name in cases}
    for round_ in range(repeats + 1):                                 # interleaved; round 0 warms up
        for name, (rows, hook) in cases.items():
            t = forward(rows, hook)
            best[name] = min(best[name], t) if round_ else best[name]
    distinct = {}
    for rows in (1, 2, 4):
        counter = ExpertCounter(4)
        forward(rows, counter)
        distinct[rows] = counter.summary()[rows]
    plain = best[f"1 row top-{top_k} (plain step)"]
    for name, t in best.items():
        print(f"{shape} {name:28s} {1e3 * t:8.1f} ms  {t / plain:4.2f}x a plain step", flush=True)
    print(f"{shape} distinct experts per MoE layer by rows: "
          + ", ".join(f"{r}: {e:.1f}" for r, e in distinct.items()), flush=True)
    return {"shape": shape, "dtype": str(dtype), "ms": {n: 1e3 * t for n, t in best.items()},
            "distinct_experts_by_rows": distinct}


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
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="float32 (default): a verify step's rows then give plain decoding's greedy tokens exactly; "
                        "in bf16 the few-row and one-row products round differently and tokens can part")
    p.add_argument("--draft", default=None,
                   help="also time a draft model: int4 or int8 (a copy of each model quantized so, written "
                        "to a temporary folder by moe-engine quantize) or a folder (one --models entry)")
    p.add_argument("--self", dest="self_top_k", type=int, default=None, metavar="TOPK",
                   help="also time method self: the model drafting for itself with its best TOPK experts per token")
    p.add_argument("--forward-cost", default=None, metavar="SHAPE",
                   help="instead: time what bounds method self at a real shape (random weights, e.g. mixtral-3.6b "
                        "with --dtype bfloat16): a batch-1 forward with the model's top_k, with fewer experts, "
                        "and over the 2 and 4 rows of a verify step")
    p.add_argument("--out", default=str(REPO / "bench_results" / "spec.json"))
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.forward_cost:
        row = forward_costs(a.forward_cost, device, DTYPES[a.dtype], repeats=max(a.repeats, 4))
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                   "note": "timings on a shared machine: noisy", **row}, indent=2))
        print(f"wrote {a.out}")
        return 0
    if a.compile:
        check_compile(device)
    rows = []
    for model in a.models.split(","):
        llm = LLM(REPO / "weights" / model, device=device, dtype=DTYPES[a.dtype], compile=a.compile)
        run_method(llm, None, workloads(llm, model, 1, a.snippet_tokens)["plain"], 1,
                   SamplingParams(max_tokens=8, ignore_eos=True))                     # warm-up
        with tempfile.TemporaryDirectory(prefix="moe-engine-draft-") as tmp:
            draft = _draft_for(model, a.draft, Path(tmp))
            rows += measure(llm, model, [int(b) for b in a.batches.split(",")], a.k, a.max_tokens,
                            a.snippet_tokens, a.repeats, a.prompts_b1, draft, a.self_top_k)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "compile": a.compile,
                                   "note": "timings on a shared machine: noisy", "rows": rows}, indent=2))
    print(f"wrote {a.out}")
    return 0


def _draft_for(model: str, draft: str | None, tmp: Path):
    """The draft model's folder for this model: None, a quantized copy made now, or the folder given."""
    if draft in ("int4", "int8"):
        from moe_engine.cli import main as cli
        out = tmp / f"{model}-{draft}"
        if cli(["quantize", "--model", str(REPO / "weights" / model), "--out", str(out),
                "--quantization", draft, "--quiet"]) != 0:
            raise SystemExit(f"could not write the {draft} draft of {model}")
        return out
    return draft


if __name__ == "__main__":
    raise SystemExit(main())
