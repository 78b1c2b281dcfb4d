"""The user API: LLM(model_dir).generate(...), prompt_logits(...), and the one-call generate()."""

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.attention import AttentionMetadata
from kernels.backend import triton_available
from kernels.quant import QuantizedWeight
from moe_engine.device import pick_device, pick_dtype
from moe_engine.block_manager import blocks_for
from moe_engine.config import EngineConfig
from moe_engine.engine import Engine
from moe_engine.runners import build_runner
from moe_engine.sequence import Sequence
from moe_engine.errors import MoeEngineError
from moe_engine.inputs import (check_bool, check_text, conversations, is_integer, template_settings, token_batch,
                               token_list)
from moe_engine.kv_cache import plan_num_blocks
from moe_engine.kv_scales import cache_scales
from moe_engine.loader import load_model
from moe_engine.sampling import SamplingParams
from moe_engine.tokenizer import load_tokenizer, require_tokenizer


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]            # generated tokens only
    finish_reason: str              # "stop" (EOS or a stop string), "length", or "error"
    error: str | None = None        # why the request was refused (finish_reason "error")
    num_preemptions: int = 0
    num_draft_tokens: int = 0       # speculative drafts verified for it
    num_accepted_tokens: int = 0    # ... and of those accepted


class LLM:
    """A model, its tokenizer and a paged-cache engine. Many prompts run together (continuous
    batching); when the cache is full, the youngest request is preempted and recomputed later."""

    def __init__(self, model: str | Path, device=None, dtype=None, *, config: EngineConfig | None = None,
                 progress: bool = False, **kwargs):
        """kwargs: EngineConfig's fields (block_size, num_kv_blocks, kv_cache_bytes, gpu_memory_utilization,
        max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching, cuda_graphs, compile,
        kv_cache_dtype, speculative_config), or a whole `config`; any other keyword goes to the model (e.g.
        absorb="never" for MLA)."""
        if not isinstance(model, (str, os.PathLike)):
            raise MoeEngineError(f"model must be a folder path (str or Path), got {type(model).__name__}; "
                                 "for a model object use LLM.from_model")
        check_bool("progress", progress)
        config, model_kwargs = _engine_config(config, kwargs)
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        if config.compile:
            check_compile(device)        # before the weights load and the cache is allocated
        path = Path(model).expanduser()
        spec = config.speculative_config
        if spec is not None and spec.method == "mtp":     # load the multi-token-prediction layer too
            from moe_engine.speculative.mtp import mtp_model_kwargs
            model_kwargs = {**model_kwargs, **mtp_model_kwargs(path)}
        loaded, hf_config = load_model(path, device, dtype, progress, quant=config.quant_spec(), engine=config,
                                       **model_kwargs)
        self._setup(loaded, hf_config, path, load_tokenizer(path, hf_config), device, dtype, config)

    @classmethod
    def from_model(cls, model, tokenizer=None, config: EngineConfig | None = None, **kwargs) -> "LLM":
        """An LLM around an already built model (e.g. random weights for benchmarks); kwargs as LLM's."""
        config, extra = _engine_config(config, kwargs)
        if extra:
            raise MoeEngineError(f"unknown engine setting(s) {', '.join(sorted(extra))} for LLM.from_model; "
                                 "see moe_engine.EngineConfig")
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        if param is None:
            raise MoeEngineError(f"LLM.from_model takes a built model (a torch.nn.Module with weights), got "
                                 f"{type(model).__name__}; for a checkpoint folder use LLM(path)")
        if param.device.type == "meta":
            raise MoeEngineError("LLM.from_model: the model's weights are on the meta device (shapes, no values); "
                                 "load or initialise them on a real device first (e.g. model.to_empty(device='cpu'))")
        if config.quantization is not None:
            raise MoeEngineError("LLM.from_model takes the model as built; quantization= applies when loading a "
                                 "checkpoint: LLM(model_dir, quantization=...)")
        llm = cls.__new__(cls)
        if config.compile:
            check_compile(param.device)
        llm._setup(model, {}, Path("<in-memory>"), tokenizer, param.device, param.dtype, config)
        return llm

    def _setup(self, model, hf_config, path, tokenizer, device, dtype, config: EngineConfig):
        self.model, self.config, self.path, self.tokenizer = model, hf_config, path, tokenizer
        self.engine_config = config
        self.device, self.dtype = device, dtype
        self.max_model_len = min(config.max_model_len or model.max_model_len, model.max_model_len)
        self.block_size = block_size = config.block_size
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device.index)   # Triton launches on the current device
        kv_cache_bytes = config.kv_cache_bytes
        if kv_cache_bytes is None:
            # GPU: a share of what is free once the weights are in; CPU/MPS: a fixed budget.
            if device.type == "cuda":
                torch.cuda.empty_cache()     # loading temporaries still held by the allocator are free
            kv_cache_bytes = (int(torch.cuda.mem_get_info(device)[0] * config.gpu_memory_utilization)
                              if device.type == "cuda" else 1 << 30)
        self.kv_cache_dtype = config.kv_cache_dtype
        check_kv_cache_dtype(config.kv_cache_dtype, device, config.compile)
        self.bytes_per_token = kv_bytes_per_token(model, dtype, config.kv_cache_dtype)
        num_blocks = plan_num_blocks(self.bytes_per_token, block_size, self.max_model_len,
                                     config.max_num_seqs, kv_cache_bytes, config.num_kv_blocks)
        self.num_blocks = num_blocks
        self.kv_scales, self.kv_scales_info = cache_scales(model, config.kv_cache_dtype)   # the checkpoint's, or None
        # One block more than the block manager hands out: padding rows of a graph-replayed batch write there.
        kv_caches = allocate_kv_cache(model, (num_blocks + 1) * block_size, dtype, device, config.kv_cache_dtype,
                                      self.kv_scales)
        cuda_graphs = config.cuda_graphs
        quantized = any(isinstance(m, QuantizedWeight) for m in model.modules())
        if quantized and (cuda_graphs and device.type == "cuda" or config.compile):
            raise MoeEngineError("a quantized model runs eagerly for now (its ops wait on the host): drop "
                                 "cuda_graphs=True / compile=True (--compile) or the quantization")
        if cuda_graphs is None:       # captured steps need the Triton kernels: the references wait on the host
            cuda_graphs = device.type == "cuda" and triton_available() and not quantized
        elif cuda_graphs and device.type == "cuda" and not triton_available():
            raise MoeEngineError("cuda_graphs=True needs the triton package on CUDA: pip install 'moe-engine[triton]', "
                                 "or leave cuda_graphs unset")
        model.store_weights(stored_dtype(dtype, config.compile))   # where lossless: compiled steps read half the bytes
        runner = build_runner(model, kv_caches, block_size, self.max_model_len, config.max_num_seqs, num_blocks,
                              device, cuda_graphs, config.compile)
        if config.compile:
            runner.static.warm_up(1)     # bucket 1 compiles now: a compiler that cannot build it fails while loading
        self.engine = Engine(model, runner, num_blocks, block_size, device, tokenizer,
                             config.max_num_seqs, config.max_num_batched_tokens, config.enable_prefix_caching,
                             eos_ids=_eos_ids(tokenizer, hf_config), speculative=config.speculative_config)
        spec = config.speculative_config
        if spec is not None and spec.method == "draft":
            from moe_engine.speculative.draft import DraftModel
            self.engine.spec.proposer = DraftModel(spec.model, device, dtype, model.args.vocab_size,
                                                   self.max_model_len, config.max_num_seqs, tokenizer)
        elif spec is not None and spec.method == "self":
            from moe_engine.speculative.self_draft import SelfDraft
            self.engine.spec.proposer = SelfDraft(self.engine, spec.draft_top_k, spec.draft_layers)
        elif spec is not None and spec.method == "mtp":
            from moe_engine.speculative.mtp import MTPProposer
            self.engine.spec.proposer = MTPProposer(self.engine, model, config.max_num_seqs,
                                                    spec.num_speculative_tokens, self.max_model_len)
        self._next_id = 0
        self.last_stats: dict = {}          # of the latest stream(): prompt/generated tokens, seconds
        self.last_output: Sequence | None = None

    def _new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A validated request, accepted by the engine; MoeEngineError says why one is refused."""
        if not prompt_ids:
            raise MoeEngineError("empty prompt; give at least one token of text")
        if not all(is_integer(t) for t in prompt_ids):
            raise MoeEngineError(f"prompt token ids must be integers, got {[type(t).__name__ for t in prompt_ids][:3]}; "
                                 "pass text as prompts or lists of ints as prompt_token_ids")
        prompt_ids = [int(t) for t in prompt_ids]
        bad = [t for t in prompt_ids if not 0 <= t < self.model.args.vocab_size]
        if bad:
            raise MoeEngineError(f"prompt token id(s) {bad[:5]} outside the vocabulary "
                                 f"[0, {self.model.args.vocab_size}); check the token ids")
        if len(prompt_ids) >= self.max_model_len:
            raise MoeEngineError(f"prompt is {len(prompt_ids)} tokens but the model takes at most "
                                 f"{self.max_model_len} (prompt + output); shorten the prompt")
        seq = Sequence(self._next_id, list(prompt_ids), params, self.max_model_len)
        self._next_id += 1
        self.engine.add(seq)
        return seq

    def _encode(self, prompt: str) -> list[int]:
        check_text("prompt", prompt)
        return require_tokenizer(self.tokenizer, self.path).encode(prompt)

    def _prompt_ids(self, prompt, text_ok: bool = True) -> list:
        """Text -> token ids; a sequence of ids -> a list of them (checked by _new_sequence)."""
        if isinstance(prompt, str):
            if not text_ok:
                raise MoeEngineError(f"prompt_token_ids holds text ({prompt[:20]!r}), not token ids; "
                                     "pass text as prompts=..., or lists of ints as prompt_token_ids")
            return self._encode(prompt)
        if isinstance(prompt, (list, tuple, torch.Tensor)) or hasattr(prompt, "__array__"):
            return token_list(prompt, "prompt token ids")
        raise MoeEngineError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}"
                             + ("; decode bytes to str first" if isinstance(prompt, (bytes, bytearray)) else
                                "; for one token id pass [id] as prompt_token_ids" if is_integer(prompt) else ""))

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order; all prompts run together. sampling_params may
        be one for all or one per prompt. A refused request (too long, too big for the cache) gets
        finish_reason "error" and its reason while the others complete; if all are refused, raises."""
        if (prompts is None) == (prompt_token_ids is None):
            raise MoeEngineError("give either prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None and not isinstance(prompts, (list, tuple)):
            raise MoeEngineError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
                                 + ("; pass list(...) of it" if isinstance(prompts, Iterator) else ""))
        if prompt_token_ids is not None:
            prompt_token_ids = token_batch(prompt_token_ids)
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        if n == 0:
            return []
        if isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * n
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise MoeEngineError(f"sampling_params must be one SamplingParams or a list of {n} (one per prompt)")
        texts = prompts if prompts is not None else [None] * n
        sources = prompt_token_ids if prompt_token_ids is not None else prompts
        seqs: list[Sequence | MoeEngineError] = []
        token_lists: list[list] = []
        for source, p in zip(sources, params):
            ids = []
            try:
                ids = self._prompt_ids(source, text_ok=prompts is not None)
                seqs.append(self._new_sequence(ids, p))
            except MoeEngineError as e:
                seqs.append(e)
            token_lists.append(ids)
        if all(isinstance(s, MoeEngineError) for s in seqs):
            raise seqs[0]
        self._run_until_done([s for s in seqs if isinstance(s, Sequence)])
        outputs = []
        for s, text, ids in zip(seqs, texts, token_lists):
            if isinstance(s, MoeEngineError):
                outputs.append(RequestOutput(-1, text, list(ids), "", [], "error", str(s)))
            else:
                outputs.append(RequestOutput(s.request_id, text, s.prompt_ids, s.text, s.output_ids,
                                             s.finish_reason, s.error, num_preemptions=s.num_preemptions,
                                             num_draft_tokens=s.num_draft_tokens,
                                             num_accepted_tokens=s.num_accepted_tokens))
        return outputs

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation ([{"role": ..., "content": ...}, ...]) or a list of them, each rendered
        through the model's chat template; one RequestOutput per conversation. tools (OpenAI-style
        [{"type": "function", "function": {...}}]) and chat_template_kwargs (e.g. {"enable_thinking": False})
        reach the template as in transformers' apply_chat_template. Tool calls are not parsed from the output."""
        tokenizer = require_tokenizer(self.tokenizer, self.path)
        if tools is not None and not isinstance(tools, list):
            raise MoeEngineError(f"tools must be a list of tool definitions, got {type(tools).__name__}; pass "
                                 'tools=[{"type": "function", "function": {"name": ..., "parameters": ...}}]')
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise MoeEngineError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}; "
                                 'pass e.g. chat_template_kwargs={"enable_thinking": False}')
        kwargs = template_settings(chat_template_kwargs)
        return self.generate(prompt_token_ids=[tokenizer.encode_chat(c, tools=tools, **kwargs)
                                               for c in conversations(messages)],
                             sampling_params=sampling_params)

    def _run_until_done(self, seqs: list[Sequence]) -> None:
        """Step the engine until these requests finish. If anything goes wrong (an exception, Ctrl-C),
        they are aborted so the engine is left clean for the next call."""
        try:
            while not all(s.finished for s in seqs):
                self.engine.step()
        except BaseException:
            for seq in seqs:
                if not seq.finished:
                    self.engine.abort(seq)
            raise

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Yield the generated text piece by piece as tokens arrive. Closing the generator early
        (or Ctrl-C) cancels the request and frees its cache blocks."""
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise MoeEngineError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        seq = self._new_sequence(self._prompt_ids(prompt), sampling_params or SamplingParams())
        ids = seq.prompt_ids
        seq.streaming = True
        self.last_stats = stats = {"prompt_tokens": len(ids), "generated_tokens": 0, "seconds": 0.0}
        start, sent = time.perf_counter(), 0
        try:
            # Text first, then a step: whoever else steps the engine meanwhile (a generate, another
            # stream) may have moved this sequence on, or finished it; its text is shown all the same.
            while True:
                stats["generated_tokens"] = len(seq.output_ids)
                stats["draft_tokens"], stats["accepted_tokens"] = seq.num_draft_tokens, seq.num_accepted_tokens
                ready = len(seq.text) if seq.finished else _stable_len(seq.text, seq.params.stop)
                if ready > sent:
                    yield seq.text[sent:ready]
                    sent = ready
                    continue            # the caller may have stepped the engine while it held the piece
                if seq.finished:
                    break
                self.engine.step()
            if seq.finish_reason == "error":
                raise MoeEngineError(seq.error)
        finally:
            stats["seconds"] = time.perf_counter() - start
            if not seq.finished:
                self.engine.abort(seq)
            self.last_output = seq

    def prompt_logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """float32 [T, vocab]: the next-token logits at every position of one sequence (a fresh cache)."""
        ids = [int(t) for t in token_list(token_ids, "prompt_logits token ids")]
        if not ids or len(ids) > self.max_model_len or not all(0 <= t < self.model.args.vocab_size for t in ids):
            raise MoeEngineError(f"prompt_logits takes 1..{self.max_model_len} token ids in "
                                 f"[0, {self.model.args.vocab_size}); check the input")
        T = len(ids)
        caches = allocate_kv_cache(self.model, blocks_for(T, self.block_size) * self.block_size,
                                   self.dtype, self.device, self.kv_cache_dtype, self.kv_scales)   # as the engine's
        meta = AttentionMetadata.build([list(range(blocks_for(T, self.block_size)))], [T], [T],
                                       self.block_size, self.device)
        hidden = self.engine.runner.forward(ids, list(range(T)), [-1] * T, meta, caches, self.engine.routing_hook)   # [T, D]
        with torch.inference_mode():
            return self.model.compute_logits(hidden)

    def cache_info(self) -> dict:
        """The paged KV cache: num_blocks (handed out to requests), block_size, bytes_per_token (all layers,
        scales included), dtype (the cache dtype setting and what it stores), tokens (num_blocks * block_size) and
        kv_scales (how keys and values are scaled: computed at write, or the checkpoint's k_scale / v_scale)."""
        stored = str(self.dtype).removeprefix("torch.") if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "bytes_per_token": self.bytes_per_token,
                "kv_cache_dtype": self.kv_cache_dtype, "dtype": stored, "tokens": self.num_blocks * self.block_size,
                "kv_scales": self.kv_scales_info}

    def trace_routing(self, scores: bool = False):
        """`with llm.trace_routing() as trace:` records each MoE layer's top-k experts and weights (and with
        scores=True the router logits) for every token processed inside; see moe_engine.routing.Trace."""
        from moe_engine.routing import trace_routing
        check_bool("trace_routing scores", scores)
        return trace_routing(self, scores)

    def override_routing(self, top_k: int | None = None, disabled_experts: dict[int, list[int]] | None = None,
                         replay=None, random: int | None = None):
        """`with llm.override_routing(top_k=1):` routes differently inside: top_k, disabled_experts
        {moe_layer: [ids]}, replay=trace or random=seed; see moe_engine.routing.Override."""
        from moe_engine.routing import override_routing
        return override_routing(self, top_k, disabled_experts, replay, random)

    def perplexity(self, token_ids, window: int | None = None) -> float:
        """exp(mean next-token loss) over token_ids (windows of at most max_model_len tokens)."""
        from moe_engine.perplexity import perplexity
        return perplexity(self, token_ids, window)


