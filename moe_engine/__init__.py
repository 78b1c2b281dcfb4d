"""moe-engine: a Mixture-of-Experts LLM inference engine in PyTorch."""

import importlib

__version__ = "0.3.0"
__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "generate", "MoeEngineError", "__version__"]

# Where each public name lives. Imported on first use, so `moe-engine` starts (and answers Ctrl-C, --help)
# before torch is loaded.
_HOMES = {"EngineConfig": "moe_engine.config", "MoeEngineError": "moe_engine.errors", "LLM": "moe_engine.llm",
          "RequestOutput": "moe_engine.llm", "generate": "moe_engine.llm", "SamplingParams": "moe_engine.sampling"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'moe_engine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
