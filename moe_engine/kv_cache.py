"""Cache blocks: a free-list allocator of fixed-size blocks, and sizing the cache from a memory budget."""

from moe_engine.errors import MoeEngineError


class BlockAllocator:
    """Hands out physical block ids; pure Python, no tensors."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MoeEngineError(f"KV cache exhausted: {n} blocks wanted, {len(self.free)} free")
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))
        blocks.clear()


def blocks_for(tokens: int, block_size: int) -> int:
    return (tokens + block_size - 1) // block_size


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
