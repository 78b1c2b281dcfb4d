"""method "mtp": DeepSeek-V3's multi-token-prediction layer (model_defs.deepseek.MultiTokenPredictor) drafts
each request's next tokens from the target's own hidden states, greedily, with a one-layer cache of its own.

Position convention (as vLLM's deepseek_mtp and SGLang's deepseek_nextn): the MTP entry at position p is
computed from the target's hidden state h_p (after its final norm) and the token t_{p+1}, at rotary
position p, and predicts t_{p+2}. After every target step (observe) the MTP runs over the rows the step
kept (prefill chunks, decode tokens, a verify step's accepted rows: positions below seq.num_cached, whose
next token is known), writing its cache at the target's slots (the same block tables) and keeping, per
request, its output at the last of them: that is the first draft. Draft j > 1 chains the module on its own
output (before shared_head.norm, as vLLM does) and draft j - 1, at the next position; those chained
entries are provisional and the next observe overwrites them with the target's (rejected ones lie past
the context, never read). Positions past a sequence's own blocks go to scratch blocks after the target's.

Prefix caching is turned off under this method: an MTP entry at a block's last position depends on the
next block's first token, so a shared block would hold one sequence's entry for another.
"""

import torch
import torch.nn.functional as F

from kernels.attention import AttentionMetadata
from moe_engine.block_manager import blocks_for
from moe_engine.checkpoint import index_tensors, read_config, safetensors_files
from moe_engine.errors import MoeEngineError


def mtp_model_kwargs(path) -> dict:
    """The model keyword that makes the loader build and load the MTP layer; one line where there is none."""
    _, cfg = read_config(path)
    n = cfg.get("num_nextn_predict_layers") or 0
    if cfg.get("model_type") not in ("deepseek_v3", "kimi_k2") or not isinstance(n, int) or n < 1:
        raise MoeEngineError(f"speculative method 'mtp' needs a DeepSeek-V3 checkpoint with multi-token-prediction "
                             f"layers (config.json num_nextn_predict_layers >= 1); {path} has model_type "
                             f"{cfg.get('model_type')!r}, num_nextn_predict_layers={n!r}: use method 'ngram' or "
                             "'draft' for it")
    layer = f"model.layers.{cfg.get('num_hidden_layers')}."
    if not any(name.startswith(layer) for name in index_tensors(safetensors_files(path))):
        raise MoeEngineError(f"speculative method 'mtp': config.json in {path} has num_nextn_predict_layers={n} but "
                             f"the checkpoint holds no {layer}* tensors (the MTP layer; transformers-saved and many "
                             "quantized copies leave it out): use a checkpoint that has it, or method 'ngram'")
    return {"mtp": True}


class MTPProposer:
    """The MTP layer beside the target: its cache (one MLA layer's, as many slots as the target's plus
    scratch blocks for chained drafts) and, per request, the first draft observe left for it."""

    def __init__(self, engine, model, max_num_seqs: int, k_max: int, max_model_len: int):
        if getattr(model, "mtp", None) is None:
            raise MoeEngineError("speculative method 'mtp' needs the model's multi-token-prediction layer: load a "
                                 "DeepSeek-V3 checkpoint with num_nextn_predict_layers >= 1 through LLM(path, "
                                 "speculative_config={'method': 'mtp'})")
        self.mtp, self.embed = model.mtp, model.embed
        self.eager = getattr(engine.runner, "eager", engine.runner)
        self.eager.keep_hidden = True          # every step through the eager runner, which keeps its hidden rows
        engine.blocks.enable_prefix_caching = False    # see the module docstring
        self.block_size, self.max_model_len = engine.block_size, max_model_len
        self.device = engine.device
        self.scratch_per_seq = blocks_for(k_max, self.block_size)
        self.first_scratch = engine.blocks.num_blocks + 1      # after the target's blocks and its padding block
        num_slots = (self.first_scratch + max_num_seqs * self.scratch_per_seq) * self.block_size
        a = model.args
        self.cache = torch.zeros(num_slots, a.kv_lora_rank + a.qk_rope_head_dim, dtype=model.embed.dtype,
                                 device=self.device)
        self.first: dict[int, tuple[int, torch.Tensor, int]] = {}   # request id -> (position, output [D], draft)
        self.rounds = 0

    def _run(self, ids: list[int], hidden: torch.Tensor, positions: list[int], tables: list[list[int]],
             context_lens: list[int], query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP over flat rows -> (output at each sequence's last row [B, D], its greedy token [B])."""
        meta = AttentionMetadata.build(tables, context_lens, query_lens, self.block_size, self.device,
                                       self.max_model_len)
        with torch.inference_mode():
            embeds = F.embedding(torch.tensor(ids, device=self.device), self.embed)              # [T, D]
            out = self.mtp(embeds, hidden.to(embeds.dtype), torch.tensor(positions, device=self.device),
                           self.cache, meta)                                                   # [T, D]
            last = out[torch.tensor(meta.query_start_loc[1:], device=self.device) - 1]         # [B, D]
            return last, self.mtp.compute_logits(last).argmax(-1)

    def observe(self, engine, batch) -> None:
        """After a target step: the MTP over the rows it kept, for every speculating sequence still running."""
        step, self.eager.last_hidden = self.eager.last_hidden, None
        if step is None:
            return
        hidden, positions, starts = step
        rows, ids, pos, tables, ctx, qlens, owners = [], [], [], [], [], [], []
        for i, seq in enumerate(batch.seqs):
            first = positions[starts[i]] if starts[i] < starts[i + 1] else 0
            n = min(starts[i + 1] - starts[i], seq.num_cached - first)     # rows below num_cached: kept
            if not seq.speculative or seq.finished or n <= 0:
                continue
            rows += range(starts[i], starts[i] + n)
            ids += seq.all_ids[first + 1:first + 1 + n]                     # t_{p+1} for each row p
            pos += range(first, first + n)
            tables.append(seq.blocks)
            ctx.append(first + n)
            qlens.append(n)
            owners.append(seq)
        live = {s.request_id for s in engine.scheduler.running}
        self.first = {r: v for r, v in self.first.items() if r in live}
        if not owners:
            return
        last, tokens = self._run(ids, hidden[torch.tensor(rows, device=hidden.device)], pos, tables, ctx, qlens)
        for j, (seq, c) in enumerate(zip(owners, ctx)):
            self.first[seq.request_id] = (c - 1, last[j], int(tokens[j]))

    def propose(self, wanted: list[tuple[object, int]]) -> list[list[int]]:
        """Up to k greedy drafts for each (request, k): the first from observe, then k - 1 chained steps
        for every request at once. A request observe has not caught up with gets none."""
        self.rounds += 1
        drafts, chains = [], []
        for g, (seq, k) in enumerate(wanted):
            got = self.first.get(seq.request_id)
            if got is None or got[0] != seq.num_cached - 1:
                drafts.append([])
                continue
            drafts.append([got[2]])
            if k > 1:
                scratch = range(self.first_scratch + g * self.scratch_per_seq,
                                self.first_scratch + (g + 1) * self.scratch_per_seq)
                chains.append([g, seq, k, got[1], seq.blocks + list(scratch)])
        while chains:
            positions = [seq.num_cached - 1 + len(drafts[g]) for g, seq, *_ in chains]
            tables = [table[:blocks_for(p + 1, self.block_size)] for (*_, table), p in zip(chains, positions)]
            hidden = torch.stack([c[3] for c in chains])                                   # [B, D]
            last, tokens = self._run([drafts[c[0]][-1] for c in chains], hidden, positions, tables,
                                     [p + 1 for p in positions], [1] * len(chains))
            for c, h, t in zip(chains, last, tokens.tolist()):
                drafts[c[0]].append(t)
                c[3] = h
            chains = [c for c in chains if len(drafts[c[0]]) < c[2]]
        return drafts
