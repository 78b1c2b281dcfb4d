"""What `moe-engine info` reports about a checkpoint: architecture, experts, parameter counts, cache cost."""

import json
from pathlib import Path

import torch

from kernels.quant import QuantizedWeight
from model_defs.moe import MoEBlock
from moe_engine.checkpoint import safetensors_files
from moe_engine.kv_scales import cache_scales
from moe_engine.llm import kv_bytes_per_token
from moe_engine.loader import load_model
from moe_engine.quantize import QuantSpec, held_weight, quantized_weights

GROUP_TITLES = {"experts": "routed experts", "shared": "shared experts", "attention": "attention",
                "dense": "dense MLPs", "router": "routers", "embedding": "embedding", "norms": "norms",
                "head": "LM head"}


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) over the loaded parameters (a quantized weight counts its logical
    elements). A token runs top_k of a block's E routed experts, so (E - top_k) / E of each stacked expert
    weight sits idle; everything else is active."""
    return _total_and_active(model, lambda p: p.numel())


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """parameter_counts in bytes, each tensor as it is held (a quantized weight: its values, scales, zeros)."""
    return _total_and_active(model, held_bytes)


def held_bytes(t) -> int:
    return t.held_bytes() if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()


def _total_and_active(model: torch.nn.Module, size) -> tuple[int, int]:
    total = sum(size(p) for p in model.parameters())      # parameters() counts a tied tensor once
    total += sum(size(q) for q in quantized_weights(model).values())
    idle = 0
    for module in model.modules():
        if isinstance(module, MoEBlock):
            routing = module.routing
            experts = [p for p in (module.w13, module.w2, getattr(module, "b13", None), getattr(module, "b2", None))
                       if p is not None]                   # b13, b2: the experts' biases (gpt-oss)
            per_expert = sum(size(p) for p in experts) // routing.num_experts
            idle += (routing.num_experts - routing.top_k) * per_expert
    return total, total - idle


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    return f"{n}{unit}"


def _attention_line(args) -> str:
    if getattr(args, "kv_lora_rank", None):
        return (f"MLA, {args.num_attention_heads} heads, latent {args.kv_lora_rank} + rope key "
                f"{args.qk_rope_head_dim} cached per token")
    heads = args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    kind = "MHA" if kv_heads == heads else "GQA"
    line = f"{kind}, {heads} query heads, {kv_heads} KV heads, head dim {head_dim}"
    if hasattr(args, "window"):                           # gpt-oss: sliding windows on some layers, sinks
        windows = [args.window(i) for i in range(args.num_hidden_layers)]
        sliding = sum(w is not None for w in windows)
        line += f"; sliding window {args.sliding_window} on {sliding} of {len(windows)} layers, sinks"
    return line


def tensor_groups(model: torch.nn.Module) -> dict[str, dict[str, list]]:
    """{group: {format: [tensors]}} over every weight the model holds, a tied tensor once; groups are the
    kinds of CausalLM.quantizable_weights() plus routers, the embedding and LM head, and norms."""
    kinds = model.quantizable_weights()
    groups: dict[str, dict[str, list]] = {}
    seen = set()
    named = [(n, held_weight(model, n)) for n in kinds] + list(model.named_parameters())
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        group = kinds.get(name) or ("norms" if "norm" in name else "embedding" if name in ("embed", "lm_head")
                                    else "router" if ".mlp." in name else "attention")
        fmt = t.describe() if isinstance(t, QuantizedWeight) else str(t.dtype).removeprefix("torch.")
        groups.setdefault(group, {}).setdefault(fmt, []).append(t)
    return groups


def group_rows(model: torch.nn.Module) -> list[tuple[str, str]]:
    """One ('weights: <group>', '<format>: <bytes held> (<ratio> of bf16)') row per tensor group."""
    rows = []
    for group, formats in tensor_groups(model).items():
        parts = []
        for fmt, ts in formats.items():
            held, elems = sum(held_bytes(t) for t in ts), sum(t.numel() for t in ts)
            parts.append(f"{fmt} {_human(held, 'B')} held ({held / (2 * elems):.3f}x bf16)")
        rows.append((f"  {GROUP_TITLES.get(group, group)}", "; ".join(parts)))
    return rows


def describe(model_dir: Path, device: torch.device, dtype: torch.dtype, progress: bool,
             quant: QuantSpec | None = None, kv_cache_dtype: str = "auto",
             dtype_reason: str | None = None) -> list[tuple[str, str]]:
    """(label, value) rows for `moe-engine info`; the model is loaded so the counts are of real tensors."""
    model, cfg = load_model(model_dir, device, dtype, progress, quant=quant)
    args = model.args
    moe_blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoEBlock)]
    total, active = parameter_counts(model)
    archs = ", ".join(cfg.get("architectures") or [])
    rows = [("model", str(model_dir)),
            ("architecture", f"{cfg.get('model_type')}" + (f" ({archs})" if archs else "")),
            ("layers", f"{len(model.layers)} ({len(moe_blocks)} MoE, {len(model.layers) - len(moe_blocks)} dense)"),
            ("hidden size", f"{args.hidden_size}, vocab {args.vocab_size}, context {model.max_model_len} tokens"),
            ("attention", _attention_line(args))]
    if moe_blocks:
        routing = moe_blocks[0].routing
        shared = (getattr(args, "n_shared_experts", None) or 1) if moe_blocks[0].shared is not None else 0
        rows.append(("experts", f"{routing.num_experts} routed + {shared} shared per MoE layer, "
                                f"top-{routing.top_k} routed per token ({routing.scoring}, {routing.method})"))
    else:
        rows.append(("experts", "none (dense model)"))
    rows.append(("parameters", f"{total:,} total ({_human(total)}), {active:,} active per token "
                               f"({_human(active)}, {100 * active / total:.1f}%)"))
    kv, context = kv_bytes_per_token(model, dtype, kv_cache_dtype), model.max_model_len
    dtype_name = str(dtype).removeprefix("torch.")
    cache_name = dtype_name if kv_cache_dtype == "auto" else f"{kv_cache_dtype} (scales included)"
    rows.append(("kv cache", f"{kv:,} bytes per token in {cache_name} "
                             f"({_human(kv * context, 'B')} for a full {context}-token context)"))
    if kv_cache_dtype != "auto" or model.checkpoint_kv_scales is not None:
        rows.append(("kv scales", cache_scales(model, kv_cache_dtype)[1]))
    held = parameter_bytes(model)[0]
    picked = f", {dtype_reason}" if dtype_reason else ""
    rows.append(("dtype", f"{dtype_name} on {device.type}{picked} "
                          f"(checkpoint: {cfg.get('torch_dtype', 'not stated')}), "
                          f"{_human(held, 'B')} of weights held"))
    rows.append(("weights", "format and bytes held per group of tensors:"))
    rows.extend(group_rows(model))
    files = safetensors_files(model_dir)
    size = sum(f.stat().st_size for f in files)
    others = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p not in files)
    rows.append(("files", f"{len(files)} safetensors, {_human(size, 'B')}: {', '.join(f.name for f in files)}"))
    rows.append(("", ", ".join(others)))
    gen_path = model_dir / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    except ValueError:
        gen = {"unreadable": gen_path.name}
    if isinstance(gen, dict) and gen:
        rows.append(("generation", ", ".join(f"{k}={v}" for k, v in gen.items() if not k.startswith("_"))))
    return rows
