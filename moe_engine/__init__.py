"""moe-engine: a Mixture-of-Experts LLM inference engine in PyTorch."""

from moe_engine.config import EngineConfig
from moe_engine.errors import MoeEngineError
from moe_engine.llm import LLM, RequestOutput, generate
from moe_engine.sampling import SamplingParams

__version__ = "0.3.0"
__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "generate", "MoeEngineError", "__version__"]
