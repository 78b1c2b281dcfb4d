"""`moe-engine bench decode`: decode and prefill speed, ours vs transformers on the same weights, and vs
the memory-bandwidth limit (active weight bytes per token / measured copy bandwidth). Prints a table
and writes JSON."""

import argparse
import inspect
import json
import time
from pathlib import Path

import torch

from moe_engine.bench.llamacpp import llamacpp_rows
from moe_engine.bench.models import SHAPES, build_random, hf_twin, weight_bytes
from moe_engine.device import DTYPES, default_dtype, pick_device
from moe_engine.cli.info import parameter_bytes
from moe_engine.errors import MoeEngineError
from moe_engine.llm import LLM, check_compile, stored_dtype
from moe_engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent.parent


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes moved per second by a large copy, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):      # the fastest copy: the highest rate, so the strictest limit
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, begin.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def active_weight_bytes(model) -> int:
    """Weight bytes one token's decode must read, each tensor at the dtype it is held in: all but idle
    experts, and one embedding row."""
    _, active = parameter_bytes(model)
    if not model.args.tie_word_embeddings:
        active -= model.embed.numel() * model.embed.element_size()
    return active


def ours_rates(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s over the batch): the engine steps until every request has its first
    token (prefill), then the remaining steps are timed as decode."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seqs = [llm._new_sequence(p, params) for p in prompts]
    engine, device = llm.engine, llm.device
    sync(device)
    t0 = time.perf_counter()
    while not all(s.output_ids for s in seqs):
        engine.step()
    sync(device)
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync(device)
    t2 = time.perf_counter()
    return sum(map(len, prompts)) / (t1 - t0), len(prompts) * (new_tokens - 1) / (t2 - t1)


def hf_rates(hf, prompts: list[list[int]], new_tokens: int, device) -> tuple[float, float]:
    """The same for transformers: one cached prefill forward, then greedy decode steps with its cache."""
    x = torch.tensor(prompts, device=device)
    params = inspect.signature(hf.forward).parameters
    # transformers renamed past_key_values to cache (5.2x); an unknown name would be ignored silently
    cache_arg = "cache" if "cache" in params else "past_key_values"
    # Logits for the last position only, as ours computes them (when this transformers can say so).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = hf(x, use_cache=True, **keep)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t1 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(new_tokens - 1):
            out = hf(token, use_cache=True, **{cache_arg: cache})
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t2 = time.perf_counter()
    return x.numel() / (t1 - t0), len(prompts) * (new_tokens - 1) / (t2 - t1)


def batched_vs_sequential(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Wall time of the prompts one after another / all of them in one generate call (prefill included)."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def run(groups):
        sync(llm.device)
        t = time.perf_counter()
        for group in groups:
            llm.generate(prompt_token_ids=group, sampling_params=params)
        sync(llm.device)
        return time.perf_counter() - t

    run([prompts])
    sequential = min(run([[p] for p in prompts]) for _ in range(2))
    batched = min(run([prompts]) for _ in range(2))
    return sequential / batched


def best_of(run, repeats: int = 3) -> tuple[float, float]:
    """Best prefill and best decode rate over a few runs, after one warm-up."""
    return best_of_alternating([run], repeats)[0]


def best_of_alternating(runs: list, repeats: int = 3) -> list[tuple[float, float]]:
    """best_of for several runs taking turns (a, b, a, b, ...): on a machine whose speed drifts over
    minutes (a shared VM), each then sees the same conditions, and their ratio is fair."""
    for run in runs:
        run()
    results = [[run() for run in runs] for _ in range(repeats)]
    return [(max(r[i][0] for r in results), max(r[i][1] for r in results)) for i in range(len(runs))]


def engine_for(model, batch: int, prompt_len: int, new_tokens: int, cuda_graphs: bool | None,
               compile: bool = False) -> LLM:
    """An engine sized for the batch: a cache just big enough, leaving GPU memory to transformers' cache."""
    per_seq = -(-(prompt_len + new_tokens + 16) // 16)
    return LLM.from_model(model, max_num_seqs=max(batch, 1), max_model_len=prompt_len + new_tokens + 16,
                          max_num_batched_tokens=max(2048, batch * prompt_len), enable_prefix_caching=False,
                          block_size=16, num_kv_blocks=batch * per_seq + 1, cuda_graphs=cuda_graphs,
                          compile=compile)


def measure(name, model, hf, device, batches, prompt_len, new_tokens, vocab, repeats: int = 3,
            compare_eager: bool = False, sequential: bool = True, cuda_graphs: bool | None = None,
            hf_repeats: int | None = None, compile: bool = False) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()
        start = time.perf_counter()
        llm = engine_for(model, batch, prompt_len, new_tokens, cuda_graphs, compile)
        ours = lambda: ours_rates(llm, prompts, new_tokens)      # noqa: E731
        startup_s = None
        if compile:        # building the engine (bucket 1 compiles) and a first, untimed run (the batch's bucket)
            ours()
            startup_s = time.perf_counter() - start
        theirs = lambda: hf_rates(hf, prompts, new_tokens, device)   # noqa: E731
        # On the CPU ours and transformers take turns; on a GPU ours runs first and gives its cache back.
        alternate = hf is not None and device.type == "cpu" and not hf_repeats
        if alternate:
            (prefill, decode), (hf_prefill, hf_decode) = best_of_alternating([ours, theirs], repeats)
        else:
            prefill, decode = best_of(ours, repeats)
        row = {"model": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "ours_decode_tok_s": decode, "ours_prefill_tok_s": prefill,
               "cuda_graphs": type(getattr(llm.engine.runner, "static", None)).__name__ == "CudaGraphStep",
               "compiled": compile, "startup_s": startup_s}
        if batch > 1 and sequential:
            row["ours_batched_vs_sequential"] = batched_vs_sequential(llm, prompts, new_tokens)
        del llm
        if compare_eager and (device.type == "cuda" or compile):
            eager = engine_for(model, batch, prompt_len, new_tokens, False)
            runs = 1 if device.type == "cuda" else repeats
            row["ours_eager_decode_tok_s"] = best_of(lambda: ours_rates(eager, prompts, new_tokens), runs)[1]
            del eager
        if hf is not None:
            if not alternate:
                hf_prefill, hf_decode = best_of(theirs, hf_repeats or repeats)
            row.update(hf_decode_tok_s=hf_decode, hf_prefill_tok_s=hf_prefill, ratio_vs_hf=decode / hf_decode)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moe-engine bench decode", description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default=None,
                   help="comma list: weights/ folders (CPU default: tiny-mixtral,tiny-deepseek) or random "
                        f"shapes ({', '.join(SHAPES)}; GPU default: mixtral-8x7b,deepseek-v2-lite)")
    p.add_argument("--shape", default=None, help="same as --models, for random real shapes")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (CPU 1,8; GPU 1,16,64)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="activations and unquantized weights (default: the engine's for the device)")
    p.add_argument("--quantization", default="none",
                   help="comma list of how the experts are held, each timed beside the others: none, int8, "
                        "int4 (g128), fp8; quantized rows run eagerly and skip transformers")
    p.add_argument("--quantize-attention", action="store_true", help="quantized rows hold attention quantized too")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantized rows hold the LM head quantized too")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--llamacpp", default=None,
                   help="GGUF types to time llama.cpp in, batch 1, on the same weights: comma list of bf16, "
                        "q8_0, q4_0, f32, or 'none' (default on the CPU where llama-cpp-python and gguf import: "
                        "bf16,q8_0,q4_0, for Mixtral-family models)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    p.add_argument("--hf-repeats", type=int, default=None, help="timed transformers runs (default: --repeats)")
    p.add_argument("--compare-eager", action="store_true",
                   help="also time our decode without CUDA graphs (CUDA) or without --compile (CPU)")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="time our decode with compiled steps (LLM(compile=True); CPU only); the first run, "
                        "which compiles, is reported apart (default: on the CPU, with the eager speed beside it)")
    p.add_argument("--sequential", default=None, action=argparse.BooleanOptionalAction,
                   help="also time the batch's prompts one after another (default: on the CPU only)")
    p.add_argument("--out", default=str(REPO / "bench_results" / "decode.json"))
    a = p.parse_args(argv)
    from moe_engine.cli import check_output_path
    check_output_path(a.out, folder=False)          # before minutes of timing, not after
    device = pick_device(a.device)
    gpu = device.type == "cuda"
    quants = [q.strip() for q in a.quantization.split(",")]
    specs = {q: None if q == "none" else _spec(q, a.quantize_attention, a.quantize_lm_head) for q in quants}
    names = a.shape or a.models
    models = (names or ("mixtral-8x7b,deepseek-v2-lite" if gpu else "tiny-mixtral,tiny-deepseek")).split(",")
    batches = [int(b) for b in (a.batches or ("1,16,64" if gpu else "1,8")).split(",")]
    prompt_len = a.prompt_len or (512 if gpu else 32)
    compile = not gpu if a.compile is None else a.compile
    if compile and a.compile is None:          # the CPU default: compiled where this machine can compile
        try:
            check_compile(device)
        except MoeEngineError as e:
            print(f"timing eager decode only: {e}")
            compile = False
    compare_eager = a.compare_eager or (compile and a.compile is None)
    dtype = DTYPES[a.dtype] if a.dtype else default_dtype(device)[0]
    bandwidth = copy_bandwidth(device, (1 << 30) if gpu else (256 << 20))
    machine = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device: {machine}, {torch.get_num_threads()} CPU threads, {dtype}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    llama_types = _llamacpp_types(a.llamacpp, gpu)
    llama_models = [m for m in models if llama_types and _is_mixtral(m)]
    rows, llama = [], []
    for name in models:
        if name in SHAPES and gpu:
            need = weight_bytes(name, dtype)
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.9 * free:
                print(f"{name}: skipped, its {need / 2**30:.0f} GiB of weights do not fit the "
                      f"{free / 2**30:.0f} GiB free on this GPU")
                continue
        for q, spec in specs.items():
            if name in SHAPES:
                model = build_random(name, device, dtype, quantization=spec)
            else:
                model = LLM(REPO / "weights" / name, device=device, dtype=dtype, num_kv_blocks=1,
                            quantization=None if spec is None else q,
                            quantize_attention=spec is not None and a.quantize_attention,
                            quantize_lm_head=spec is not None and a.quantize_lm_head).model
            hf = None
            if not a.no_hf and spec is None:
                try:
                    hf = hf_twin(model, name) if name in SHAPES else _hf_from_folder(REPO / "weights" / name, device, dtype)
                except Exception as e:   # a transformers version that cannot build the twin: ours still counts
                    print(f"{name}: transformers comparison skipped: {type(e).__name__}: {e}")
            compiled = compile and spec is None          # a quantized model runs eagerly for now
            model.store_weights(stored_dtype(dtype, compiled))   # as our engine holds them: the limit counts those bytes
            # The machine's rate drifts (a shared VM): measured again beside each model, the highest kept.
            bandwidth = max(bandwidth, copy_bandwidth(device, (1 << 30) if gpu else (256 << 20)))
            active = active_weight_bytes(model)
            limit = bandwidth / active
            for row in measure(name, model, hf, device, batches, prompt_len, a.new_tokens, model.args.vocab_size,
                               a.repeats, compare_eager and spec is None,
                               not gpu if a.sequential is None else a.sequential,
                               False if a.no_graphs else None, a.hf_repeats, compiled):
                row.update(quantization=q, dtype=str(dtype).removeprefix("torch."), bandwidth_limit_tok_s=limit,
                           copy_bandwidth_bytes_s=bandwidth, active_weight_bytes=active,
                           pct_of_limit_b1=100 * row["ours_decode_tok_s"] / limit if row["batch"] == 1 else None)
                plain = [r for r in rows if r["model"] == name and r["batch"] == row["batch"]
                         and r["quantization"] == "none"]
                if spec is not None and plain:
                    row["vs_unquantized"] = row["ours_decode_tok_s"] / plain[0]["ours_decode_tok_s"]
                rows.append(row)
                _print_row(row)
            if spec is None and name in llama_models:
                for row in llamacpp_rows(model, llama_types, prompt_len, a.new_tokens, a.repeats, folder=REPO):
                    row["model"] = name
                    llama.append(row)
                    _print_llamacpp(row)
            del model, hf
            if gpu:
                torch.cuda.empty_cache()
            _write(Path(a.out), machine, bandwidth, dtype, rows, llama)   # after every model: a cut-short run keeps its rows
    for row in llama:            # the quantized rows of ours come after llama.cpp ran: pair them now
        ours = [r for r in rows if r["model"] == row["model"] and r["batch"] == 1
                and r["quantization"] == LLAMACPP_PEERS.get(row["qtype"])]
        if ours and row["decode_tok_s"]:
            row["ours_vs_llamacpp"] = ours[0]["ours_decode_tok_s"] / row["decode_tok_s"]
            print(f"{row['model']} batch 1: ours {ours[0]['quantization']} / llama.cpp {row['qtype']} decode "
                  f"{row['ours_vs_llamacpp']:.2f}x")
    _write(Path(a.out), machine, bandwidth, dtype, rows, llama)
    print(f"wrote {a.out}")
    return 0


