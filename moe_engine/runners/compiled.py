"""The static decode step compiled by torch.compile on the CPU (compile=True).

Each of a step's ~350-600 torch calls costs microseconds of Python and dispatch on the CPU; torch.compile
fuses the step into a few dozen C++ kernels, twice: for a batch of one, and once for every larger batch
(the batch size left dynamic, so such a batch runs unpadded); the table width (how many blocks the
longest context spans) is dynamic too, so those two compiles serve every batch size and context length.
Only torch.compile's public API is used: the first call of each shape goes through all its guards, later
ones through those that tell its compiled steps apart (torch.compiler.set_stance).
"""

import torch

from moe_engine.errors import MoeEngineError
from moe_engine.runners.static import StaticStep

# torch's per-function compile limit, named cache_size_limit before torch 2.7.
_RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


class CompiledStep(StaticStep):
    """The static step through torch.compile; the greedy tokens are picked inside the compiled step."""

    def __init__(self, model, kv_caches: list, *args, **kwargs):
        super().__init__(model, kv_caches, *args, **kwargs)
        # A mutated cache must reach the step as a whole tensor (a view of a larger one would be copied
        # whole every step), hence the model's cache_parts. The wrapper that calls the kernels and allocates
        # their outputs is C++ rather than Python: ~3 s more per compile, 0.1-0.6 ms less per step on the
        # tiny models.
        self.cache_parts = model.cache_parts(kv_caches)
        self.compiled = torch.compile(self._greedy_step, dynamic=False, fullgraph=True,
                                      options={"cpp_wrapper": True})
        self.views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (bs, width) -> head, tables
        # (bs, width) of the calls torch.compile has already matched to a compiled step through all its
        # guards; later calls of that shape check only the guards that tell its steps apart (see replay).
        self.matched: set[tuple[int, int]] = set()
        self.skip_guards = True

    def bucket(self, batch: int) -> int:
        """A step for more than one sequence takes the batch as it is (its batch size is dynamic): padding
        would cost it compute, ~15-20% a step at a batch of 5 in bucket 8 on the tiny models."""
        return batch if self._dynamic_batch(batch) else super().bucket(batch)

    def _dynamic_batch(self, bs: int) -> bool:
        """Whether the compiled step for bs rows is the one with the batch size dynamic (2..max_num_seqs)."""
        return bs > 1 and self.sizes[-1] > 2

    def max_context(self, tables: torch.Tensor) -> int:
        return tables.shape[1] * self.block_size    # attention reads no further than the columns it is given

    def prepare(self, bs: int) -> None:
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

    def _forward(self, bs: int) -> torch.Tensor:
        return self.replay(bs, int(self.host[:bs, 1].max()))[0]

    def replay(self, bs: int, top_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [bs, V], greedy tokens [bs]) of the compiled step over the rows _fill wrote."""
        # Only the table columns the longest context reaches: attention then reads no further than it.
        width = min(self.width, max(2, top_position // self.block_size + 1))
        key = (bs, width)
        if key not in self.views:
            rows = self.buffer[:bs]                                               # [bs, 2 + width]
            self.views[key] = rows[:, :2], rows[:, 2:2 + width]                   # [bs, 2], [bs, width]
            self._mark_dynamic(bs, *self.views[key])      # the marks stay on these views for every trace
        head, tables = self.views[key]
        # Not in inference mode (even if the caller is): the compiled step writes the caches in place. Grad
        # mode is set by hand, not by a context manager: two of those cost ~60 us a step here.
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self.replay(bs, top_position)
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            if key in self.matched and self.skip_guards:
                # torch.compile's public stance for a warmed-up function: of each compiled step's guards it
                # checks only those that differ between its steps. Safe here because this shape was matched
                # through every guard before and the step's inputs (static buffers, parameters, caches) keep
                # their identity; a new shape, which may need a compile, always goes through all of them.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self.compiled(head, tables, self.cache_parts)
            out = self.compiled(head, tables, self.cache_parts)
            self.matched.add(key)
            return out
        finally:
            torch.set_grad_enabled(grad)

    def _mark_dynamic(self, bs: int, head: torch.Tensor, tables: torch.Tensor) -> None:
        """Which sizes torch.compile is to keep dynamic when it traces the step for this call."""
        # maybe_mark_dynamic, not mark_dynamic with this engine's bounds: a step that torch's on-disk cache
        # holds from an engine with smaller bounds carries them as guards, which under a declared range would
        # fail the compile of an engine with larger ones; as guards they just send it to compile its own.
        if self.width > 2:
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        if self._dynamic_batch(bs):
            # One compile serves every batch from 2 up (the batch-of-one step stays specialised): each compile
            # takes 15-45 s with a cold cache, and a batch whose sequences finish at different times would
            # otherwise compile each smaller bucket on its way down.
            torch._dynamo.maybe_mark_dynamic(head, 0)
            torch._dynamo.maybe_mark_dynamic(tables, 0)

    def _greedy_step(self, head: torch.Tensor, tables: torch.Tensor, caches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """_step and its greedy tokens [bs], which the compiled step picks for ~10 us, not ATen's ~35."""
        logits = self._step(head, tables, caches)
        return logits, logits.argmax(-1)
