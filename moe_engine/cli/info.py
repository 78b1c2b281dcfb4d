"""What `moe-engine info` reports about a checkpoint: architecture, experts, parameter counts, cache cost."""

import json
from pathlib import Path

import torch

from model_defs.moe import MoEBlock
from moe_engine.checkpoint import safetensors_files
from moe_engine.loader import load_model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) over the loaded parameters. A token runs top_k of a block's E routed
    experts, so (E - top_k) / E of each stacked expert weight sits idle; everything else is active."""
    return _total_and_active(model, lambda p: p.numel())


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """parameter_counts in bytes, each tensor at the dtype it is held in."""
    return _total_and_active(model, lambda p: p.numel() * p.element_size())


def _total_and_active(model: torch.nn.Module, size) -> tuple[int, int]:
    total = sum(size(p) for p in model.parameters())      # parameters() counts a tied tensor once
    idle = 0
    for module in model.modules():
        if isinstance(module, MoEBlock):
            routing = module.routing
            per_expert = (size(module.w13) + size(module.w2)) // routing.num_experts
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
    return f"{kind}, {heads} query heads, {kv_heads} KV heads, head dim {head_dim}"


def describe(model_dir: Path, device: torch.device, dtype: torch.dtype, progress: bool,
             dtype_reason: str | None = None) -> list[tuple[str, str]]:
    """(label, value) rows for `moe-engine info`; the model is loaded so the counts are of real tensors."""
    model, cfg = load_model(model_dir, device, dtype, progress)
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
    kv, context = model.kv_cache_bytes_per_token(dtype), model.max_model_len
    dtype_name = str(dtype).removeprefix("torch.")
    rows.append(("kv cache", f"{kv:,} bytes per token in {dtype_name} "
                             f"({_human(kv * context, 'B')} for a full {context}-token context)"))
    picked = f", {dtype_reason}" if dtype_reason else ""
    rows.append(("dtype", f"{dtype_name} on {device.type}{picked} "
                          f"(checkpoint: {cfg.get('torch_dtype', 'not stated')}), "
                          f"{_human(total * torch.finfo(dtype).bits // 8, 'B')} of weights"))
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
