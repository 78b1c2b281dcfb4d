"""Memory preflight: before anything is allocated, the bytes a model will hold against what the device has."""

import os
from pathlib import Path

import torch

from moe_engine.block_manager import blocks_for
from moe_engine.errors import MoeEngineError

GiB = 2 ** 30


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What a container's memory limit leaves (cgroup v2, then v1); None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        cache = 0
        try:   # page cache in the cgroup's count is reclaimable
            stat = Path(Path(usage_file).parent, "memory.stat").read_text().split()
            key = "inactive_file" if "inactive_file" in stat else "total_inactive_file"
            cache = int(stat[stat.index(key) + 1]) if key in stat else 0
        except (OSError, ValueError, IndexError):
            pass
        return max(0, int(limit) - usage + cache)
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory for a model on device: the card's free memory on CUDA, available RAM otherwise (MPS
    shares it); None where it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(found) if found else None


def held_bytes(model) -> int:
    """Bytes of a (meta-device) model's parameters and buffers as they will be held; tied tensors once."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def kv_tokens(model, engine) -> tuple[int, str]:
    """(cache slots, what they are) of the smallest useful KV cache: the asked-for blocks, or one
    full-length sequence; plus the padding block LLM allocates."""
    if engine is None:
        return 0, "no KV cache"
    if engine.num_kv_blocks is not None:
        return (engine.num_kv_blocks + 1) * engine.block_size, f"{engine.num_kv_blocks} KV blocks"
    max_len = min(engine.max_model_len or model.max_model_len, model.max_model_len)
    return ((blocks_for(max_len, engine.block_size) + 1) * engine.block_size,
            f"KV cache of one {max_len}-token sequence")


def check_memory(model, device: torch.device, dtype: torch.dtype, engine, largest_tensor: int,
                 available: int | None, quantized: str | None = None) -> None:
    """Refuse, with the figures and the ways out, a model whose weights (as held: quantized names how, e.g.
    "int4", when some are) + smallest KV cache + one loading buffer (the largest checkpoint tensor in
    float32) exceed the device's free memory."""
    if available is None:
        return
    weights = held_bytes(model)
    tokens, kv_what = kv_tokens(model, engine)
    kv = tokens * model.kv_cache_bytes_per_token(dtype) if tokens else 0
    buffer = largest_tensor * 4
    need = weights + kv + buffer
    if need <= available:
        return
    dtype_name = str(dtype).removeprefix("torch.")
    ways = ["another device (--device)"]
    if quantized != "int4":
        ways.insert(0, "int4 weights (--quantization int4)" if quantized else "a quantized checkpoint (--quantization)")
    if dtype == torch.float32:
        ways.insert(len(ways) - 1, "--dtype bfloat16")
    if kv:
        ways.append("a smaller max_model_len or num_kv_blocks")
    raise MoeEngineError(
        f"not enough memory on {device.type} for the {model.args.model_type} model: weights {weights / GiB:.2f} GiB "
        f"({f'{quantized}, the rest ' if quantized else ''}{dtype_name}) + {kv_what} {kv / GiB:.2f} GiB + loading buffer {buffer / GiB:.2f} GiB = "
        f"{need / GiB:.2f} GiB, but only {available / GiB:.2f} GiB is free; use {', '.join(ways[:-1])} "
        f"or {ways[-1]}")
