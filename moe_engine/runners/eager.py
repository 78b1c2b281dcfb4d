"""The eager runner: any scheduled batch as flat tensors through one model call."""

import torch

from kernels.attention import AttentionMetadata
from moe_engine.runners.base import StepOutput
from moe_engine.scheduler import ScheduledBatch


class EagerRunner:
    """Flat input ids, positions and attention metadata built per step; serves every kind of batch."""

    def __init__(self, model, kv_caches: list, block_size: int, device, max_model_len: int):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.max_model_len = max_model_len     # bounds every context: attention launches sized once
        # keep_hidden (set by a proposer that drafts from the target's hidden states, speculative.mtp): run
        # keeps the step's hidden [T, D] of every fed row, their positions and query_start_loc in last_hidden.
        self.keep_hidden = False
        self.last_hidden = None

    def run(self, batch: ScheduledBatch, hook=None) -> StepOutput:
        """A sequence with drafts (batch.drafts) feeds them after its last token and gets a row of logits
        at each of those 1 + k positions."""
        ids, positions, context_lens, owners, query_lens = [], [], [], [], []
        drafts = batch.drafts or [()] * len(batch.seqs)
        for seq, n, d in zip(batch.seqs, batch.num_tokens, drafts):
            ids += seq.all_ids[seq.num_cached:seq.num_cached + n]
            ids += d
            q = n + len(d)
            positions += range(seq.num_cached, seq.num_cached + q)
            context_lens.append(seq.num_cached + q)
            query_lens.append(q)
            owners += [seq.request_id] * q
        meta = AttentionMetadata.build([s.blocks for s in batch.seqs], context_lens, query_lens,
                                       self.block_size, self.device, self.max_model_len)
        rows = [r for i, (s, ctx, d) in enumerate(zip(batch.seqs, context_lens, drafts))
                if ctx - len(d) == s.num_tokens
                for r in range(meta.query_start_loc[i + 1] - 1 - len(d), meta.query_start_loc[i + 1])]
        hidden = self.forward(ids, positions, owners, meta, self.kv_caches, hook)      # [T, D]
        if self.keep_hidden:
            self.last_hidden = (hidden, positions, meta.query_start_loc)
        with torch.inference_mode():
            if len(rows) < hidden.shape[0]:     # some rows are prompt tokens that sample nothing
                hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
            return StepOutput(self.model.compute_logits(hidden), None)

    def forward(self, ids: list[int], positions: list[int], owners: list[int], meta: AttentionMetadata,
                kv_caches: list, hook=None) -> torch.Tensor:
        """One forward over a flat batch -> hidden [T, D]; the routing hook (if any) hears of each row's
        request, token and position first."""
        if hook is not None:
            hook.begin_step(owners, ids, positions)
        with torch.inference_mode():
            return self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                              kv_caches, meta, hook)
