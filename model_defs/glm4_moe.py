"""GLM-4.5 family (glm4_moe): grouped-query attention with a partial rotary, DeepSeek-V3's router and shared experts."""

from dataclasses import dataclass

import torch

from model_defs.base import DecoderLayer
from model_defs.checkpoint_names import COMMON_RULES, Layout, NameTable, Rule, fused_experts, gqa_rules, swiglu_rules
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import Rotary, SwiGLU
from model_defs.mixtral import GQAShape, GQAttention, MixtralModel
from model_defs.moe import MoEBlock, RoutingConfig


@dataclass(frozen=True)
class Glm4MoeArgs(GQAShape):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 0.5
    use_qk_norm: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    model_type: str = "glm4_moe"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "Glm4MoeArgs":
        # Hub configs give partial_rotary_factor at the top; transformers 5 writes it in rope_parameters.
        rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        return args_from_hf_config(cls, {"partial_rotary_factor": rope.get("partial_rotary_factor"),
                                         "n_routed_experts": cfg.get("num_local_experts"), **cfg})

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    def routing(self) -> RoutingConfig:
        """DeepSeek-V3's: sigmoid scores, the correction bias steering the choice within the best groups,
        weights normalised (norm_topk_prob) and then scaled by routed_scaling_factor."""
        return RoutingConfig(num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok, scoring="sigmoid",
                             method="noaux_tc", n_group=self.n_group, topk_group=self.topk_group,
                             norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
                             has_bias=True)


_ATTN, _MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
GLM4_MOE_NAMES = NameTable(
    rules=COMMON_RULES + gqa_rules(_ATTN, "layers.{i}.attn", qkv_bias=("attention_bias",))
    + (Rule(f"{_ATTN}.q_norm.weight", "layers.{i}.attn.q_norm.weight", when=("use_qk_norm",)),
       Rule(f"{_ATTN}.k_norm.weight", "layers.{i}.attn.k_norm.weight", when=("use_qk_norm",)),
       Rule(f"{_MLP}.gate.weight", "layers.{i}.mlp.gate", when=("moe",)),
       Rule(f"{_MLP}.gate.e_score_correction_bias", "layers.{i}.mlp.bias", when=("router_bias",)))
    + swiglu_rules(f"{_MLP}.shared_experts", "layers.{i}.mlp.shared", when=("shared",))
    + swiglu_rules(_MLP, "layers.{i}.mlp", when=("dense",)),
    layouts=(Layout("per-expert", swiglu_rules(f"{_MLP}.experts.{{e}}", "layers.{i}.mlp")),
             Layout("fused", fused_experts(_MLP, "layers.{i}.mlp"))))


class Glm4MoeModel(MixtralModel):
    """Mixtral's model (KV cache) with GLM-4.5's layers: the first first_k_dense_replace dense, the rest MoE
    with shared experts. Multi-token-prediction layers past num_hidden_layers are ignored (CausalLM)."""
    name_table = GLM4_MOE_NAMES

    def __init__(self, args: Glm4MoeArgs, dtype=torch.float32):
        if args.rotary_dim % 2 or not 0 < args.rotary_dim <= args.dim_per_head:
            raise ValueError(f"partial_rotary_factor={args.partial_rotary_factor} of head_dim {args.dim_per_head} "
                             f"gives {args.rotary_dim} rotary channels; it needs an even number up to head_dim")
        rotary = Rotary(args.rotary_dim, args.rope_theta, args.rope_scaling,
                        max_position_embeddings=args.max_position_embeddings)
        routing, shared = args.routing(), args.moe_intermediate_size * args.n_shared_experts
        layers = [DecoderLayer(GQAttention(args, rotary, dtype, qk_norm=args.use_qk_norm,
                                           qkv_bias=args.attention_bias),
                               MoEBlock(args.hidden_size, args.moe_intermediate_size, routing, shared, dtype)
                               if args.is_moe_layer(i) else SwiGLU(args.hidden_size, args.intermediate_size, dtype),
                               args.hidden_size, args.rms_norm_eps, dtype)
                  for i in range(args.num_hidden_layers)]
        super(MixtralModel, self).__init__(args, layers, rotary, dtype)

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings
