"""llama.cpp beside our engine: a Mixtral-family model in memory written as GGUF, timed through llama-cpp-python."""

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_engine.errors import MoeEngineError

QTYPES = ("f32", "bf16", "q8_0", "q4_0")
_CHUNK = 1 << 22          # elements converted to float32 at once: a few MB, never a whole tensor


def _modules():
    """(gguf, llama_cpp), or a clear error: neither is a dependency of moe-engine."""
    try:
        import gguf
        import llama_cpp
    except ImportError as e:
        raise MoeEngineError(f"the llama.cpp comparison needs the gguf and llama-cpp-python packages ({e}); "
                             "pip install 'moe-engine[llamacpp]' (builds llama.cpp, ~10 min), or leave "
                             "llama.cpp out") from None
    return gguf, llama_cpp


def _types(gguf, qtype: str) -> tuple:
    """(attention and expert matrices, token embedding, output head) GGML types for qtype. Like llama.cpp's
    converter for f32 / bf16 / q8_0 (every matrix in that type); for q4_0 like llama-quantize, except the head
    in Q8_0, since the gguf package cannot write the Q6_K that llama-quantize gives it."""
    T = gguf.GGMLQuantizationType
    table = {"f32": (T.F32,) * 3, "bf16": (T.BF16,) * 3, "q8_0": (T.Q8_0,) * 3, "q4_0": (T.Q4_0, T.Q4_0, T.Q8_0)}
    if qtype not in table:
        raise MoeEngineError(f"GGUF type {qtype!r} is not one of {', '.join(QTYPES)}; pick one of those")
    return table[qtype]


