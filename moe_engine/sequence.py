"""One request's state as it moves through the engine."""

from dataclasses import dataclass, field

import torch

from moe_engine.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int                                    # prompt + generated tokens never exceed this
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # block table: logical block i -> physical block
    num_cached: int = 0                             # leading tokens whose cache entries are written
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of its leading full blocks
    finish_reason: str | None = None                # "stop", "length", "abort" or "error"
    error: str | None = None
    text: str = ""
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    streaming: bool = False                         # someone reads .text as it grows
    text_done: int = 0                              # leading output tokens whose text is final in .text
    text_done_len: int = 0                          # ... and how many characters of .text that is
    num_prompt_cached: int = 0                      # prompt tokens found in the prefix cache when first admitted
    logprobs: int | None = None                     # set: record each output token's log-probability and
    token_logprobs: list = field(default_factory=list)  # ... this many alternatives: (logp, [(id, logp)])
    speculative: bool = True                        # may propose drafts (where the engine speculates)
    draft_ids: list[int] = field(default_factory=list)  # drafts proposed for the next step (moe_engine.speculative)
    spec_control: object = None                     # its never-slower state (speculative.control.RequestControl)
    num_draft_tokens: int = 0                       # drafts verified so far
    num_accepted_tokens: int = 0                    # ... and of those accepted

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, position: int) -> int:
        """all_ids[position] without building the whole list."""
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