def stored_dtype(dtype: torch.dtype, compile: bool) -> torch.dtype:
    """The dtype an engine holds the routed experts and the projections in (where lossless, see
    CausalLM.store_weights): bfloat16 under compile=True for a float32 model, whose compiled step multiplies
    them in float32; else dtype."""
    return torch.bfloat16 if compile and dtype == torch.float32 else dtype


def kv_bytes_per_token(model, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Cache bytes per token of every layer under kv_cache_dtype (a family without compressed caches is asked
    the old way for "auto")."""
    if kv_cache_dtype == "auto":
        return model.kv_cache_bytes_per_token(dtype)
    return model.kv_cache_bytes_per_token(dtype, kv_cache_dtype)


def allocate_kv_cache(model, num_slots: int, dtype: torch.dtype, device, kv_cache_dtype: str = "auto",
                      kv_scales: list | None = None) -> list:
    """The model's caches; kv_scales (moe_engine.kv_scales.cache_scales): the scales every token is written with."""
    if kv_cache_dtype == "auto":
        return model.allocate_kv_cache(num_slots, dtype, device)
    if kv_scales is not None:
        return model.allocate_kv_cache(num_slots, dtype, device, kv_cache_dtype, kv_scales=kv_scales)
    return model.allocate_kv_cache(num_slots, dtype, device, kv_cache_dtype)


def check_kv_cache_dtype(kv_cache_dtype: str, device, compile: bool) -> None:
    """Where a compressed cache runs: not on MPS (no float8 there), not in the compiled CPU step."""
    if kv_cache_dtype == "auto":
        return
    if device.type == "mps":
        raise MoeEngineError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported on mps; use the CPU or CUDA, or "
                             "kv_cache_dtype='auto'")
    if compile:
        raise MoeEngineError(f"compile=True does not support kv_cache_dtype={kv_cache_dtype!r} yet; leave one of "
                             "them off")


