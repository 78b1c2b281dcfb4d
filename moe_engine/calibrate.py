"""Calibrated (GPTQ) quantization of the experts: a text run through the engine with routing traced, each
expert's input Hessians accumulated from the tokens routed to it, then its weights quantized by GPTQ."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.quant import QuantizedWeight
from model_defs.moe import MoEBlock
from moe_engine.errors import MoeEngineError
from moe_engine.gptq import gptq_search
from moe_engine.quantize import QuantSpec, held_weight, quantize_weights

WINDOW = 256         # tokens per forward: the tiny models were trained on 256-token windows
# An expert calibrated on fewer tokens than this many times the model's hidden size keeps the clip search.
# Measured on both tiny models (hidden 256; examples/calibration.txt windows spread over the file, the
# held-out streams' output error (w - ŵ) H_val (w - ŵ)ᵀ of GPTQ over the clip search's, median per weight):
# 1.5-2.2x under 256 tokens, 1.35-1.5x at 256-511, 1.05-1.10x at 512-1023, 0.93-0.96x at 1024-2047, 0.86x
# at 2048-4095. Fewer tokens than inputs leave the Hessian short of rank and GPTQ fits the text it saw.
MIN_TOKENS_PER_INPUT = 4


@dataclass
class ExpertHessians:
    """One MoE layer's sums of x xᵀ: h_in [E, D, D] over the layer's input of the tokens routed to each expert
    (what its gate/up rows see), h_mid [E, I, I] over act(gate) * up of those tokens (what its down
    projection sees), counts [E]; the shared expert's the same over every token (None without one)."""
    h_in: torch.Tensor
    h_mid: torch.Tensor
    counts: torch.Tensor
    shared_in: torch.Tensor | None = None
    shared_mid: torch.Tensor | None = None
    shared_count: int = 0
    tokens: list[torch.Tensor] = field(default_factory=list)   # per window, the token rows routed to each expert


def read_calibration(path: str | Path) -> str:
    """A UTF-8 calibration text; a missing, empty or undecodable file is one clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoeEngineError(f"calibration file {path} does not exist; give --calibration a UTF-8 text file "
                             "(e.g. examples/calibration.txt)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoeEngineError(f"calibration file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 "
                             "or give another file") from None
    if not text.strip():
        raise MoeEngineError(f"calibration file {path} is empty; give a text of a few thousand tokens or more "
                             "(e.g. examples/calibration.txt)")
    return text


def windows(ids: list[int], window: int = WINDOW) -> list[list[int]]:
    """ids cut into consecutive windows of `window` tokens (the last may be shorter; none under 2)."""
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]


def collect_hessians(llm, ids: list[int], window: int = WINDOW, keep_tokens: bool = False) -> list[ExpertHessians]:
    """Run ids through llm (its own engine: prompt_logits per window) with routing traced; per MoE layer, the
    Hessians of each expert's inputs. Each MoE block's input x is caught by a forward pre-hook, in the order
    the trace records tokens; the trace says which experts each row went to. keep_tokens: also keep, per
    window, the rows (window positions) routed to each expert (for tests).

    Memory: all layers' Hessians at once, 4 (E (D² + I²) + shared) bytes per MoE layer: 27 MB for
    tiny-mixtral. At Mixtral-8x7B's scale (D 4096, I 14336, 8 experts, 32 layers) that is 7.1 GB a layer,
    227 GB in all: there, calibrate a few layers per pass instead."""
    blocks: list[MoEBlock] = llm.model.moe_blocks
    caught: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: caught[i].append(args[0].detach().float()))
             for i, b in enumerate(blocks)]
    out = [_empty(b) for b in blocks]
    try:
        for chunk in windows(ids, window):
            for c in caught:
                c.clear()
            with llm.trace_routing() as trace:
                llm.prompt_logits(chunk)
            topk_ids = torch.from_numpy(trace.topk_ids)                       # [L, T, k]
            for i, block in enumerate(blocks):
                _accumulate(out[i], block, torch.cat(caught[i]), topk_ids[i].to(torch.int64), keep_tokens)
    finally:
        for h in hooks:
            h.remove()
    return out


def _empty(block: MoEBlock) -> ExpertHessians:
    E, I2, D = block.w13.shape
    S = block.shared.w2.shape[1] if block.shared is not None else 0
    return ExpertHessians(torch.zeros(E, D, D), torch.zeros(E, I2 // 2, I2 // 2), torch.zeros(E, dtype=torch.int64),
                          torch.zeros(D, D) if S else None, torch.zeros(S, S) if S else None)


def _mid(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of rows x [n, D] under full-precision w13 [2I, D]: [n, I]."""
    gate, up = (x @ w13.float().t()).chunk(2, dim=-1)                         # [n, I] each
    return F.silu(gate) * up


