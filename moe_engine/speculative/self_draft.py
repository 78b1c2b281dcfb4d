"""method "self": the MoE model drafts for itself with cheaper routing (its best draft_top_k experts per token;
optionally only draft_layers of its layers), in k one-token forwards over its own paged cache; no second
model or cache is held.

The draft's forwards write provisional K/V into the very slots the verify step then writes again: drafting
token j of a sequence with num_cached = c runs position c + j (its last token at c, then the drafts) and
writes slot c + j with the cheap routing's K/V; the verify forward over positions c .. c + k writes every
one of those slots with the full routing's K/V, in each layer before that layer attends, so after it the
cache holds what plain decoding would have written, and the rejected slots are rewound as for any method.
A slot at or past num_cached is never registered as a prefix (block_manager.register_full_blocks), so
provisional entries never reach the prefix cache.
"""

import time

import torch
import torch.nn.functional as F

from kernels.attention import AttentionMetadata
from model_defs.moe import route
from moe_engine.block_manager import blocks_for
from moe_engine.errors import MoeEngineError


class CheapRouting:
    """A routing hook for the draft's forwards: the model's own routing (every variant: groups, bias,
    scaling), cut to its best top_k experts per token, their weights scaled up to the full choice's total
    weight (so a variant that does not normalise keeps its routed output's scale)."""

    def __init__(self, top_k: int):
        self.top_k = top_k

    def begin_step(self, owners: list[int], token_ids: list[int], positions: list[int]) -> None:
        pass

    def route(self, moe_index, router_logits, cfg, bias):
        weights, ids = route(router_logits, cfg, bias)                        # [T, K], best first
        if self.top_k >= ids.shape[1]:
            return weights, ids
        kept = weights[:, :self.top_k]                                         # [T, k]
        scale = weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-20)   # [T, 1]
        return kept * scale, ids[:, :self.top_k].contiguous()


def check_self_draft(model, draft_top_k: int | None, draft_layers: int | None = None) -> tuple[int, list | None]:
    """(experts per token, the decoder layers run or None for all) of this model's draft, or a one-line
    error: a model without MoE layers, draft_top_k above the model's own top_k, draft_layers outside
    2..its layers, or a draft that routes like the target in every layer (it costs a plain step each
    token and its verify step comes on top: it can only be slower than plain decoding)."""
    blocks = model.moe_blocks
    if not blocks:
        raise MoeEngineError("speculative method 'self' drafts with fewer experts per token, and this model has "
                             "no MoE layers; use method 'ngram' or 'draft'")
    full, num_layers = min(b.routing.top_k for b in blocks), len(model.layers)
    top_k = 1 if draft_top_k is None else draft_top_k
    if top_k > full:
        raise MoeEngineError(f"bad speculative_config draft_top_k={top_k}: this model routes each token to {full} "
                             f"experts and a draft must route to fewer; give draft_top_k in 1..{max(1, full - 1)}")
    if draft_layers is not None and not 2 <= draft_layers <= num_layers:
        raise MoeEngineError(f"bad speculative_config draft_layers={draft_layers}: this model has {num_layers} "
                             f"decoder layers; give draft_layers in 2..{num_layers}")
    layers = spaced_layers(num_layers, draft_layers)
    if top_k == full and layers is None:
        fix = (f"give draft_top_k in 1..{full - 1}, or draft_layers below {num_layers}" if full > 1 else
               f"it routes each token to 1 expert: give draft_layers below {num_layers}, or use method 'ngram'")
        raise MoeEngineError(f"speculative_config draft_top_k={top_k}: this model routes each token to {full} "
                             f"experts, so this draft would cost a plain step a token (and the verify step comes "
                             f"on top); {fix}")
    return top_k, layers


def spaced_layers(num_layers: int, n: int | None) -> list[int] | None:
    """The n decoder layers a draft of n layers runs: evenly spaced from the first to the last, both kept
    (on the shipped models skipping either costs the most acceptance); None for all of them."""
    if n is None or n >= num_layers:
        return None
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