# Which of our rows each llama.cpp type is compared with (its nearest in bits per expert weight).
LLAMACPP_PEERS = {"bf16": "none", "f32": "none", "q8_0": "int8", "q4_0": "int4"}


def _llamacpp_types(asked: str | None, gpu: bool) -> list[str]:
    if asked is not None:
        return [] if asked == "none" else [t.strip() for t in asked.split(",")]
    if gpu:
        return []
    try:
        import gguf, llama_cpp      # noqa: F401  (optional: neither is a dependency of moe-engine)
    except ImportError:
        return []
    return ["bf16", "q8_0", "q4_0"]


def _is_mixtral(name: str) -> bool:
    if name in SHAPES:
        return SHAPES[name][0] == "mixtral"
    try:
        return json.loads((REPO / "weights" / name / "config.json").read_text()).get("model_type") == "mixtral"
    except (OSError, ValueError):
        return False


def _print_llamacpp(row: dict) -> None:
    if row["decode_tok_s"] is None:
        print(f"{row['model']:18s} llama.cpp {row['qtype']}: failed ({row['failed']})")
        return
    print(f"{row['model'] + ' llama.cpp ' + row['qtype']:30s} batch   1  decode {row['decode_tok_s']:8.1f} tok/s"
          f"  prefill {row['prefill_tok_s']:9.1f} tok/s  (GGUF {row['file_bytes'] / 1e9:.2f} GB, written in "
          f"{row['write_s']:.0f} s)", flush=True)


