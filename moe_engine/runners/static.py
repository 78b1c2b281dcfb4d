"""The static-buffer decode step that CUDA graphs and the compiled CPU step share, and the runner that
serves pure decode batches from it and every other batch eagerly.

Everything the step reads lives in one static int32 buffer (token id, position and block table per
sequence; the cache slot and context length follow from those on the device) that each step overwrites
with the rows in use; rows beyond the real batch are padding: position 0 of a scratch cache block that no
sequence owns. Run as it is (cuda_graphs=True off CUDA), this step checks the buffers, the bucket padding
and the scratch block on the CPU; cuda_graphs.py captures it per bucket, compiled.py compiles it.
"""

import torch

from kernels.attention import AttentionMetadata
from moe_engine.block_manager import blocks_for
from moe_engine.runners.base import StepOutput
from moe_engine.scheduler import ScheduledBatch


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself: [1, 2, 4, ..., max_num_seqs]."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class StaticStep:
    """A decode step for up to max_num_seqs sequences of one token each, over static buffers.

    run(ids, positions, block_tables) -> StepOutput (logits [B, V] float32, possibly a view into a static
    tensor valid until the next run). Buckets are made ready (prepare) on first use, so only the batch
    sizes a workload reaches cost capture or compile time.
    """

    def __init__(self, model, kv_caches: list, block_size: int, max_model_len: int, max_num_seqs: int,
                 pad_block: int, device: torch.device):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_model_len, self.pad_block, self.device = max_model_len, pad_block, device
        self.sizes = bucket_sizes(max_num_seqs)
        self.rows = self.sizes[-1]
        self.width = blocks_for(max_model_len, block_size)
        # One row per sequence: [token id, position, block table ...], so the rows a bucket uses are one
        # contiguous piece to copy.
        shape = (self.rows, 2 + self.width)
        on_cuda = device.type == "cuda"
        self.staging = torch.zeros(shape, dtype=torch.int32, pin_memory=on_cuda)   # filled on the host
        self.host = self.staging.numpy()
        # The step's only input; on the CPU the staging rows themselves.
        self.buffer = self.staging if device.type == "cpu" else torch.zeros(shape, dtype=torch.int32, device=device)
        self.written: list[list[int] | None] = [None] * self.rows    # the block table each row holds now
        self.copied = torch.cuda.Event() if on_cuda else None        # the last copy out of staging is done
        self.graphs: dict[int, object] = {}                          # bucket -> what prepare() made for it

    def bucket(self, batch: int) -> int:
        """The rows a step of `batch` sequences runs: its bucket, the rows past the batch being padding."""
        return next(b for b in self.sizes if b >= batch)

    def prepare(self, bs: int) -> object:
        """Make bucket bs ready (capture or compile it in the subclasses); nothing to do when run as it is."""
        return None

    def warm_up(self, bs: int = 1) -> None:
        """Make bucket bs ready now rather than on its first real step."""
        if bs not in self.graphs:
            self.graphs[bs] = self.prepare(bs)

    def run(self, ids: list[int], positions: list[int], block_tables: list[list[int]]) -> StepOutput:
        """Logits for B <= max_num_seqs sequences decoding one token each: the token at `position` of each,
        whose cache slot is taken from its block table."""
        B = len(ids)
        bs = self.bucket(B)
        self.warm_up(bs)
        self._fill(ids, positions, block_tables, bs)
        logits, greedy = self.replay(bs, max(positions))
        return StepOutput(logits, greedy) if bs == B else StepOutput(logits[:B], None if greedy is None else greedy[:B])

    def replay(self, bs: int, top_position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [bs, V], greedy [bs] or None) of the bucket over the rows _fill wrote."""
        return self._forward(bs), None

    def _forward(self, bs: int) -> torch.Tensor:
        """The step that is captured: static buffers in, logits [bs, V] out."""
        rows = self.buffer[:bs]                                                   # [bs, 2 + width]
        with torch.inference_mode():
            return self._step(rows[:, :2], rows[:, 2:], self.kv_caches)

    def _step(self, head: torch.Tensor, tables: torch.Tensor, caches: list) -> torch.Tensor:
        """head [bs, 2] (token id, position), tables [bs, w] int32 block tables -> logits [bs, V]."""
        ids, positions = head[:, 0].long(), head[:, 1].long()
        block = tables.gather(1, (positions // self.block_size)[:, None])[:, 0].long()          # [bs]
        slots = block * self.block_size + positions % self.block_size                          # [bs]
        context_lens = (head[:, 1] + 1).contiguous()                                           # [bs] int32
        meta = AttentionMetadata.static_decode(slots, tables, context_lens, self.block_size, self.max_context(tables))
        hidden = self.model(ids, positions, caches, meta)                                      # [bs, D]
        return self.model.compute_logits(hidden)                                              # [bs, V]

    def max_context(self, tables: torch.Tensor) -> int:
        """The longest context the step's attention is sized for."""
        return self.max_model_len

    def _fill(self, ids, positions, block_tables, bs: int) -> None:
        """Write a batch (host lists) into the staging rows, padding up to bs, then copy those rows over.
        Table entries past a sequence's own blocks are left stale: nothing reads past its context."""
        h, B = self.host, len(ids)
        if self.copied is not None:
            self.copied.synchronize()          # the previous asynchronous copy has read the staging buffer
        h[:B, 0], h[:B, 1] = ids, positions
        if B < bs:
            h[B:bs, :3] = (0, 0, self.pad_block)
            self.written[B:bs] = [None] * (bs - B)
        for row, table in enumerate(block_tables):
            if self.written[row] != table:          # a table changes once a block: rewrite only then
                h[row, 2:2 + len(table)] = table
                self.written[row] = list(table)
        if self.buffer is not self.staging:
            self.buffer[:bs].copy_(self.staging[:bs], non_blocking=self.copied is not None)
        if self.copied is not None:
            self.copied.record()


class DecodeRunner:
    """Pure decode batches (one token per sequence, each of which samples, no routing hook) from the static
    step; every other batch through the eager runner."""

    def __init__(self, eager, static: StaticStep):
        self.eager, self.static = eager, static
        self.kv_caches = eager.kv_caches

    def serves(self, batch: ScheduledBatch, hook) -> bool:
        return (hook is None and len(batch.seqs) <= self.static.rows and not batch.drafts
                and not getattr(self.eager, "keep_hidden", False)   # a proposer wants every row's hidden state (speculative.mtp)
                and all(n == 1 and s.num_cached + 1 == s.num_tokens for s, n in zip(batch.seqs, batch.num_tokens)))

    def run(self, batch: ScheduledBatch, hook=None) -> StepOutput:
        if not self.serves(batch, hook):
            return self.eager.run(batch, hook)
        seqs = batch.seqs
        positions = [s.num_cached for s in seqs]
        return self.static.run([s.token_at(p) for s, p in zip(seqs, positions)], positions, [s.blocks for s in seqs])

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.eager.forward(*args, **kwargs)
