"""Qwen3-MoE family: Mixtral's grouped-query attention with a per-head q/k RMSNorm, softmax top-k experts."""

from dataclasses import dataclass

import torch

from model_defs.base import DecoderLayer
from model_defs.checkpoint_names import COMMON_RULES, Layout, NameTable, Rows, Rule, fused_experts, swiglu_rules
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import Rotary, SwiGLU
from model_defs.mixtral import GQAShape, GQAttention, MixtralModel
from model_defs.moe import MoEBlock, RoutingConfig


@dataclass(frozen=True)
class Qwen3MoeArgs(GQAShape):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] | list[int] = ()
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "qwen3_moe"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "Qwen3MoeArgs":
        # Hub configs say num_experts; transformers 5 writes it as num_local_experts.
        return args_from_hf_config(cls, {"num_experts": cfg.get("num_local_experts"), **cfg})

    def is_moe_layer(self, i: int) -> bool:
        """As transformers' Qwen3Moe: sparse every decoder_sparse_step-th layer, except mlp_only_layers."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0


_ATTN, _MLP, _QKV = "model.layers.{i}.self_attn", "model.layers.{i}.mlp", ("q_rows", "kv_rows", "kv_rows")
QWEN3_MOE_NAMES = NameTable(
    rules=COMMON_RULES + tuple(Rule(f"{_ATTN}.{n}_proj.weight", "layers.{i}.attn.wqkv", Rows(k, _QKV))
                               for k, n in enumerate("qkv")) + (
        Rule(f"{_ATTN}.o_proj.weight", "layers.{i}.attn.wo"),
        Rule(f"{_ATTN}.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
        Rule(f"{_ATTN}.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
        Rule(f"{_MLP}.gate.weight", "layers.{i}.mlp.gate", when=("moe",)),
    ) + swiglu_rules(_MLP, "layers.{i}.mlp", when=("dense",)),
    layouts=(Layout("per-expert", swiglu_rules(f"{_MLP}.experts.{{e}}", "layers.{i}.mlp")),
             Layout("fused", fused_experts(_MLP, "layers.{i}.mlp"))))


class Qwen3MoeModel(MixtralModel):
    """Mixtral's model (KV cache, window) with Qwen3's layers: qk-norm attention, dense layers among MoE ones.
    Families built the same way (Qwen2-MoE) override attention() and moe()."""
    name_table = QWEN3_MOE_NAMES

    def __init__(self, args: Qwen3MoeArgs, dtype=torch.float32):
        rotary = Rotary(args.dim_per_head, args.rope_theta, args.rope_scaling,
                        max_position_embeddings=args.max_position_embeddings)
        layers = [DecoderLayer(self.attention(args, rotary, dtype),
                               self.moe(args, dtype) if args.is_moe_layer(i)
                               else SwiGLU(args.hidden_size, args.intermediate_size, dtype),
                               args.hidden_size, args.rms_norm_eps, dtype)
                  for i in range(args.num_hidden_layers)]
        super(MixtralModel, self).__init__(args, layers, rotary, dtype)

    @staticmethod
    def attention(args, rotary: Rotary, dtype) -> GQAttention:
        if args.attention_bias:
            raise ValueError("attention_bias=true is not supported for qwen3_moe")
        return GQAttention(args, rotary, dtype, qk_norm=True)

    @staticmethod
    def moe(args, dtype) -> MoEBlock:
        routing = RoutingConfig(num_experts=args.num_experts, top_k=args.num_experts_per_tok,
                                norm_topk_prob=args.norm_topk_prob)
        return MoEBlock(args.hidden_size, args.moe_intermediate_size, routing, dtype=dtype)

    @property
    def max_model_len(self) -> int:
        window = self.args.sliding_window if self.args.use_sliding_window else None
        return min(self.args.max_position_embeddings, window or 1 << 62)
