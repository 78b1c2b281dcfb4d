"""The engine loop: schedule a step, run the model once over the flat batch, sample, finish requests."""

import torch

from kernels.attention import AttentionMetadata
from moe_engine.block_manager import BlockManager, blocks_for
from moe_engine.cuda_graphs import DecodeGraphs
from moe_engine.errors import MoeEngineError
from moe_engine.sampling import sample_token
from moe_engine.scheduler import ScheduledBatch, Scheduler
from moe_engine.sequence import Sequence


class Engine:
    def __init__(self, model, kv_caches: list[torch.Tensor], num_blocks: int, block_size: int, device,
                 tokenizer=None, max_num_seqs: int = 32, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, eos_ids: set[int] | None = None,
                 max_model_len: int = 0, graphs: DecodeGraphs | None = None):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.max_model_len = max_model_len     # bounds every context: attention launches sized once
        self.graphs = graphs                   # decode steps replayed from CUDA graphs when set
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids if eos_ids is not None else (tokenizer.eos_ids if tokenizer else set())
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.routing_hook = None        # set by LLM.trace_routing / override_routing while active

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
        """One forward over the scheduled batch; (sequence, new token) for each that produced one."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.has_work():   # never spin: a stuck queue is a bug to report, not a hang
                raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.waiting)} waiting and "
                                   f"{len(self.scheduler.running)} running requests")
            return []
        logits, sampled, greedy = self.forward(batch)                       # [N, V], N sequences
        produced = []
        for seq, token in zip(sampled, self.sample(logits, sampled, greedy)):
            seq.output_ids.append(token)
            self._check_finished(seq, token)
            if seq.finished:
                self.scheduler.finish(seq)
            produced.append((seq, token))
        return produced

    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None) -> list[int]:
        """Next token per row of logits [N, V]: plain greedy rows in one argmax (or from `greedy` [N], the
        argmax the step took already), the rest one by one."""
        plain = [s.params.greedy and s.params.repetition_penalty == 1.0 for s in seqs]
        if not any(plain):
            tokens = [0] * len(seqs)
        else:
            tokens = (greedy if greedy is not None else logits.argmax(-1)).tolist()
        for i, seq in enumerate(seqs):
            if not plain[i]:
                tokens[i] = sample_token(logits[i], seq.params, seq.all_ids, seq.generator)
        return tokens

    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence], torch.Tensor | None]:
        """Feed each sequence's next num_tokens uncached tokens; logits at the last token of every
        sequence whose whole context is now cached (the ones that sample), those sequences, and their
        greedy tokens where the step took them already (else None)."""
        if self._graphable(batch):
            logits, greedy = self._graph_decode(batch)
            return logits, batch.seqs, greedy
        ids, positions, context_lens, owners = [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            ids += seq.all_ids[seq.num_cached:seq.num_cached + n]
            positions += range(seq.num_cached, seq.num_cached + n)
            context_lens.append(seq.num_cached + n)
            owners += [seq.request_id] * n
        meta = AttentionMetadata.build([s.blocks for s in batch.seqs], context_lens, batch.num_tokens,
                                       self.block_size, self.device, self.max_model_len)
        sampled = [s for s, ctx in zip(batch.seqs, context_lens) if ctx == s.num_tokens]
        rows = [meta.query_start_loc[i + 1] - 1 for i, (s, ctx) in enumerate(zip(batch.seqs, context_lens))
                if ctx == s.num_tokens]
        hidden = self.run_model(ids, positions, owners, meta, self.kv_caches)      # [T, D]
        with torch.inference_mode():
            if len(rows) < hidden.shape[0]:     # some rows are prompt tokens that sample nothing
                hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
            logits = self.model.compute_logits(hidden)
        self._advance(batch, context_lens)
        return logits, sampled, None

    def _graphable(self, batch: ScheduledBatch) -> bool:
        """A pure decode step (one token per sequence, each of which samples) with no routing hook."""
        return (self.graphs is not None and self.routing_hook is None and len(batch.seqs) <= self.graphs.rows
                and all(n == 1 and s.num_cached + 1 == s.num_tokens for s, n in zip(batch.seqs, batch.num_tokens)))

    def _graph_decode(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, V], greedy tokens [B] or None) of a decode step replayed from the CUDA graph of its
        batch-size bucket (or its compiled step)."""
        seqs = batch.seqs
        positions = [s.num_cached for s in seqs]
        out = self.graphs.run([s.token_at(p) for s, p in zip(seqs, positions)], positions, [s.blocks for s in seqs])
        self._advance(batch, [p + 1 for p in positions])
        return out

    def _advance(self, batch: ScheduledBatch, context_lens: list[int]) -> None:
        """The scheduled tokens are in the cache now: move each sequence on, register its full blocks."""
        for seq, ctx in zip(batch.seqs, context_lens):
            seq.num_cached = ctx
            self.blocks.register_full_blocks(seq)

    def run_model(self, ids: list[int], positions: list[int], owners: list[int], meta: AttentionMetadata,
                  kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """One forward over a flat batch -> hidden [T, D]; the routing hook (if any) hears of each row's
        request, token and position first."""
        if self.routing_hook is not None:
            self.routing_hook.begin_step(owners, ids, positions)
        with torch.inference_mode():
            return self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                              kv_caches, meta, self.routing_hook)

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
            for stop in p.stop:
                cut = seq.text.find(stop)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    seq.finish_reason = "stop"
                    return
        if token in self.eos_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= seq.max_len:
            seq.finish_reason = "length"
        if seq.finished and self.tokenizer is not None and not live_text:
            seq.text = self.tokenizer.decode_continuation(seq.prompt_ids[-4:], seq.output_ids)
