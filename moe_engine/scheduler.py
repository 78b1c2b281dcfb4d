"""Which sequences run in the next step, and how many of their tokens: running sequences first, oldest
first (a decode token each, or their next prefill chunk), then waiting ones, within a token budget, a
sequence cap and the free cache blocks. Pure Python.

When a running sequence needs a block and none is free, a prefill chunk shrinks to what fits; if nothing
fits, the most recently admitted running sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed (prompt + what it generated so far) when room returns. Nothing
is dropped, and nothing new is admitted in a step that had to preempt.
"""

from collections import deque
from dataclasses import dataclass, field

from moe_engine.block_manager import BlockManager, blocks_for
from moe_engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]          # tokens each sequence feeds this step (1 for decode), drafts not counted
    drafts: list[list[int]] = field(default_factory=list)   # empty, or per sequence the drafts fed after them

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
        self.num_scheduled_tokens = 0              # all tokens fed to the model, recomputation included

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False
        # Running sequences first (oldest first), each with its remaining tokens (1 when decoding).
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_cached, budget)
            while not self.blocks.can_grow(seq, n):
                room = self.blocks.room(seq)
                if room > 0:
                    n = room                 # a prefill chunk shrinks to the free blocks
                    break
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        # Then waiting sequences, first come first served, while they fit.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Admit only what can finish its prefill and take a first decode token without evicting
            # anyone: starting a prefill that must be thrown away costs more than waiting.
            if blocks_for(seq.num_tokens + 1, self.blocks.block_size) > self.blocks.num_free and self.running:
                break
            want = min(seq.num_tokens, budget)
            if not self.blocks.allocate_prompt(seq, want):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_cached, budget)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        if any(s.draft_ids for s in batch.seqs):
            budget = self._add_drafts(batch, budget)
        self.num_scheduled_tokens += sum(batch.num_tokens) + sum(map(len, batch.drafts))
        return batch

    def _add_drafts(self, batch: ScheduledBatch, budget: int) -> int:
        """Last, with what the token budget and the free blocks leave (drafts never preempt anyone nor keep
        a request waiting): each decoding sequence's proposed drafts, fed after its last token."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            d, seq.draft_ids = seq.draft_ids, []
            if not d or n != 1 or seq.num_cached + 1 != seq.num_tokens:
                d = []
            d = d[:max(0, min(budget, self.blocks.room(seq) - 1))]
            if d:
                self.blocks.grow(seq, 1 + len(d))
                budget -= len(d)
            batch.drafts.append(d)
        return budget

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.draft_ids = []
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
