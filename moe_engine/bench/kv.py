"""`moe-engine bench kv`: what a compressed KV cache (kv_cache_dtype fp8 / int8 / int4) costs in quality and gains in
capacity: held-out perplexity through the paged cache, greedy agreement, and blocks at a fixed budget.
Prints tables and writes JSON."""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent.parent
CACHE_DTYPES = ("auto", "fp8", "int8", "int4")


def shape_model(kind: str, dtype=torch.bfloat16):
    """One-layer random models with the benchmark attention shapes (only their per-token cache bytes matter):
    gqa: 32 query heads, 8 KV heads of 128; mla: latent 512 + rope key 64 (DeepSeek-V2/V3)."""
    if kind == "gqa":
        from model_defs.mixtral import MixtralArgs, MixtralModel
        args = MixtralArgs(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=2,
                           num_experts_per_tok=1, max_position_embeddings=256)
        return MixtralModel(args, dtype)
    from model_defs.deepseek import DeepseekArgs, DeepseekModel
    args = DeepseekArgs(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=64,
                        v_head_dim=16, model_type="deepseek_v3", max_position_embeddings=256)
    model = DeepseekModel(args, dtype)
    model.post_load()
    return model


def cache_info(model, kv_cache_dtype: str, budget: int) -> dict:
    """LLM.cache_info() of an engine around model with this cache dtype and byte budget."""
    return LLM.from_model(model, kv_cache_dtype=kv_cache_dtype, kv_cache_bytes=budget, max_num_seqs=1 << 16).cache_info()


def capacity_rows(budget: int) -> list[dict]:
    """Blocks at one budget per cache dtype, against bf16 on the benchmark shapes and float32 on the shipped models."""
    rows = []
    cases = [(f"{k} (bf16)", shape_model(k)) for k in ("gqa", "mla")]
    cases += [(f"{n} (float32)", LLM(REPO / "weights" / n, kv_cache_bytes=budget).model)
              for n in ("tiny-mixtral", "tiny-deepseek")]
    for label, model in cases:
        infos = {d: cache_info(model, d, budget) for d in CACHE_DTYPES}
        for d, info in infos.items():
            rows.append({"model": label, **info, "ratio": info["num_blocks"] / infos["auto"]["num_blocks"]})
    return rows


def quality(name: str, windows: int | None, prompts: int, new_tokens: int) -> dict:
    """Per cache dtype: perplexity over the held-out stream in 256-token windows (LLM.perplexity: each window
    prefilled into a fresh paged cache of that dtype, so its attention reads the compressed cache), and how
    many of `prompts` greedy continuations of new_tokens equal the full-precision ones."""
    stream = np.load(REPO / f"tests/data/{name}_val_tokens.npy").astype(np.int64)
    ids = stream if windows is None else stream[:windows * 255 + 1]
    starts = np.random.default_rng(7).integers(0, len(stream) - 64, prompts)
    greedy_prompts = [stream[s:s + 24].tolist() for s in starts]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    out, texts = {}, {}
    for d in CACHE_DTYPES:
        llm = LLM(REPO / "weights" / name, kv_cache_dtype=d, kv_cache_bytes=1 << 24)
        texts[d] = [o.token_ids for o in llm.generate(prompt_token_ids=greedy_prompts, sampling_params=params)]
        out[d] = {"perplexity": llm.perplexity(ids.tolist(), window=256),
                  "greedy_identical": sum(a == b for a, b in zip(texts[d], texts["auto"])),
                  "bytes_per_token": llm.cache_info()["bytes_per_token"]}
        out[d]["perplexity_change"] = out[d]["perplexity"] / out["auto"]["perplexity"] - 1
    return {"tokens": len(ids), "prompts": prompts, "new_tokens": new_tokens, "by_dtype": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench kv", description=__doc__)
    p.add_argument("--models", default="tiny-mixtral,tiny-deepseek", help="comma list of weights/ folders")
    p.add_argument("--windows", type=int, default=None, help="256-token windows per stream (default: all of it)")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts for greedy agreement")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=64 << 20, help="kv_cache_bytes for the capacity table")
    p.add_argument("--out", default=str(REPO / "bench_results" / "kv.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"capacity": capacity_rows(args.budget), "quality": {}}
    print(f"{'model':<24} {'cache':<6} {'bytes/token':>11} {'blocks':>7} {'ratio':>6}")
    for r in result["capacity"]:
        print(f"{r['model']:<24} {r['kv_cache_dtype']:<6} {r['bytes_per_token']:>11} {r['num_blocks']:>7} {r['ratio']:>6.3f}")
    print(f"\n{'model':<14} {'cache':<6} {'perplexity':>10} {'change':>8} {'greedy same':>12}")
    for name in args.models.split(","):
        q = result["quality"][name] = quality(name, args.windows, args.prompts, args.new_tokens)
        for d, r in q["by_dtype"].items():
            print(f"{name:<14} {d:<6} {r['perplexity']:>10.4f} {100 * r['perplexity_change']:>+7.3f}% "
                  f"{r['greedy_identical']:>6}/{q['prompts']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