class SelfDraft:
    """The batched proposer for method "self": all speculating requests draft together, one token each per
    forward, k forwards (a request whose k is reached drops out), greedy (argmax) from the cheap forward."""

    def __init__(self, engine, draft_top_k: int | None = None, draft_layers: int | None = None,
                 check: bool = True):
        """draft_layers: how many decoder layers the draft runs (spaced_layers), the others skipped (identity
        on the residual stream; their slots are written by the verify step alone). check=False lets a
        test draft exactly like the target (every layer, the model's own top_k)."""
        if check:
            top_k, self.layers = check_self_draft(engine.model, draft_top_k, draft_layers)
        else:
            top_k, self.layers = draft_top_k or 1, spaced_layers(len(engine.model.layers), draft_layers)
        self.engine = engine
        self.hook = CheapRouting(top_k)
        self.rounds = 0
        self.forwards = 0               # draft forwards run (each one token per drafting request) ...
        self.seconds = 0.0              # ... and the time they took

    def _reserved(self) -> int:
        """Free blocks this step's scheduling may need before any draft: every running sequence's own next
        tokens, and the first waiting request's admission (drafts never preempt or keep anyone waiting)."""
        engine = self.engine
        bs, sched = engine.block_size, engine.scheduler
        need = sum(max(0, blocks_for(s.num_tokens, bs) - len(s.blocks)) for s in sched.running)
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            need += blocks_for(sched.waiting[0].num_tokens + 1, bs)
        return need

    def _allocate(self, wanted: list[tuple[object, int]]) -> list[int]:
        """Give each drafting sequence the blocks for the k slots its drafts write (c .. c + k - 1), from
        the free blocks past what scheduling needs; k shrinks to what fits. The scheduler adds the verify
        step's last slot; the verify step trims what the rejected drafts held."""
        blocks, bs = self.engine.blocks, self.engine.block_size
        spare = blocks.num_free - self._reserved()
        ks = []
        for seq, k in wanted:
            while k > 0 and blocks_for(seq.num_cached + k, bs) - len(seq.blocks) > spare:
                k -= 1
            spare -= max(0, blocks_for(seq.num_cached + k, bs) - len(seq.blocks))
            blocks.grow(seq, k)
            ks.append(k)
        return ks

    def propose(self, wanted: list[tuple[object, int]]) -> list[list[int]]:
        """Draft tokens for each (request, k): up to k greedy tokens of the cheaply routed model."""
        self.rounds += 1
        start = time.perf_counter()
        try:
            return self._propose(wanted)
        finally:
            self.seconds += time.perf_counter() - start

    def _propose(self, wanted: list[tuple[object, int]]) -> list[list[int]]:
        engine = self.engine
        runner, model = engine.runner, engine.model
        ks = self._allocate(wanted)
        drafts: list[list[int]] = [[] for _ in wanted]
        last = [seq.all_ids[-1] for seq, _ in wanted]            # the token each draft forward feeds
        longest = max(seq.max_len for seq, _ in wanted)
        j = 0
        while True:
            active = [i for i, k in enumerate(ks) if k > j]
            if not active:
                return drafts
            seqs = [wanted[i][0] for i in active]
            positions = [s.num_cached + j for s in seqs]          # uncached: the verify step writes them again
            meta = AttentionMetadata.build([s.blocks for s in seqs], [p + 1 for p in positions], [1] * len(seqs),
                                           engine.block_size, engine.device, longest)
            ids = [last[i] for i in active]
            if self.layers is None:
                hidden = runner.forward(ids, positions, [s.request_id for s in seqs], meta, runner.kv_caches,
                                        self.hook)                                                 # [B, D]
            else:
                hidden = self._forward_layers(ids, positions, meta, runner.kv_caches)            # [B, D]
            with torch.inference_mode():
                tokens = model.compute_logits(hidden).argmax(-1).tolist()                         # [B]
            self.forwards += 1
            for i, t in zip(active, tokens):
                drafts[i].append(t)
                last[i] = t
            j += 1

    def _forward_layers(self, ids: list[int], positions: list[int], meta, kv_caches: list) -> torch.Tensor:
        """CausalLM.forward (every family's) over self.layers only -> hidden [B, D]."""
        model, device = self.engine.model, self.engine.device
        with torch.inference_mode():
            x = F.embedding(torch.tensor(ids, device=device), model.embed)                         # [B, D]
            angles = model.rotary.angles(torch.tensor(positions, device=device), x.dtype)
            residual = None
            for i in self.layers:
                x, residual = model.layers[i](x, residual, angles, kv_caches[i], meta, self.hook)
            return model.norm.add_and_norm(x, residual)[0]
