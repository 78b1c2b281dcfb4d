"""The runner protocol: what the engine hands a runner for one model step, and what it gets back."""

from typing import NamedTuple, Protocol

import torch

from moe_engine.scheduler import ScheduledBatch


class StepOutput(NamedTuple):
    logits: torch.Tensor                 # [N, V] float32: one row per sequence that samples, in batch order
                                         # (1 + k rows, its last token's and its k drafts', where it has drafts)
    greedy: torch.Tensor | None          # [N] their argmax where the runner took it already, else None


class StepRunner(Protocol):
    """One model step over a scheduled batch.

    run(batch, hook) feeds each sequence's next batch.num_tokens[i] uncached tokens (from seq.num_cached
    on, into the cache slots its block table names) and returns the logits at the last fed token of every
    sequence whose whole context is then cached: those are the sequences that sample. The runner does not
    move sequences on: the engine does, once the step is done. `hook` is the routing hook (or None).

    Any number of tokens per sequence goes through the same call: prefill chunks, single decode tokens,
    and the coming speculative verify step (a sequence's last token + k drafts). For that step the batch
    will also say how many trailing rows of each sequence want logits (1 + k instead of 1); the eager
    runner then returns those rows (it already computes every row's hidden state), and the static step
    gets a query length per bucket (1 + k rows a sequence, the slot and position of row j being the
    first's + j), captured or compiled like the decode step.

    forward(ids, positions, owners, meta, kv_caches, hook) -> hidden [T, D] runs the model over a flat
    batch with explicit metadata (prompt_logits and perplexity use it over caches of their own).
    """

    def run(self, batch: ScheduledBatch, hook=None) -> StepOutput: ...

    def forward(self, ids: list[int], positions: list[int], owners: list[int], meta, kv_caches: list,
                hook=None) -> torch.Tensor: ...
