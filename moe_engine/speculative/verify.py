"""The engine's speculative hook: drafts proposed before a step is scheduled, the tokens each verifying
sequence keeps from its 1 + k rows of logits afterwards, and the cache rewound past the rejected ones."""

import time

import torch

from moe_engine.sampling import apply_repetition_penalty, target_probs
from moe_engine.speculative.config import SpeculativeConfig
from moe_engine.speculative.control import RequestControl, StepCosts, plan
from moe_engine.speculative.ngram import NgramIndex
from moe_engine.speculative.rejection import accept_greedy, rejection_sample


class Speculator:
    """Proposes drafts (seq.draft_ids, which the scheduler turns into batch.drafts where blocks and the
    token budget allow) and verifies them once the target's forward has run over them."""

    def __init__(self, config: SpeculativeConfig, proposer=None):
        self.config = config
        self.proposer = proposer          # a batched proposer (speculative.draft.DraftModel); None: n-gram
        self.proposal_seconds = 0.0       # the proposer's time before the step now being scheduled
        self.costs = StepCosts()          # measured step times, shared by every request
        self.num_steps = 0
        self.verify_steps = 0             # steps that verified drafts
        self.verified = 0                 # sequence-steps that verified drafts ...
        self.verified_tokens = 0          # ... and the tokens they emitted (accepted + the target's own)

    def propose(self, running: list) -> None:
        """Before scheduling: drafts for each running sequence that is decoding and speculates."""
        self.num_steps += 1
        c = self.config
        candidates = []
        for seq in running:
            seq.draft_ids = []
            if not seq.speculative or seq.num_cached + 1 != seq.num_tokens:
                continue
            if seq.spec_control is None:
                seq.spec_control = RequestControl(shadowed=self.proposer is None)
            if c.adaptive:
                seq.spec_control.observe(seq.all_ids)
            # Never past max_tokens (the step also emits the target's own token) or the longest context.
            candidates.append((seq, min(c.num_speculative_tokens, seq.params.max_tokens - len(seq.output_ids) - 1,
                                        seq.max_len - seq.num_tokens)))
        if c.adaptive:                  # the drafts that pay for the whole batch (control.plan)
            ks = plan([(seq.spec_control, k) for seq, k in candidates], self.costs, len(running), self.num_steps)
        else:
            ks = [k for _, k in candidates]
        wanted = []
        for (seq, _), k in zip(candidates, ks):
            ctl, ids = seq.spec_control, seq.all_ids
            if k >= 1 and self.proposer is not None:
                wanted.append((seq, k))
            elif k >= 1:
                seq.draft_ids = self.ngrams(ctl).propose(ids, k)
            elif c.adaptive and not ctl.shadow and self.proposer is None:   # what it would have drafted, to score later
                ctl.shadow = self.ngrams(ctl).propose(ids, c.num_speculative_tokens)
                ctl.shadow_at = len(ids)
        if wanted:                      # one batched call for every request (a draft model's engine step)
            start = time.perf_counter()
            for (seq, _), drafts in zip(wanted, self.proposer.propose(wanted)):
                seq.draft_ids = drafts
            self.proposal_seconds = time.perf_counter() - start

    def ngrams(self, ctl: RequestControl) -> NgramIndex:
        """The request's n-gram index, made at its first lookup."""
        if ctl.ngrams is None:
            ctl.ngrams = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        return ctl.ngrams

    def observe(self, engine, batch) -> None:
        """After a step's tokens are in: a proposer that follows the target's steps (speculative.mtp, which
        reads their hidden states) sees it; its time counts with the proposer's."""
        watch = getattr(self.proposer, "observe", None)
        if watch is not None:
            start = time.perf_counter()
            watch(engine, batch)
            self.proposal_seconds += time.perf_counter() - start

    def record(self, batch, seconds: float) -> None:
        """The measured time of a step (plain decode, verify, or neither when it prefilled); a verify step
        is charged the proposer's time too (a draft model's steps), so the control weighs the whole cost."""
        if batch.drafts and any(batch.drafts):
            seconds += self.proposal_seconds
        self.proposal_seconds = 0.0
        self.costs.record(batch.num_tokens, batch.drafts or [[] for _ in batch.seqs], seconds)

    def verify(self, engine, batch, sampled: list, logits: torch.Tensor) -> list:
        """After the forward over batch (with drafts): logits has one row per sampling sequence without
        drafts and 1 + k rows per one with k. Emit each one's tokens, finish or rewind it; (seq, token)
        for every token emitted."""
        drafts_of = {seq: d for seq, d in zip(batch.seqs, batch.drafts)}
        plain, plain_rows, groups, row = [], [], [], 0
        for seq in sampled:
            d = drafts_of[seq]
            if d:
                groups.append((seq, row, d))
            else:
                plain.append(seq)
                plain_rows.append(row)
            row += 1 + len(d)
        emitted: list[tuple] = []
        if plain:
            rows = torch.tensor(plain_rows, device=logits.device)
            tokens = engine.sample(logits[rows], plain, None)
            emitted += [(seq, [t], r) for seq, t, r in zip(plain, tokens, plain_rows)]
        for seq, r, d in groups:
            try:
                emitted.append((seq, self.accept(seq, logits[r:r + 1 + len(d)], d), r))
            except Exception as e:          # this request alone fails (see Engine.step)
                emitted.append((seq, [e], r))
        self.verify_steps += 1
        self.verified += len(groups)
        produced = []
        for seq, tokens, r in emitted:
            d = drafts_of[seq]
            context = seq.num_tokens                  # seq.num_cached after the forward: the last token's entry
            kept = []
            try:
                for token in tokens:
                    if isinstance(token, Exception):
                        raise token
                    seq.output_ids.append(token)
                    kept.append(token)
                    engine._check_finished(seq, token)
                    if seq.finished:
                        break
            except Exception as e:          # this request alone fails; the rest of the batch goes on
                engine.fail(seq, e)
            if seq.logprobs is not None:
                engine._record_logprobs(logits[r:r + len(kept)], [seq] * len(kept), kept)
            if d:
                self.verified_tokens += len(kept)
                accepted = len(tokens) - 1
                seq.num_draft_tokens += len(d)
                seq.num_accepted_tokens += min(accepted, len(kept))
                if seq.spec_control is not None:
                    seq.spec_control.update(len(d), accepted)
            if seq.finished:
                engine.scheduler.finish(seq)
            elif d:
                # The accepted drafts' entries are valid; the rejected ones' are not: rewind past them, let
                # only now-complete blocks into the prefix cache, and give back blocks past the context.
                seq.num_cached = context + len(kept) - 1
                engine.blocks.register_full_blocks(seq)
                engine.blocks.trim(seq, seq.num_tokens)
            produced += [(seq, t) for t in kept] if kept or seq.finish_reason != "error" else [(seq, None)]
        return produced

    @staticmethod
    def accept(seq, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        """The tokens seq keeps from its rows logits [1 + k, V]: the sampling settings (repetition penalty
        over the prefix each row continues) apply to the target at every row."""
        p, seen = seq.params, seq.all_ids
        if p.greedy:
            if p.repetition_penalty == 1.0:
                targets = logits.argmax(-1).tolist()
            else:
                targets = [int(apply_repetition_penalty(logits[j], seen + drafts[:j], p.repetition_penalty).argmax())
                           for j in range(len(drafts) + 1)]
            return accept_greedy(targets, drafts)
        probs = torch.stack([target_probs(logits[j], p, seen + drafts[:j]) for j in range(len(drafts) + 1)])
        return rejection_sample(probs, drafts, None, seq.generator)
