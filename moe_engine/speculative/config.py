"""speculative_config={"method": ..., "num_speculative_tokens": k, ...} (vLLM's names), validated."""

import os
from dataclasses import dataclass

from moe_engine.errors import MoeEngineError

METHODS = ("ngram", "draft", "self", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method "ngram": prompt lookup over the request's own tokens (the longest suffix of prompt_lookup_max
    down to prompt_lookup_min tokens that occurred before, its most recent occurrence; the k tokens after
    it are the drafts). method "draft": another checkpoint, `model` (a folder; same vocabulary), drafts k
    tokens greedily with an engine of its own (moe_engine.speculative.draft). method "self": the MoE model
    drafts for itself routing each token to its best `draft_top_k` experts (default 1; below the model's
    own top_k) and, with `draft_layers`, only that many of its decoder layers, in its own cache slots
    (moe_engine.speculative.self_draft). method "mtp": a DeepSeek-V3 checkpoint's multi-token-prediction
    layer drafts k tokens greedily from the target's hidden states (moe_engine.speculative.mtp).
    adaptive: the never-slower control (moe_engine.speculative.control) shortens k or
    turns speculation off for a request while its verify steps do not pay; False speculates always."""
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    adaptive: bool = True
    model: str | None = None
    draft_top_k: int | None = None
    draft_layers: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoeEngineError(f"bad speculative_config method={self.method!r}: must be one of {', '.join(METHODS)}")
        for name, low in (("num_speculative_tokens", 1), ("prompt_lookup_min", 1), ("prompt_lookup_max", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 64:
                raise MoeEngineError(f"bad speculative_config {name}={v!r}: must be an integer in [{low}, 64]")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise MoeEngineError(f"bad speculative_config: prompt_lookup_min={self.prompt_lookup_min} is above "
                                 f"prompt_lookup_max={self.prompt_lookup_max}; make min <= max")
        if self.method == "draft" and not isinstance(self.model, (str, os.PathLike)):
            raise MoeEngineError("speculative_config method='draft' needs model: the draft checkpoint's folder "
                                 "(same vocabulary as the target), e.g. {'method': 'draft', 'model': 'weights/tiny-mixtral'}")
        if self.method != "draft" and self.model is not None:
            raise MoeEngineError(f"speculative_config model= is for method='draft', not {self.method!r}; drop it")
        for name, low, what in (("draft_top_k", 1, "below the model's experts per token"),
                                ("draft_layers", 2, "at most the model's decoder layers")):
            v = getattr(self, name)
            if v is None:
                continue
            if self.method != "self":
                raise MoeEngineError(f"speculative_config {name}= is for method='self', not {self.method!r}; drop it")
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 1024:
                raise MoeEngineError(f"bad speculative_config {name}={v!r}: must be an integer, at least {low} and {what}")
        if not isinstance(self.adaptive, bool):
            raise MoeEngineError(f"bad speculative_config adaptive={self.adaptive!r}: must be True or False")

    @classmethod
    def of(cls, value) -> "SpeculativeConfig | None":
        """A SpeculativeConfig from a dict (or one already built, or None)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise MoeEngineError(f"speculative_config must be a dict such as {{'method': 'ngram', "
                                 f"'num_speculative_tokens': 3}}, got {type(value).__name__}")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - names)
        if unknown:
            raise MoeEngineError(f"unknown speculative_config key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "method" not in value:
            raise MoeEngineError(f"speculative_config needs a method: one of {', '.join(METHODS)}")
        return cls(**value)


def parse_speculative(text: str) -> dict:
    """The command line's --speculative METHOD[:K] (draft: draft=DIR[:K]; self: self[=TOPK][:K], TOPK being
    draft_top_k) -> a speculative_config dict."""
    method, _, k = text.partition(":")
    method, _, model = method.partition("=")
    config = {"method": method} if not model else {"method": method, "model": model}
    if method == "self" and model:
        if not model.isdigit():
            raise MoeEngineError(f"bad --speculative {text!r}: self=TOPK takes the draft's experts per token, "
                                 "a whole number, as in self=1:3")
        config = {"method": method, "draft_top_k": int(model)}
    if k:
        if not k.isdigit():
            raise MoeEngineError(f"bad --speculative {text!r}: K must be a whole number, as in ngram:3 or "
                                 "draft=weights/tiny-mixtral:3")
        config["num_speculative_tokens"] = int(k)
    SpeculativeConfig.of(config)
    return config
