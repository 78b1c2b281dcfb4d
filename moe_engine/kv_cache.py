"""Sizing the paged KV cache: how many blocks a memory budget (or the free GPU memory) affords."""

from moe_engine.block_manager import blocks_for
from moe_engine.errors import MoeEngineError


def plan_num_blocks(bytes_per_token: int, block_size: int, max_model_len: int, max_num_seqs: int,
                    budget_bytes: int, num_kv_blocks: int | None) -> int:
    """Blocks to allocate: what was asked for, else enough for max_num_seqs full-length sequences,
    capped by the byte budget; always at least one full-length sequence."""
    if num_kv_blocks is not None:
        if num_kv_blocks < 1:
            raise MoeEngineError(f"num_kv_blocks={num_kv_blocks} must be >= 1")
        return num_kv_blocks
    per_seq = blocks_for(max_model_len, block_size)
    affordable = budget_bytes // (bytes_per_token * block_size)
    if affordable < per_seq:
        raise MoeEngineError(f"KV cache budget of {budget_bytes / 2**20:.0f} MiB holds {affordable} blocks, less than "
                             f"one {max_model_len}-token sequence ({per_seq}); raise kv_cache_bytes or lower "
                             "max_model_len")
    return min(per_seq * max_num_seqs, affordable)
