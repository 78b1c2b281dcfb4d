"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is bound by launch overhead, not by the GPU: hundreds of kernels, each
launched from Python. Captured once per batch-size bucket (1, 2, 4, 8, 16, 32, ... up to max_num_seqs),
a step becomes one replay. Everything a step reads lives in one static int32 buffer (token ids,
positions, cache slots, context lengths, block tables) that each step overwrites with one host-to-device
copy; the logits come back in a static tensor. Rows beyond the real batch are padding: they read and
write only a scratch cache block that no sequence owns.

Without CUDA (tests on the CPU) the same buffers and the same forward run eagerly, so everything but
the capture itself is exercised there.
"""

import numpy as np
import torch

from kernels.attention import AttentionMetadata
from moe_engine.block_manager import blocks_for


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself: [1, 2, 4, ..., max_num_seqs]."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Graph-replayed decode for up to max_num_seqs sequences of one token each.

    run(ids, positions, slots, context_lens, block_tables) -> logits [B, V] float32 (a view into a
    static tensor, valid until the next run). Graphs are captured on first use of a bucket, so only the
    batch sizes a workload reaches cost capture time and memory.
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int,
                 max_num_seqs: int, pad_block: int, device: torch.device):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_model_len, self.pad_block, self.device = max_model_len, pad_block, device
        self.sizes = bucket_sizes(max_num_seqs)
        self.rows = self.sizes[-1]
        self.width = blocks_for(max_model_len, block_size)
        n = self.rows * (4 + self.width)
        self.capture = device.type == "cuda"
        self.buffer = torch.zeros(n, dtype=torch.int32, device=device)              # the graphs' only input
        self.staging = torch.zeros(n, dtype=torch.int32, pin_memory=self.capture)   # filled on the host
        self.host = self.staging.numpy()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor]] = {}
        self.pool = None
        self.copied = torch.cuda.Event() if self.capture else None   # the last copy out of staging is done

    def bucket(self, batch: int) -> int:
        return next(b for b in self.sizes if b >= batch)

    def _views(self, bs: int):
        """(ids, positions, slots, context_lens) [bs] each and block tables [bs, width], in the buffer."""
        n = self.rows
        head = self.buffer[:4 * n].view(4, n)[:, :bs]
        tables = self.buffer[4 * n:].view(n, self.width)[:bs]
        return head[0], head[1], head[2], head[3], tables

    def _forward(self, bs: int) -> torch.Tensor:
        """The step that is captured: static buffers in, logits [bs, V] out."""
        ids, positions, slots, context_lens, tables = self._views(bs)
        meta = AttentionMetadata.static_decode(slots.long(), tables, context_lens, self.block_size,
                                               self.max_model_len)
        with torch.inference_mode():
            hidden = self.model(ids.long(), positions.long(), self.kv_caches, meta)    # [bs, D]
            return self.model.compute_logits(hidden)                                  # [bs, V]

    def _fill(self, ids, positions, slots, context_lens, block_tables, bs: int) -> None:
        """Write a batch (host lists) into the staging buffer, padding rows up to bs, then copy it over."""
        n, w, h, B = self.rows, self.width, self.host, len(ids)
        if self.copied is not None:
            self.copied.synchronize()          # the previous asynchronous copy has read the staging buffer
        for row, values in enumerate((ids, positions, slots, context_lens)):
            h[row * n:row * n + B] = values
        pad_slot = self.pad_block * self.block_size
        h[B:bs], h[n + B:n + bs], h[2 * n + B:2 * n + bs], h[3 * n + B:3 * n + bs] = 0, 0, pad_slot, 1
        tables = h[4 * n:].reshape(n, w)
        for row, table in enumerate(block_tables):
            tables[row, :len(table)] = table
        tables[B:bs, 0] = self.pad_block
        self.buffer.copy_(self.staging, non_blocking=self.capture)
        if self.copied is not None:
            self.copied.record()

    def _graph(self, bs: int) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor]:
        if bs in self.graphs:
            return self.graphs[bs]
        if not self.capture:
            entry = (None, torch.empty(0))
        else:
            self._fill([], [], [], [], [], bs)             # all padding while capturing
            side = torch.cuda.Stream(self.device)          # warm up (compiles the Triton kernels) off-stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(bs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(bs)
            torch.cuda.synchronize(self.device)
            entry = (graph, logits)
        self.graphs[bs] = entry
        return entry

    def run(self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, V] for B <= max_num_seqs sequences decoding one token each."""
        B = len(ids)
        bs = self.bucket(B)
        graph, logits = self._graph(bs)
        self._fill(ids, positions, slots, context_lens, block_tables, bs)
        if graph is None:
            return self._forward(bs)[:B]
        graph.replay()
        return logits[:B]
