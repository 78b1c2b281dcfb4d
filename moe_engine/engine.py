"""The engine loop: sequences, admission against free cache blocks, one batched forward per step."""

from collections import deque
from dataclasses import dataclass, field

import torch

from kernels.attention import AttentionMetadata
from moe_engine.errors import MoeEngineError
from moe_engine.kv_cache import BlockAllocator, blocks_for
from moe_engine.sampling import SamplingParams, sample_token


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int                                    # prompt + generated tokens never exceed this
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0                             # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str = ""
    generator: torch.Generator | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def blocks_needed(self, block_size: int) -> int:
        return blocks_for(min(len(self.prompt_ids) + self.params.max_tokens, self.max_len), block_size)


class Engine:
    """Admits waiting sequences while their whole cache footprint fits (so a running sequence never runs
    out of blocks), prefills new ones together, then decodes all running ones together."""

    def __init__(self, model, kv_caches, num_blocks: int, block_size: int, device, tokenizer=None,
                 max_num_seqs: int = 64):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.allocator = BlockAllocator(num_blocks)
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        need = seq.blocks_needed(self.block_size)
        if need > self.allocator.num_blocks:
            raise MoeEngineError(f"request {seq.request_id} needs {need} cache blocks "
                                 f"({len(seq.prompt_ids)} prompt tokens + max_tokens {seq.params.max_tokens}) "
                                 f"but the cache has {self.allocator.num_blocks}; lower max_tokens or give "
                                 "the cache more memory (num_kv_blocks / kv_cache_bytes)")
        if seq.params.seed is not None:
            seq.generator = torch.Generator().manual_seed(seq.params.seed)
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request (e.g. a cancelled stream) and give its blocks back."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.release(seq.blocks)
        seq.finish_reason = seq.finish_reason or "abort"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            need = self.waiting[0].blocks_needed(self.block_size)
            if need > self.allocator.num_free:
                break
            seq = self.waiting.popleft()
            seq.blocks = self.allocator.allocate(need)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def step(self) -> list[tuple[Sequence, int]]:
        """Run one forward; returns (sequence, new token) for every sequence that produced one."""
        batch = self._admit() or [s for s in self.running if not s.finished]
        if not batch:
            return []
        logits = self.forward(batch)                                        # [B, V]
        produced = []
        for seq, row in zip(batch, logits):
            token = sample_token(row, seq.params, seq.all_ids, seq.generator)
            seq.output_ids.append(token)
            self._check_finished(seq, token)
            produced.append((seq, token))
        for seq in [s for s in self.running if s.finished]:
            self.allocator.release(seq.blocks)
            self.running.remove(seq)
        return produced

    def forward(self, batch: list[Sequence]) -> torch.Tensor:
        """Feed every not-yet-cached token of each sequence; logits of each sequence's last token."""
        ids, positions, query_lens = [], [], []
        for seq in batch:
            new = seq.all_ids[seq.num_cached:]
            ids += new
            positions += range(seq.num_cached, seq.num_cached + len(new))
            query_lens.append(len(new))
        context_lens = [s.num_cached + n for s, n in zip(batch, query_lens)]
        meta = AttentionMetadata.build([s.blocks for s in batch], context_lens, query_lens,
                                       self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                self.kv_caches, meta)                        # [T, D]
            last = torch.tensor(meta.query_start_loc[1:], device=self.device) - 1
            logits = self.model.compute_logits(hidden[last])                # [B, V]
        for seq, ctx in zip(batch, context_lens):
            seq.num_cached = ctx
        return logits

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids)
            for stop in p.stop:
                cut = seq.text.find(stop)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    seq.finish_reason = "stop"
                    return
        eos = self.tokenizer.eos_ids if self.tokenizer is not None else set()
        if token in eos and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq.all_ids) >= seq.max_len:
            seq.finish_reason = "length"
