"""speculative_config={"method": ..., "num_speculative_tokens": k, ...} (vLLM's names), validated."""

from dataclasses import dataclass

from moe_engine.errors import MoeEngineError

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """method "ngram": prompt lookup over the request's own tokens (the longest suffix of prompt_lookup_max
    down to prompt_lookup_min tokens that occurred before, its most recent occurrence; the k tokens after
    it are the drafts). adaptive: the never-slower control (moe_engine.speculative.control) shortens k or
    turns speculation off for a request while its verify steps do not pay; False speculates always."""
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    adaptive: bool = True

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
    """The command line's --speculative METHOD[:K] -> a speculative_config dict."""
    method, _, k = text.partition(":")
    config = {"method": method}
    if k:
        if not k.isdigit():
            raise MoeEngineError(f"bad --speculative {text!r}: K must be a whole number, as in ngram:3")
        config["num_speculative_tokens"] = int(k)
    SpeculativeConfig.of(config)
    return config
