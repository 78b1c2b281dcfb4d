"""Which sequences run in the next step, and how many of their tokens: decode tokens first, then
prefill chunks, within a token budget, a sequence cap and the free cache blocks. Pure Python.

When a running sequence needs a block and none is free, the most recently admitted running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt + what it generated so far) when room returns. Nothing is dropped.
"""

from collections import deque
from dataclasses import dataclass

from moe_engine.block_manager import BlockManager
from moe_engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]          # tokens each sequence feeds this step (1 for decode)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        # Running sequences first (oldest first), each with its remaining tokens (1 when decoding).
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_cached, budget)
            while not self.blocks.can_grow(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        # Then waiting sequences, first come first served, while they fit.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            want = min(seq.num_tokens, budget)
            if not self.blocks.allocate_prompt(seq, want):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_cached, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, wherever it is, and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