def _rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows [heads * Dh, D] from Hugging Face's rotate-half order to the adjacent pairs llama.cpp's llama
    architecture rotates: the permutation convert_hf_to_gguf.py's LlamaModel applies to q_proj and k_proj."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(model, gguf, qtype: str) -> list[tuple[str, list, object]]:
    """[(GGUF name, parts, GGML type)], in file order. The tensor is the one part (our tensor or a view of it),
    or for the experts (names *_exps.weight) the parts stacked along a new dim 0; each part is converted on
    its own while writing."""
    a = model.args
    matrix, embed_type, head_type = _types(gguf, qtype)
    f32 = gguf.GGMLQuantizationType.F32
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, a.num_hidden_layers)
    targets = model.checkpoint_targets()

    def ours(hf_name):
        param, index = targets[hf_name]
        try:
            t = model.get_parameter(param)
        except AttributeError:          # a QuantizedWeight module in the parameter's place
            t = None
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise MoeEngineError(f"{param} is held as {type(t).__name__}; write the GGUF from a model held in "
                                 "float32 or bf16 (before quantizing it)")
        return t if index is None else t[index]

    plan = []
    for hf_name in targets:
        if ".experts." in hf_name:
            continue
        t, name = ours(hf_name), names.get_name(hf_name, try_suffixes=(".weight",))
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = a.num_attention_heads if "q_proj" in hf_name else a.kv_heads
            t = _rope_permute(t, heads)
        kind = (f32 if t.dim() == 1 or name.endswith("ffn_gate_inp.weight")       # norms and router
                else embed_type if name == "token_embd.weight" else head_type if name == "output.weight"
                else matrix)
        plan.append((name, [t], kind))
    for i in range(a.num_hidden_layers):
        for w in ("w1", "w3", "w2"):           # gate, up, down: one [E, rows, cols] tensor each
            parts = [ours(f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight")
                     for e in range(a.num_local_experts)]
            plan.append((names.get_name(f"layers.{i}.feed_forward.experts.{w}.weight", try_suffixes=(".weight",)),
                         parts, matrix))
    # File order as the converter writes it: the embedding, each block's tensors, the final norm and head.
    return sorted(plan, key=lambda p: (1, int(p[0].split(".")[1])) if p[0].startswith("blk.")
                  else (0 if p[0] == "token_embd.weight" else 2, 0))


def _encode(gguf, t: torch.Tensor, kind) -> np.ndarray:
    """One part [rows, cols] as the bytes of GGML type kind, converted a few rows at a time."""
    rows = t.reshape(-1, t.shape[-1])
    step = max(1, _CHUNK // rows.shape[1])
    out = []
    for chunk in rows.split(step):
        if kind == gguf.GGMLQuantizationType.BF16:
            out.append(chunk.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8))
        else:
            out.append(np.ascontiguousarray(gguf.quants.quantize(chunk.float().numpy(), kind)).view(np.uint8))
    return np.concatenate(out).reshape(-1)


def write_gguf(model, path, qtype: str) -> int:
    """Write model (a MixtralModel) as a GGUF that llama.cpp runs as architecture "llama" with experts; bytes
    written. Norms and routers in F32; attention and expert matrices, token embedding and output head as
    _types says (q4_0: Q4_0 with the head in Q8_0). q and k rows permuted to llama.cpp's rotary order. A
    dummy SPM vocabulary of vocab_size tokens ("<t123>"), since llama.cpp will not load a model without one:
    we feed it token ids, never text. Tensors are written one at a time in their stored form."""
    gguf, _ = _modules()
    a = model.args
    extras = {k: getattr(a, k, None) for k in ("rope_scaling", "sliding_window")}
    if getattr(a, "model_type", None) != "mixtral" or any(extras.values()):
        raise MoeEngineError(f"the GGUF writer takes a plain Mixtral model, not model_type="
                             f"{getattr(a, 'model_type', None)!r} with {extras}; compare llama.cpp on a mixtral shape")
    matrix, _, _ = _types(gguf, qtype)
    plan = _tensor_plan(model, gguf, qtype)
    T, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("moe-engine random weights")
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.num_hidden_layers)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_attention_heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_key_length(a.dim_per_head)
    w.add_value_length(a.dim_per_head)
    w.add_rope_dimension_count(a.dim_per_head)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    w.add_expert_count(a.num_local_experts)
    w.add_expert_used_count(a.num_experts_per_tok)
    w.add_vocab_size(a.vocab_size)
    w.add_file_type({T.F32: FT.ALL_F32, T.BF16: FT.MOSTLY_BF16, T.Q8_0: FT.MOSTLY_Q8_0,
                     T.Q4_0: FT.MOSTLY_Q4_0}[matrix])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, a.vocab_size)])
    w.add_token_scores([0.0] * a.vocab_size)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (a.vocab_size - 3))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, parts, kind in plan:
        shape = (len(parts), *parts[0].shape) if "_exps." in name else tuple(parts[0].shape)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with torch.no_grad():
        for name, parts, kind in plan:
            w.write_tensor_data(np.concatenate([_encode(gguf, p, kind) for p in parts]))
    w.close()
    return Path(path).stat().st_size


BUFFERS = ("default", "plain", "repack")
# The attention and expert matrices, the tensors llama.cpp's CPU_REPACK buffer interleaves for its GEMV / GEMM.
_MATRICES = rb"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)_exps)\.weight"


