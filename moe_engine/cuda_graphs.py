"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is bound by launch overhead, not by the GPU: hundreds of kernels, each
launched from Python. Captured once per batch-size bucket (1, 2, 4, 8, 16, 32, ... up to max_num_seqs),
a step becomes one replay. Everything a step reads lives in one static int32 buffer (token id, position
and block table per sequence; the cache slot and context length follow from those on the device) that
each step overwrites with one host-to-device copy of the rows in use; the logits come back in a static
tensor. Rows beyond the real batch are padding: position 0 of a scratch cache block that no sequence owns.

On the CPU, where each of a step's ~350-600 torch calls costs microseconds of Python and dispatch, the
same static step can instead be compiled (compile=True): torch.compile fuses it into a few dozen C++
kernels, twice: for a batch of one, and once for every larger batch (the batch size left dynamic, so
such a batch runs unpadded); the table width (how many blocks the longest context spans) is dynamic too,
so those two compiles serve every batch size and context length. Otherwise, without CUDA (tests on the
CPU), the same buffers and the same forward run eagerly, so everything but the capture itself is
exercised there.
"""

import torch

from kernels.attention import AttentionMetadata
from moe_engine.block_manager import blocks_for
from moe_engine.compiled_step import CompiledStep
from moe_engine.errors import MoeEngineError

# torch's per-function compile limit, named cache_size_limit before torch 2.7.
_RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself: [1, 2, 4, ..., max_num_seqs]."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Graph-replayed decode for up to max_num_seqs sequences of one token each.

    run(ids, positions, block_tables) -> (logits [B, V] float32, a view into a static tensor valid until
    the next run; the greedy tokens [B] where the step computes them, else None). Graphs are captured on
    first use of a bucket, so only the batch sizes a workload reaches cost capture time and memory.
    """

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int,
                 max_num_seqs: int, pad_block: int, device: torch.device, compile: bool = False):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_model_len, self.pad_block, self.device = max_model_len, pad_block, device
        self.sizes = bucket_sizes(max_num_seqs)
        self.rows = self.sizes[-1]
        self.width = blocks_for(max_model_len, block_size)
        # One row per sequence: [token id, position, block table ...], so the rows a bucket uses are one
        # contiguous piece to copy.
        shape = (self.rows, 2 + self.width)
        self.capture = device.type == "cuda"
        self.staging = torch.zeros(shape, dtype=torch.int32, pin_memory=self.capture)   # filled on the host
        self.host = self.staging.numpy()
        # The graphs' only input; on the CPU the staging rows themselves.
        self.buffer = self.staging if device.type == "cpu" else torch.zeros(shape, dtype=torch.int32, device=device)
        self.written: list[list[int] | None] = [None] * self.rows    # the block table each row holds now
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor]] = {}
        self.pool = None
        self.copied = torch.cuda.Event() if self.capture else None   # the last copy out of staging is done
        # The compiled step (CPU): traced for a batch of one and once for all larger ones; a mutated cache must
        # reach it as a whole tensor (a view of a larger one would be copied whole every step), hence the
        # model's cache_parts. Its wrapper, which calls the kernels and allocates their outputs, is C++
        # rather than Python: ~3 s more per compile, 0.1-0.6 ms less per step on the tiny models (medians of
        # the compiled call, A/B in one process on 2 cores).
        self.compiled = (CompiledStep(self._greedy_step, per_call=("head", "tables"), options={"cpp_wrapper": True})
                         if compile else None)
        self.cache_parts = model.cache_parts(kv_caches)
        self.views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (bs, width) -> head, tables

    def bucket(self, batch: int) -> int:
        """The rows a step of `batch` sequences runs: its bucket, the rows past the batch being padding. A
        compiled step for more than one sequence takes the batch as it is (its batch size is dynamic):
        padding would cost it compute, ~15-20% a step at a batch of 5 in bucket 8 on the tiny models."""
        if self.compiled is not None and self._dynamic_batch(batch):
            return batch
        return next(b for b in self.sizes if b >= batch)

    def _dynamic_batch(self, bs: int) -> bool:
        """Whether the compiled step for bs rows is the one with the batch size dynamic (2..max_num_seqs)."""
        return bs > 1 and self.sizes[-1] > 2

    def _forward(self, bs: int) -> torch.Tensor:
        """The step that is captured (or compiled): static buffers in, logits [bs, V] out."""
        if self.compiled is not None:
            return self._compiled_forward(bs, int(self.host[:bs, 1].max()))[0]
        rows = self.buffer[:bs]                                                   # [bs, 2 + width]
        with torch.inference_mode():
            return self._step(rows[:, :2], rows[:, 2:], self.kv_caches)

    def _compiled_forward(self, bs: int, top_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [bs, V], greedy tokens [bs]) of the compiled step; bs 1's first call compiles it, and so
        does the first call with more rows (that step then serves every bs above 1)."""
        # Only the table columns the longest context reaches: attention then reads no further than it.
        width = min(self.width, max(2, top_position // self.block_size + 1))
        key = (bs, width)
        if key not in self.views:
            rows = self.buffer[:bs]                                               # [bs, 2 + width]
            self.views[key] = rows[:, :2], rows[:, 2:2 + width]                   # [bs, 2], [bs, width]
        head, tables = self.views[key]
        # Not in inference mode (even if the caller is): the compiled step writes the caches in place. Grad
        # mode is set by hand, not by a context manager: two of those cost ~60 us a step here.
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._compiled_forward(bs, top_position)
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            return self.compiled(key, head, tables, self.cache_parts,
                                 before_trace=lambda: self._mark_dynamic(bs, head, tables))
        finally:
            torch.set_grad_enabled(grad)

    def _mark_dynamic(self, bs: int, head: torch.Tensor, tables: torch.Tensor) -> None:
        """Which sizes torch.compile is to keep dynamic when it traces the step for this call."""
        # maybe_mark_dynamic, not mark_dynamic with this engine's bounds: a step that torch's on-disk cache
        # holds from an engine with smaller bounds carries them as guards, which under a declared range would
        # fail the compile of an engine with larger ones; as guards they just send it to compile its own (as
        # a context past a bound met in the step itself, e.g. 4096 positions in a reduction, recompiles).
        if self.width > 2:
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        if self._dynamic_batch(bs):
            # One compile serves every batch from 2 up (the batch-of-one step stays specialised): each compile
            # takes 15-45 s with a cold cache, and a batch whose sequences finish at different times would
            # otherwise compile each smaller bucket on its way down. As fast as per-bucket steps (A/B, 3 and 8).
            torch._dynamo.maybe_mark_dynamic(head, 0)
            torch._dynamo.maybe_mark_dynamic(tables, 0)

    def _compile(self, bs: int) -> None:
        """Compile the step for bs rows on a step of padding rows (as a capture does); after the first bs
        above 1, any other finds its step already built. Every engine of a process compiles the same
        function, and torch's limit of 8 compiles per function would stop a process's later engines, hence
        the raised limit."""
        self._fill([], [], [], bs)
        with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: 256}):
            try:
                self._forward(bs)
            except Exception as e:    # Inductor's errors carry the compiler's whole log: keep a line
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise MoeEngineError(
                    f"torch.compile could not build the CPU decode step for {bs} sequences "
                    f"({type(e).__name__}: {first}); check the C++ compiler and Python's headers (the full "
                    "log is in this error's cause, or run the CLI with --debug), or leave compile off") from e

    def _step(self, head: torch.Tensor, tables: torch.Tensor, caches: list) -> torch.Tensor:
        """head [bs, 2] (token id, position), tables [bs, w] int32 block tables -> logits [bs, V]."""
        ids, positions = head[:, 0].long(), head[:, 1].long()
        block = tables.gather(1, (positions // self.block_size)[:, None])[:, 0].long()          # [bs]
        slots = block * self.block_size + positions % self.block_size                          # [bs]
        context_lens = (head[:, 1] + 1).contiguous()                                           # [bs] int32
        max_context = self.max_model_len if self.compiled is None else tables.shape[1] * self.block_size
        meta = AttentionMetadata.static_decode(slots, tables, context_lens, self.block_size, max_context)
        hidden = self.model(ids, positions, caches, meta)                                      # [bs, D]
        return self.model.compute_logits(hidden)                                              # [bs, V]

    def _greedy_step(self, head: torch.Tensor, tables: torch.Tensor, caches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """_step and its greedy tokens [bs], which the compiled step picks for ~10 us, not ATen's ~35."""
        logits = self._step(head, tables, caches)
        return logits, logits.argmax(-1)

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
            self.buffer[:bs].copy_(self.staging[:bs], non_blocking=self.capture)
        if self.copied is not None:
            self.copied.record()

    def _graph(self, bs: int) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor]:
        """Bucket bs made ready on first use: captured on CUDA, compiled where compile is on."""
        if bs in self.graphs:
            return self.graphs[bs]
        if not self.capture:
            if self.compiled is not None:
                self._compile(bs)
            entry = (None, torch.empty(0))
        else:
            self._fill([], [], [], bs)                     # all padding while capturing
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

    def warm_up(self, bs: int = 1) -> None:
        """Compile (or capture) bucket bs now rather than on its first real step."""
        self._graph(bs)

    def run(self, ids: list[int], positions: list[int],
            block_tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, V], greedy tokens [B] or None) for B <= max_num_seqs sequences decoding one token
        each: the token at `position` of each, whose cache slot is taken from its block table."""
        B = len(ids)
        bs = self.bucket(B)
        graph, logits = self._graph(bs)
        self._fill(ids, positions, block_tables, bs)
        if graph is not None:
            graph.replay()
            return logits[:B], None
        if self.compiled is None:
            return self._forward(bs)[:B], None
        logits, greedy = self._compiled_forward(bs, max(positions))
        return (logits, greedy) if bs == B else (logits[:B], greedy[:B])
