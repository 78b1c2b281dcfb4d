"""Model architectures, looked up by the `model_type` of a Hugging Face config.json."""

from model_defs.deepseek import DeepseekArgs, DeepseekModel
from model_defs.errors import MoeEngineError
from model_defs.gpt_oss import GptOssArgs, GptOssModel
from model_defs.mixtral import MixtralArgs, MixtralModel
from model_defs.qwen3_moe import Qwen3MoeArgs, Qwen3MoeModel

# model_type -> (args dataclass, model class). Read-only; add a family by adding a line.
REGISTRY = {
    "mixtral": (MixtralArgs, MixtralModel),
    "deepseek_v2": (DeepseekArgs, DeepseekModel),
    "deepseek_v3": (DeepseekArgs, DeepseekModel),
    "kimi_k2": (DeepseekArgs, DeepseekModel),        # DeepSeek-V3's architecture (its config says so)
    "qwen3_moe": (Qwen3MoeArgs, Qwen3MoeModel),
    "gpt_oss": (GptOssArgs, GptOssModel),
}


def model_family(model_type: str | None):
    """(args class, model class) for a config's model_type, or a clear error naming what is supported."""
    if model_type not in REGISTRY:
        raise MoeEngineError(f"unknown model_type {model_type!r} in config.json; supported: "
                             f"{', '.join(sorted(REGISTRY))}")
    return REGISTRY[model_type]


__all__ = ["REGISTRY", "model_family", "MoeEngineError", "MixtralArgs", "MixtralModel",
           "DeepseekArgs", "DeepseekModel", "Qwen3MoeArgs", "Qwen3MoeModel", "GptOssArgs", "GptOssModel"]