def cpu_has_amx() -> bool:
    """Whether the CPU reports AMX (Linux /proc/cpuinfo; False where that cannot be read)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def default_buffers(qtype: str) -> str:
    """The weight buffers llamacpp_rows times qtype with: llama.cpp's own choice ("default": AMX where the CPU
    has it, else its runtime repack), except on AMX CPUs. There llama-cpp-python 0.3.36 segfaults with that
    choice for Q8_0 and Q4_0: Q4_0 runs in CPU_REPACK alone, so its AMX buffers fail (like
    ggml-org/llama.cpp#20824, open), and Q8_0 also fails while being repacked into CPU_REPACK. So there Q4_0
    is repacked without AMX ("repack"), the other types run unrepacked ("plain")."""
    if not cpu_has_amx():
        return "default"
    return "repack" if qtype == "q4_0" else "plain"


class _Override(ctypes.Structure):           # struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _cpu_repack_buffer(llama_cpp) -> int:
    """llama.cpp's CPU_REPACK buffer type, found through ggml's backend registry (the binding has no call)."""
    from llama_cpp._ggml import libggml
    void = ctypes.c_void_p

    def fn(name, restype, *argtypes):
        return ctypes.CFUNCTYPE(restype, *argtypes)((name, libggml))

    llama_cpp.llama_backend_init()
    dev = fn("ggml_backend_dev_by_type", void, ctypes.c_int)(0)            # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = fn("ggml_backend_dev_backend_reg", void, void)(dev)
    address = fn("ggml_backend_reg_get_proc_address", void, void, ctypes.c_char_p)(
        reg, b"ggml_backend_dev_get_extra_bufts")
    extra = ctypes.CFUNCTYPE(ctypes.POINTER(void), void)(address)(dev) if address else None  # NULL-terminated
    name = fn("ggml_backend_buft_name", ctypes.c_char_p, void)
    for i in range(16):
        if not extra or not extra[i]:
            break
        if name(extra[i]) == b"CPU_REPACK":
            return extra[i]
    raise MoeEngineError("this llama.cpp build has no CPU_REPACK weight buffer; time it with buffers='plain'")


@contextlib.contextmanager
def _model_params(llama_cpp, buffers: str, keep: list):
    """Llama() built with the weight buffers asked for: "plain" turns off llama.cpp's extra buffer types
    (use_extra_bufts), "repack" also puts the matrices in CPU_REPACK. The binding takes neither as an
    argument, so its default model parameters are swapped for the call and put back. keep: what must outlive
    the load (the override array)."""
    if buffers not in BUFFERS:
        raise MoeEngineError(f"llama.cpp weight buffers {buffers!r} are not one of {', '.join(BUFFERS)}")
    low = llama_cpp.llama_cpp
    if buffers == "default":
        yield
        return
    if not {"use_extra_bufts", "tensor_buft_overrides"} <= {f[0] for f in low.llama_model_params._fields_}:
        raise MoeEngineError("this llama-cpp-python cannot choose weight buffers; time it with buffers='default'")
    overrides = None
    if buffers == "repack":
        overrides = (_Override * 2)((_MATRICES, _cpu_repack_buffer(llama_cpp)), (None, None))
        keep.append(overrides)
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p).value
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def open_gguf(path, n_ctx: int, threads: int = 2, n_batch: int = 512, buffers: str = "default", **kwargs):
    """A llama_cpp.Llama on the file, prompts of up to n_batch tokens in one eval, weights in the buffers
    asked for (BUFFERS; default_buffers says which work here); kwargs go to Llama. Otherwise the binding's
    defaults: an F16 KV cache, flash attention off (at the benchmark's short contexts attention is small)."""
    _, llama_cpp = _modules()
    n_batch, keep = max(n_batch, 32), []
    with _model_params(llama_cpp, buffers, keep):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                              n_threads=threads, n_threads_batch=threads, **{"verbose": False, **kwargs})
    llm.moe_engine_keep = keep
    return llm


def _greedy(llm) -> int:
    """The argmax of the last evaluated position's logits (no sampler chain: the same greedy step ours takes)."""
    _, llama_cpp = _modules()
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                     shape=(llm.n_vocab(),)).argmax())


def file_qtype(path) -> str:
    """The QTYPES name of a GGUF file's general.file_type ("other" for the rest)."""
    gguf, _ = _modules()
    FT = gguf.LlamaFileType
    names = {FT.ALL_F32: "f32", FT.MOSTLY_BF16: "bf16", FT.MOSTLY_Q8_0: "q8_0", FT.MOSTLY_Q4_0: "q4_0"}
    return names.get(gguf.GGUFReader(path).fields["general.file_type"].contents(), "other")


def greedy_run(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(the new_tokens greedy tokens, prefill seconds, decode seconds) from a fresh cache: the prompt's eval
    until the first token is prefill, the remaining new_tokens - 1 single-token steps decode."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = [_greedy(llm)]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval(tokens[-1:])
        tokens.append(_greedy(llm))
    return tokens, t1 - t0, time.perf_counter() - t1


def llamacpp_rates(gguf_path, prompts: list[list[int]], new_tokens: int, threads: int = 2) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) at batch 1, the protocol of bench.decode.ours_rates (greedy_run). Several
    prompts run one after another, their times summed. gguf_path may also be a Llama from open_gguf (then
    no load is counted, and threads is the Llama's); a path is opened with default_buffers of its type."""
    opened = isinstance(gguf_path, (str, Path))
    longest = max(map(len, prompts))
    llm = (open_gguf(gguf_path, longest + new_tokens + 16, threads, longest, default_buffers(file_qtype(gguf_path)))
           if opened else gguf_path)
    try:
        runs = [greedy_run(llm, prompt, new_tokens) for prompt in prompts]
    finally:
        if opened:
            llm.close()
    return (sum(map(len, prompts)) / sum(r[1] for r in runs),
            len(prompts) * (new_tokens - 1) / sum(r[2] for r in runs))


def _best_rates(path, prompt: list[int], new_tokens: int, repeats: int, threads: int, buffers: str) -> dict:
    """The best prefill and decode rates over repeats timed runs after a warm-up, the file loaded once."""
    llm = open_gguf(path, len(prompt) + new_tokens + 16, threads, len(prompt), buffers)
    llamacpp_rates(llm, [prompt], new_tokens)
    runs = [llamacpp_rates(llm, [prompt], new_tokens) for _ in range(repeats)]
    llm.close()
    return {"prefill_tok_s": max(r[0] for r in runs), "decode_tok_s": max(r[1] for r in runs)}


def _best_rates_apart(path, prompt, new_tokens, repeats, threads, buffers) -> tuple[dict | None, str]:
    """_best_rates in a child process, so that llama.cpp crashing (it segfaults in some weight buffers) or
    holding memory does not touch the benchmark: (rates or None, the child's exit status and last words)."""
    job = json.dumps({"path": str(path), "prompt": prompt, "new_tokens": new_tokens, "repeats": repeats,
                      "threads": threads, "buffers": buffers})
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "moe_engine.bench.llamacpp", job], capture_output=True,
                          text=True, env=env)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1]), ""
    status = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
              else f"exit {done.returncode}")
    return None, f"{status}: {(done.stderr.strip().splitlines() or [''])[-1][:200]}"


def llamacpp_rows(model, qtypes, prompt_len: int, new_tokens: int, repeats: int = 3, threads: int = 2,
                  seed: int = 0, buffers: str | None = None, folder=None) -> list[dict]:
    """One row per GGUF type: the model written to a temporary file (deleted after), then timed in a child
    process (_best_rates_apart) on a random prompt of prompt_len token ids (torch.randint(3, vocab), as
    bench.decode draws them). buffers: llama.cpp's weight buffers (BUFFERS; default: default_buffers(qtype));
    where the child fails with them, once more with "plain", and the row says what failed. folder: where the
    file goes (default: the system's temporary folder; the 3.56B shape in bf16 takes 7 GB there)."""
    gguf, _ = _modules()
    if buffers not in (None, *BUFFERS):
        raise MoeEngineError(f"llama.cpp weight buffers {buffers!r} are not one of {', '.join(BUFFERS)}")
    prompt = torch.randint(3, model.args.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    rows = []
    for qtype in qtypes:
        row = {"engine": "llama.cpp", "qtype": qtype, "batch": 1, "prompt_len": prompt_len,
               "new_tokens": new_tokens, "threads": threads,
               "types": dict(zip(("matrices", "embedding", "head"), (t.name for t in _types(gguf, qtype)))),
               "prefill_tok_s": None, "decode_tok_s": None, "failed": {}}
        with tempfile.TemporaryDirectory(prefix="moe-engine-gguf-", dir=folder) as tmp:
            path = Path(tmp) / f"model-{qtype}.gguf"
            start = time.perf_counter()
            row["file_bytes"] = write_gguf(model, path, qtype)
            row["write_s"] = time.perf_counter() - start
            for held in dict.fromkeys([buffers or default_buffers(qtype), "plain"]):
                rates, failure = _best_rates_apart(path, prompt, new_tokens, repeats, threads, held)
                if rates is not None:
                    row.update(rates, weight_buffers=held)
                    break
                row["failed"][held] = failure
        rows.append(row)
    return rows


if __name__ == "__main__":        # the child process of _best_rates_apart: one JSON job in, one JSON line out
    job = json.loads(sys.argv[1])
    print(json.dumps(_best_rates(job["path"], job["prompt"], job["new_tokens"], job["repeats"], job["threads"],
                                 job["buffers"])))
