"""Mixtral family: grouped-query attention with RoPE, and a softmax top-k sparse MoE in every layer."""

from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels
from kernels.attention import AttentionMetadata
from kernels.linear import linear
from model_defs.base import CausalLM, DecoderLayer, Target, moe_targets
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import Rotary, weight
from model_defs.moe import MoEBlock, RoutingConfig


@dataclass(frozen=True)
class MixtralArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "mixtral"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "MixtralArgs":
        return args_from_hf_config(cls, cfg)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class GQAttention(nn.Module):
    """Grouped-query attention; q, k and v projections stacked in one weight wqkv [(H + 2 Hkv) Dh, D]."""

    def __init__(self, args: MixtralArgs, rotary: Rotary, dtype):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.kv_heads, args.dim_per_head
        self.wqkv = weight((self.n_heads + 2 * self.n_kv) * self.head_dim, args.hidden_size, dtype=dtype)
        self.wo = weight(args.hidden_size, self.n_heads * self.head_dim, dtype=dtype)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, angles, kv_cache, meta: AttentionMetadata):
        """kv_cache: keys at [0], values at [1] (the [2, S, Hkv, Dh] tensor, or its halves from cache_parts)."""
        T, H = x.shape[0], self.n_heads
        qkv = linear(x, self.wqkv).view(T, H + 2 * self.n_kv, self.head_dim)   # [T, H + 2 Hkv, Dh]
        qk = self.rotary(qkv[:, :H + self.n_kv], angles)                      # q and k heads at once
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + self.n_kv:]
        kernels.write_cache(kv_cache[0], k, meta.slot_mapping)
        kernels.write_cache(kv_cache[1], v, meta.slot_mapping)
        out = kernels.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)   # [T, H, Dh]
        return linear(out.reshape(T, -1), self.wo)

    def projections(self) -> list[nn.Parameter]:
        """The weights this module uses only through kernels.linear.linear (see CausalLM.store_weights)."""
        return [self.wqkv, self.wo]

    def targets(self, hf: str, ours: str) -> dict[str, Target]:
        sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        starts = [0, sizes[0], sizes[0] + sizes[1]]
        out = {f"{hf}.{n}_proj.weight": (f"{ours}.wqkv", (slice(s, s + size),))
               for n, s, size in zip("qkv", starts, sizes)}
        out[f"{hf}.o_proj.weight"] = (f"{ours}.wo", None)
        return out


class MixtralModel(CausalLM):
    def __init__(self, args: MixtralArgs, dtype=torch.float32):
        rotary = Rotary(args.dim_per_head, args.rope_theta, args.rope_scaling,
                        max_position_embeddings=args.max_position_embeddings)
        routing = RoutingConfig(num_experts=args.num_local_experts, top_k=args.num_experts_per_tok)
        layers = [DecoderLayer(GQAttention(args, rotary, dtype),
                               MoEBlock(args.hidden_size, args.intermediate_size, routing, dtype=dtype),
                               args.hidden_size, args.rms_norm_eps, dtype)
                  for _ in range(args.num_hidden_layers)]
        super().__init__(args, layers, rotary, dtype)

    @property
    def max_model_len(self) -> int:
        # Sliding-window attention is not implemented: stay inside the window, where it is exact.
        return min(self.args.max_position_embeddings, self.args.sliding_window or 1 << 62)

    def allocate_kv_cache(self, num_slots: int, dtype, device) -> list[torch.Tensor]:
        a = self.args
        return [torch.zeros(2, num_slots, a.kv_heads, a.dim_per_head, dtype=dtype, device=device)
                for _ in range(a.num_hidden_layers)]

    def cache_parts(self, kv_caches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's [2, S, Hkv, Dh] cache as its (keys, values) halves; the layer reads kv_cache[0] and
        kv_cache[1] either way."""
        return [(cache[0], cache[1]) for cache in kv_caches]

    def kv_cache_bytes_per_token(self, dtype) -> int:
        a = self.args
        return 2 * a.kv_heads * a.dim_per_head * a.num_hidden_layers * torch.finfo(dtype).bits // 8

    def checkpoint_targets(self) -> dict[str, Target]:
        out = self.common_targets()
        for i, layer in enumerate(self.layers):
            hf = f"model.layers.{i}"
            out.update(layer.attn.targets(f"{hf}.self_attn", f"layers.{i}.attn"))
            out.update(moe_targets(f"{hf}.block_sparse_moe", f"layers.{i}.mlp", layer.mlp, ("w1", "w3", "w2")))
        return out