def _spec(method: str, attention: bool, head: bool):
    from moe_engine.quantize import QuantSpec
    return QuantSpec(method, quantize_attention=attention, quantize_lm_head=head)


def _print_row(row: dict) -> None:
    hf_part = (f"  transformers {row['hf_decode_tok_s']:8.1f} tok/s  ratio {row['ratio_vs_hf']:5.2f}x"
               if "hf_decode_tok_s" in row else "")
    limit_part = (f"  {row['pct_of_limit_b1']:5.1f}% of limit" if row["batch"] == 1 else
                  f"  batched {row['ours_batched_vs_sequential']:4.1f}x faster than one by one"
                  if "ours_batched_vs_sequential" in row else "")
    plain = "not compiled" if row["compiled"] else "no graphs"
    eager_part = (f"  ({plain} {row['ours_eager_decode_tok_s']:8.1f})" if "ours_eager_decode_tok_s" in row else "")
    compiled = f"  (compiled; start-up {row['startup_s']:.0f} s)" if row["compiled"] else ""
    held = f" {row['quantization']}" if row["quantization"] != "none" else ""
    vs = f"  {row['vs_unquantized']:4.2f}x unquantized" if "vs_unquantized" in row else ""
    print(f"{row['model'] + held:18s} batch {row['batch']:3d}  decode {row['ours_decode_tok_s']:8.1f} tok/s{eager_part}"
          f"  prefill {row['ours_prefill_tok_s']:9.1f} tok/s{hf_part}{limit_part}{vs}{compiled}", flush=True)


def _write(out: Path, machine: str, bandwidth: float, dtype, rows: list[dict], llama: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": machine, "copy_bandwidth_bytes_s": bandwidth, "dtype": str(dtype),
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
                               "llamacpp": llama}, indent=2))


def _hf_from_folder(path, device, dtype):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


if __name__ == "__main__":
    raise SystemExit(main())