def check_compile(device) -> None:
    """compile=True needs the CPU and the C++ compiler torch.compile builds its CPU kernels with."""
    if device.type != "cpu":
        raise MoeEngineError(f"compile=True compiles CPU decode steps; on {device.type} leave it off "
                             "(CUDA decode steps are replayed from CUDA graphs already)")
    cxx = (os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")).split()[0]
    if shutil.which(cxx) is None:
        raise MoeEngineError(f"compile=True needs a C++ compiler for torch.compile's CPU kernels, and {cxx!r} "
                             "is not on PATH: install one (e.g. g++) or set CXX, or leave compile off")


def _engine_config(config: EngineConfig | None, kwargs: dict) -> tuple[EngineConfig, dict]:
    """(the engine settings: `config`, or those among kwargs; the other kwargs)."""
    if config is None:
        return EngineConfig.split(kwargs)
    if not isinstance(config, EngineConfig):
        raise MoeEngineError(f"config must be a moe_engine.EngineConfig, got {type(config).__name__}")
    settings, rest = EngineConfig.split(kwargs)
    if settings != EngineConfig():
        raise MoeEngineError("give engine settings either as config=EngineConfig(...) or as keywords, not both")
    return config, rest


def _eos_ids(tokenizer, config: dict) -> set[int]:
    """End-of-sequence ids: the tokenizer's (from generation_config.json), else config.json's."""
    if tokenizer is not None and tokenizer.eos_ids:
        return set(tokenizer.eos_ids)
    eos = config.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _stable_len(text: str, stops: list[str]) -> int:
    """How much of a growing text can be shown: not a trailing replacement char (the next token may
    complete a UTF-8 sequence) nor a tail that could be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if stop.startswith(text[end - k:end]):
                end -= k
                break
    return end


def generate(model: "str | Path | LLM", prompt: str, **sampling) -> str:
    """One prompt in, generated text out: generate("weights/tiny-mixtral", "def ", max_tokens=32)."""
    llm = model if isinstance(model, LLM) else LLM(model)
    return llm.generate(prompt, SamplingParams(**sampling))[0].text
