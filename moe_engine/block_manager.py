"""Cache blocks: reference-counted fixed-size blocks, block tables, and prefix caching by hash chains.

Pure Python, no tensors. A full block is identified by the hash of (previous block's hash, its tokens),
so two sequences with the same prefix map it to the same physical block and the second skips its
prefill. The hash is SHA-256, so no one can craft a prompt that collides with another user's prefix.
A freed block keeps its hash until it is handed out again, so a later request can revive it.
"""

import hashlib
from array import array
from collections import OrderedDict

from moe_engine.sequence import Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return (tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.hash_of: dict[int, bytes] = {}            # block id -> hash of its full content
        self.block_of: dict[bytes, int] = {}           # hash -> block id
        self.prefix_hits = 0                         # blocks reused instead of recomputed

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block: int | None = None) -> int:
        """Take a specific free block (a prefix hit) or the least recently freed one."""
        if block is None:
            block, _ = self.free.popitem(last=False)
            old = self.hash_of.pop(block, None)      # its old content is about to be overwritten
            if old is not None and self.block_of.get(old) == block:
                del self.block_of[old]
        else:
            self.free.pop(block, None)
        self.ref_counts[block] += 1
        return block

    def _extend_chain(self, seq: Sequence, hashes: list[bytes], upto_blocks: int) -> list[bytes]:
        """hashes of seq's first blocks, extended to cover upto_blocks full blocks."""
        ids, bs = seq.all_ids, self.block_size
        out = list(hashes)
        for i in range(len(out), upto_blocks):
            digest = hashlib.sha256(out[-1] if out else b"")
            digest.update(array("q", ids[i * bs:(i + 1) * bs]).tobytes())
            out.append(digest.digest())
        return out

    def allocate_prompt(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First allocation of a (re)started sequence: reuse cached prefix blocks, then cover the first
        num_new_tokens uncached tokens. False (and nothing taken) if there are not enough free blocks."""
        assert not seq.blocks
        hits: list[int] = []
        if self.enable_prefix_caching:
            # The last prompt token is always computed: its logits give the first new token.
            for h in self._extend_chain(seq, [], (seq.num_tokens - 1) // self.block_size):
                block = self.block_of.get(h)
                if block is None:
                    break
                hits.append(block)
        cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - cached)
        fresh = blocks_for(cached + num_new_tokens, self.block_size) - len(hits)
        if fresh > self.num_free - sum(1 for b in hits if self.ref_counts[b] == 0):
            return False
        seq.blocks = [self._take(b) for b in hits] + [self._take() for _ in range(fresh)]
        seq.num_cached = cached
        if seq.num_preemptions == 0 and not seq.output_ids:
            seq.num_prompt_cached = cached
        seq.block_hashes = [self.hash_of[b] for b in hits]
        self.prefix_hits += len(hits)
        return True

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return blocks_for(seq.num_cached + num_new_tokens, self.block_size) - len(seq.blocks) <= self.num_free

    def room(self, seq: Sequence) -> int:
        """How many more tokens seq could cache with its own blocks plus every free one."""
        return (len(seq.blocks) + self.num_free) * self.block_size - seq.num_cached

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for num_new_tokens more entries (caller checked can_grow)."""
        while len(seq.blocks) < blocks_for(seq.num_cached + num_new_tokens, self.block_size):
            seq.blocks.append(self._take())

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first num_tokens entries (a speculative step's rejected drafts):
        they hold no accepted entry and were never registered as prefixes."""
        keep = blocks_for(num_tokens, self.block_size)
        while len(seq.blocks) > keep:
            block = seq.blocks.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a forward: blocks whose every entry is now written become reusable prefixes."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_cached // self.block_size
        if full <= len(seq.block_hashes):
            return
        done = len(seq.block_hashes)
        seq.block_hashes = self._extend_chain(seq, seq.block_hashes, full)
        for block, h in zip(seq.blocks[done:full], seq.block_hashes[done:]):
            if h not in self.block_of:
                self.block_of[h] = block
                self.hash_of[block] = h

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.blocks = []
        seq.num_cached = 0
        seq.block_hashes = []
