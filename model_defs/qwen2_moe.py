"""Qwen2-MoE family (Qwen1.5-MoE): Qwen3-MoE's layer rule with q/k/v biases, no qk-norm, a sigmoid-gated shared expert."""

from dataclasses import dataclass

import torch

from model_defs.checkpoint_names import COMMON_RULES, Layout, NameTable, Rule, fused_experts, gqa_rules, swiglu_rules
from model_defs.layers import Rotary
from model_defs.mixtral import GQAttention
from model_defs.moe import MoEBlock, RoutingConfig
from model_defs.qwen3_moe import Qwen3MoeArgs, Qwen3MoeModel


@dataclass(frozen=True)
class Qwen2MoeArgs(Qwen3MoeArgs):
    """Qwen3-MoE's fields (the same sparse-step / mlp-only-layers rule) plus the shared expert and qkv_bias."""
    shared_expert_intermediate_size: int = 5632
    qkv_bias: bool = True
    max_window_layers: int = 28
    model_type: str = "qwen2_moe"

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0


_ATTN, _MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
QWEN2_MOE_NAMES = NameTable(
    rules=COMMON_RULES + gqa_rules(_ATTN, "layers.{i}.attn", qkv_bias=("qkv_bias",)) + (
        Rule(f"{_MLP}.gate.weight", "layers.{i}.mlp.gate", when=("moe",)),
        Rule(f"{_MLP}.shared_expert_gate.weight", "layers.{i}.mlp.shared_gate", when=("shared",)),
    ) + swiglu_rules(f"{_MLP}.shared_expert", "layers.{i}.mlp.shared", when=("shared",))
    + swiglu_rules(_MLP, "layers.{i}.mlp", when=("dense",)),
    layouts=(Layout("per-expert", swiglu_rules(f"{_MLP}.experts.{{e}}", "layers.{i}.mlp")),
             Layout("fused", fused_experts(_MLP, "layers.{i}.mlp"))))


class Qwen2MoeModel(Qwen3MoeModel):
    """Qwen3-MoE's model with Qwen2-MoE's attention (biases, no qk-norm) and gated shared expert."""
    name_table = QWEN2_MOE_NAMES

    @staticmethod
    def attention(args: Qwen2MoeArgs, rotary: Rotary, dtype) -> GQAttention:
        return GQAttention(args, rotary, dtype, qkv_bias=args.qkv_bias)

    @staticmethod
    def moe(args: Qwen2MoeArgs, dtype) -> MoEBlock:
        routing = RoutingConfig(num_experts=args.num_experts, top_k=args.num_experts_per_tok,
                                norm_topk_prob=args.norm_topk_prob)
        return MoEBlock(args.hidden_size, args.moe_intermediate_size, routing,
                        args.shared_expert_intermediate_size, dtype, shared_gate=True)

    def ignored_checkpoint_name(self, name: str) -> bool:
        # Without a shared expert (width 0) transformers still writes its gate, which then scales nothing.
        if not self.args.has_shared_expert and name.endswith(".mlp.shared_expert_gate.weight"):
            return True
        return super().ignored_checkpoint_name(name)