def _accumulate(h: ExpertHessians, block: MoEBlock, x: torch.Tensor, topk_ids: torch.Tensor, keep: bool) -> None:
    if x.shape[0] != topk_ids.shape[0]:
        raise RuntimeError(f"MoE layer {block.moe_index}: {x.shape[0]} input rows for {topk_ids.shape[0]} "
                           "traced tokens")
    picked = []
    for e in range(h.counts.shape[0]):
        rows = (topk_ids == e).any(-1).nonzero().flatten()                   # [n]
        picked.append(rows)
        if rows.numel() == 0:
            continue
        xe = x[rows]                                                          # [n, D]
        mid = _mid(xe, block.w13[e])                                          # [n, I]
        h.h_in[e] += xe.t() @ xe
        h.h_mid[e] += mid.t() @ mid
        h.counts[e] += rows.numel()
    if block.shared is not None:
        mid = _mid(x, block.shared.w13)
        h.shared_in += x.t() @ x
        h.shared_mid += mid.t() @ mid
        h.shared_count += x.shape[0]
    if keep:
        h.tokens.append(picked)


def min_tokens(model) -> int:
    """The fewest calibration tokens an expert needs for GPTQ (MIN_TOKENS_PER_INPUT x the hidden size)."""
    return MIN_TOKENS_PER_INPUT * model.moe_blocks[0].w13.shape[-1]


def calibrated_quantize(model, spec: QuantSpec, hessians: list[ExpertHessians], least: int | None = None
                        ) -> dict[str, int]:
    """Replace the weights spec selects by QuantizedWeights (as the loader would): each routed or shared expert
    with at least `least` calibration tokens (default min_tokens(model)) quantized by GPTQ (gptq_search)
    against its Hessians, the rest (and the attention or dense MLPs, when asked: no Hessians are collected
    for them) by the clip search.
    Returns {"calibrated": experts, "fallback": experts, "other": other tensors}."""
    if spec.format not in ("int4", "int8"):
        raise MoeEngineError(f"--calibration quantizes int4 or int8, not {spec.method}")
    bits = 4 if spec.format == "int4" else 8
    least = min_tokens(model) if least is None else least
    full = {name: held_weight(model, name).detach().float().clone() for name in model.quantizable_weights()}
    names = quantize_weights(model, spec, torch.device("cpu"))
    per_layer = {f"layers.{i}.mlp.": layer.mlp for i, layer in enumerate(model.layers)
                 if isinstance(layer.mlp, MoEBlock)}
    counts = {"calibrated": 0, "fallback": 0, "other": 0}
    for name in names:
        qw: QuantizedWeight = held_weight(model, name)
        w = full.pop(name)                                                    # [E, N, K] or [N, K]
        prefix = name.rsplit(".", 2 if ".shared." in name else 1)[0] + "."
        block = per_layer.get(prefix)
        if block is None:
            qw.copy_(w)
            counts["other"] += 1
            continue
        h = hessians[block.moe_index]
        down = name.endswith(".w2")
        if ".shared." in name:
            H, n, w, lead = (h.shared_mid if down else h.shared_in)[None], torch.tensor([h.shared_count]), w[None], ()
        else:
            H, n, lead = h.h_mid if down else h.h_in, h.counts, None
        group = spec.group_size if bits == 4 else w.shape[-1]
        ok = (n >= least).nonzero().flatten().tolist()                  # the experts GPTQ calibrates
        if ok:
            q, scale, zero = gptq_search(w[ok], H[ok], bits, group, not spec.symmetric, qw.scale.dtype)
            for j, e in enumerate(ok):
                qw.store_quantized(lead if lead is not None else (e,), q[j], scale[j],
                                   None if zero is None else zero[j])
        for e in (e for e in range(w.shape[0]) if e not in ok):
            qw.store(lead if lead is not None else (e,), w[e])
        if not down:                                  # count each expert once (its w13 and w2 share the tokens)
            counts["calibrated"] += len(ok)
            counts["fallback"] += w.shape[0] - len(ok)
    return counts
