"""OLMoE family: Mixtral's layers with RMSNorm over the whole q and k projections, optional clip_qkv and biases."""

from dataclasses import dataclass

import torch

from model_defs.base import DecoderLayer
from model_defs.checkpoint_names import COMMON_RULES, Layout, NameTable, Rule, fused_experts, gqa_rules, swiglu_rules
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import Rotary
from model_defs.mixtral import GQAShape, GQAttention, MixtralModel
from model_defs.moe import MoEBlock, RoutingConfig


@dataclass(frozen=True)
class OlmoeArgs(GQAShape):
    vocab_size: int
    hidden_size: int
    intermediate_size: int            # each routed expert's width (OLMoE has no dense layers)
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    model_type: str = "olmoe"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "OlmoeArgs":
        return args_from_hf_config(cls, {"num_experts": cfg.get("num_local_experts"), **cfg})


_ATTN, _MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
OLMOE_NAMES = NameTable(
    rules=COMMON_RULES + gqa_rules(_ATTN, "layers.{i}.attn", qkv_bias=("attention_bias",),
                                   o_bias=("attention_bias",), qk_norm=True)
    + (Rule(f"{_MLP}.gate.weight", "layers.{i}.mlp.gate"),),
    layouts=(Layout("per-expert", swiglu_rules(f"{_MLP}.experts.{{e}}", "layers.{i}.mlp")),
             Layout("fused", fused_experts(_MLP, "layers.{i}.mlp"))))


class OlmoeModel(MixtralModel):
    """Mixtral's model (KV cache, MoE in every layer) with OLMoE's attention."""
    name_table = OLMOE_NAMES

    def __init__(self, args: OlmoeArgs, dtype=torch.float32):
        rotary = Rotary(args.dim_per_head, args.rope_theta, args.rope_scaling,
                        max_position_embeddings=args.max_position_embeddings)
        routing = RoutingConfig(num_experts=args.num_experts, top_k=args.num_experts_per_tok,
                                norm_topk_prob=args.norm_topk_prob)
        layers = [DecoderLayer(GQAttention(args, rotary, dtype, qk_norm="full", qkv_bias=args.attention_bias,
                                           o_bias=args.attention_bias, clip_qkv=args.clip_qkv),
                               MoEBlock(args.hidden_size, args.intermediate_size, routing, dtype=dtype),
                               args.hidden_size, args.rms_norm_eps, dtype)
                  for _ in range(args.num_hidden_layers)]
        super(MixtralModel, self).__init__(args, layers, rotary, dtype)

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings
