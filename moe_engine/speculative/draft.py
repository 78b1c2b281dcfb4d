"""method "draft": another checkpoint with the same vocabulary proposes each request's next k tokens
greedily, through an engine of its own (its own paged cache; all speculating requests in one batch)."""

from moe_engine.errors import MoeEngineError
from moe_engine.sampling import SamplingParams


class DraftModel:
    """A draft engine beside the target's. Each round, every speculating request becomes a draft sequence
    whose prompt is the request's tokens so far; the draft engine's prefix cache holds the full blocks
    of the previous rounds, so a round prefills only the tokens since the last full block (accepted drafts
    and the target's own token) and then decodes k - 1 more, for every request at once."""

    def __init__(self, path, device, dtype, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 tokenizer=None):
        from moe_engine.llm import LLM          # the runtime builds its own draft engine (no import cycle at load)
        self.llm = LLM(path, device=device, dtype=dtype, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, enable_prefix_caching=True)
        draft_vocab = self.llm.model.args.vocab_size
        if draft_vocab != vocab_size:
            raise MoeEngineError(f"the draft model {path} has a vocabulary of {draft_vocab} tokens, the target "
                                 f"{vocab_size}; a draft must share the target's tokenizer (same token ids)")
        theirs = self.llm.tokenizer
        if tokenizer is not None and theirs is not None:       # same size is not enough: same ids, same text
            sample = list(range(3, vocab_size, max(1, vocab_size // 64)))
            if [tokenizer.decode([i]) for i in sample] != [theirs.decode([i]) for i in sample]:
                raise MoeEngineError(f"the draft model {path} has another tokenizer (its token ids mean other "
                                     "text); a draft must share the target's tokenizer")
        self.rounds = 0

    def propose(self, wanted: list[tuple[object, int]]) -> list[list[int]]:
        """Draft tokens for each (request, k): up to k greedy tokens of the draft model after its tokens."""
        self.rounds += 1
        engine = self.llm.engine
        seqs = []
        for seq, k in wanted:
            try:
                seqs.append(self.llm._new_sequence(seq.all_ids, SamplingParams(max_tokens=k, ignore_eos=True)))
            except MoeEngineError:             # e.g. longer than the draft can take: no drafts this time
                seqs.append(None)
        while engine.has_work():
            engine.step()
        return [[] if d is None or d.finish_reason == "error" else list(d.output_ids[:k])
                for d, (_, k) in zip(seqs, wanted)]
