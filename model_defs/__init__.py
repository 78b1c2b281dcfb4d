"""Model architectures, looked up by the `model_type` of a Hugging Face config.json."""

from model_defs.deepseek import DeepseekArgs, DeepseekModel
from model_defs.errors import MoeEngineError
from model_defs.gpt_oss import GptOssArgs, GptOssModel
from model_defs.glm4_moe import Glm4MoeArgs, Glm4MoeModel
from model_defs.mixtral import MixtralArgs, MixtralModel
from model_defs.olmoe import OlmoeArgs, OlmoeModel
from model_defs.qwen2_moe import Qwen2MoeArgs, Qwen2MoeModel
from model_defs.qwen3_moe import Qwen3MoeArgs, Qwen3MoeModel

# model_type -> (args dataclass, model class). Read-only; add a family by adding a line.
REGISTRY = {
    "mixtral": (MixtralArgs, MixtralModel),
    "deepseek_v2": (DeepseekArgs, DeepseekModel),
    "deepseek_v3": (DeepseekArgs, DeepseekModel),
    "kimi_k2": (DeepseekArgs, DeepseekModel),        # DeepSeek-V3's architecture (its config says so)
    "qwen3_moe": (Qwen3MoeArgs, Qwen3MoeModel),
    "qwen2_moe": (Qwen2MoeArgs, Qwen2MoeModel),
    "olmoe": (OlmoeArgs, OlmoeModel),
    "glm4_moe": (Glm4MoeArgs, Glm4MoeModel),
    "gpt_oss": (GptOssArgs, GptOssModel),
}


def model_family(model_type: str | None):
    """(args class, model class) for a config's model_type, or a clear error naming what is supported."""
    if model_type not in REGISTRY:
        raise MoeEngineError(f"unknown model_type {model_type!r} in config.json; supported: "
                             f"{', '.join(sorted(REGISTRY))}")
    return REGISTRY[model_type]


__all__ = ["REGISTRY", "model_family", "MoeEngineError", "MixtralArgs", "MixtralModel",
           "DeepseekArgs", "DeepseekModel", "Qwen3MoeArgs", "Qwen3MoeModel",
           "Qwen2MoeArgs", "Qwen2MoeModel", "OlmoeArgs", "OlmoeModel", "Glm4MoeArgs", "Glm4MoeModel",
           "GptOssArgs", "GptOssModel"]
