"""The engine loop: schedule a step, run the model once over the flat batch, sample, finish requests."""

import time

import torch

from moe_engine.block_manager import BlockManager, blocks_for
from moe_engine.errors import MoeEngineError
from moe_engine.runners import StepOutput, StepRunner
from moe_engine.sampling import sample_token
from moe_engine.scheduler import ScheduledBatch, Scheduler
from moe_engine.sequence import Sequence


class Engine:
    def __init__(self, model, runner: StepRunner, num_blocks: int, block_size: int, device,
                 tokenizer=None, max_num_seqs: int = 32, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, eos_ids: set[int] | None = None, speculative=None):
        self.model, self.block_size, self.device = model, block_size, device
        self.runner = runner                   # the one seam a model step goes through (moe_engine.runners)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids if eos_ids is not None else (tokenizer.eos_ids if tokenizer else set())
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.routing_hook = None        # set by LLM.trace_routing / override_routing while active
        self.spec = None                # speculative decoding (moe_engine.speculative), from a SpeculativeConfig
        if speculative is not None:
            from moe_engine.speculative import Speculator
            self.spec = Speculator(speculative)

    def check_fits(self, seq: Sequence) -> None:
        """Refuse up front a request that could never finish even with the whole cache to itself."""
        longest = min(len(seq.prompt_ids) + seq.params.max_tokens, seq.max_len)
        need = blocks_for(longest, self.block_size)
        if need > self.blocks.num_blocks:
            raise MoeEngineError(
                f"request of {len(seq.prompt_ids)} prompt tokens + max_tokens {seq.params.max_tokens} needs "
                f"{need} cache blocks but the whole cache has {self.blocks.num_blocks}; lower max_tokens, "
                "shorten the prompt or give the cache more room (num_kv_blocks / kv_cache_bytes)")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        if seq.params.seed is not None:
            seq.generator = torch.Generator().manual_seed(seq.params.seed)
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request (e.g. a cancelled stream) and give its blocks back."""
        self.scheduler.finish(seq)
        seq.finish_reason = seq.finish_reason or "abort"

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward over the scheduled batch; (sequence, new token) for each token produced (several
        for a sequence whose drafts were accepted), and (sequence, None) for one whose sampling or text
        failed: it alone ends, finish_reason "error"."""
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch:
            if self.has_work():   # never spin: a stuck queue is a bug to report, not a hang
                raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.waiting)} waiting and "
                                   f"{len(self.scheduler.running)} running requests")
            return []
        started = time.perf_counter()
        sampled = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_cached + n == s.num_tokens]
        logits, greedy = self.forward(batch)                                 # [N, V], N = len(sampled)
        if batch.drafts:    # a verify step: 1 + k rows for each sequence with k drafts
            produced = self.spec.verify(self, batch, sampled, logits)
            self.spec.observe(self, batch)
            self.spec.record(batch, time.perf_counter() - started)
            return produced
        tokens = self.sample(logits, sampled, greedy)
        if any(s.logprobs is not None for s in sampled):
            self._record_logprobs(logits, sampled, tokens)      # a failed sample (an Exception) records nothing
        produced = []
        for seq, token in zip(sampled, tokens):
            try:
                if isinstance(token, Exception):
                    raise token
                seq.output_ids.append(token)
                self._check_finished(seq, token)
            except Exception as e:          # this request alone fails; the rest of the batch goes on
                self.fail(seq, e)
                token = None
            if seq.finished:
                self.scheduler.finish(seq)
            produced.append((seq, token))
        if self.spec is not None:
            self.spec.observe(self, batch)
            self.spec.record(batch, time.perf_counter() - started)
        return produced

    def fail(self, seq: Sequence, error: Exception) -> None:
        """End one request with finish_reason "error" and the reason (its blocks are freed by the caller)."""
        seq.finish_reason = "error"
        seq.error = f"request failed while generating: {type(error).__name__}: {' '.join(str(error).split())}"

    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None
               ) -> list[int | Exception]:
        """Next token per row of logits [N, V]: plain greedy rows in one argmax (or from `greedy` [N], the
        argmax the step took already), the rest one by one; a row whose sampling failed gets the exception."""
        plain = [s.params.greedy and s.params.repetition_penalty == 1.0 for s in seqs]
        if not any(plain):
            tokens = [0] * len(seqs)
        else:
            tokens = (greedy if greedy is not None else logits.argmax(-1)).tolist()
        for i, seq in enumerate(seqs):
            if not plain[i]:
                try:
                    tokens[i] = sample_token(logits[i], seq.params, seq.all_ids, seq.generator)
                except Exception as e:
                    tokens[i] = e
        return tokens

    @staticmethod
    def _record_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
        """Each chosen token's log-probability under the model (before sampling settings) and the
        likeliest alternatives, for the sequences that asked (seq.logprobs = how many alternatives)."""
        rows = [i for i, s in enumerate(seqs) if s.logprobs is not None and not isinstance(tokens[i], Exception)]
        if not rows:
            return
        logp = torch.log_softmax(logits[rows].float(), -1)                           # [R, V]
        chosen = logp.gather(1, torch.tensor([tokens[i] for i in rows], device=logp.device)[:, None])[:, 0]
        top = max(seqs[i].logprobs for i in rows)
        best = logp.topk(top, -1) if top else None
        for r, i in enumerate(rows):
            k = seqs[i].logprobs
            alts = (list(zip(best.indices[r, :k].tolist(), best.values[r, :k].tolist())) if k else [])
            seqs[i].token_logprobs.append((chosen[r].item(), alts))

    def forward(self, batch: ScheduledBatch) -> StepOutput:
        """Feed each sequence's next num_tokens uncached tokens through the runner: logits [N, V] at the
        last token of every sequence whose whole context is now cached (the ones that sample, in batch
        order), and their greedy tokens where the runner took them already (else None)."""
        out = self.runner.run(batch, self.routing_hook)
        self._advance(batch, [s.num_cached + n for s, n in zip(batch.seqs, batch.num_tokens)])
        return out

    def _advance(self, batch: ScheduledBatch, context_lens: list[int]) -> None:
        """The scheduled tokens are in the cache now: move each sequence on, register its full blocks."""
        for seq, ctx in zip(batch.seqs, context_lens):
            seq.num_cached = ctx
            self.blocks.register_full_blocks(seq)

    def _extend_text(self, seq: Sequence, settle_after: int = 16) -> None:
        """Bring seq.text up to date by decoding only the tokens after its settled part (with a few
        tokens before them as context), not the whole output each step. The settled part moves on once
        enough tokens have piled up and the text does not end inside a multi-byte character."""
        done = len(seq.prompt_ids) + seq.text_done
        tail = self.tokenizer.decode_continuation(seq.all_ids[max(0, done - 4):done],
                                                  seq.output_ids[seq.text_done:])
        seq.text = seq.text[:seq.text_done_len] + tail
        if len(seq.output_ids) - seq.text_done >= settle_after and not tail.endswith("\ufffd"):
            seq.text_done, seq.text_done_len = len(seq.output_ids), len(seq.text)

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        # Text is decoded every step only where it is watched (stop strings, streams); else at the end.
        live_text = self.tokenizer is not None and (p.stop or seq.streaming)
        if live_text:
            self._extend_text(seq)
            # The stop string that starts first in the text wins, whatever its place in the list.
            cuts = [cut for cut in (seq.text.find(stop) for stop in p.stop) if cut >= 0]
            if cuts:
                seq.text = seq.text[:min(cuts)]
                seq.finish_reason = "stop"
                return
        if token in self.eos_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= seq.max_len:
            seq.finish_reason = "length"
        if seq.finished and self.tokenizer is not None and not live_text:
            seq.text = self.tokenizer.decode_continuation(seq.prompt_ids[-4:], seq.output_ids)
