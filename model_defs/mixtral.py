"""Mixtral family: grouped-query attention with RoPE, and a softmax top-k sparse MoE in every layer."""

from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels
from kernels.attention import AttentionMetadata
from kernels.kv_quant import CachePart, KVCacheLayout, QuantizedCache
from kernels.linear import linear
from model_defs.base import CausalLM, DecoderLayer
from model_defs.checkpoint_names import COMMON_RULES, Layout, NameTable, Rows, Rule, fused_experts, swiglu_rules
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import RMSNorm, Rotary, weight
from model_defs.moe import MoEBlock, RoutingConfig


class GQAShape:
    """Head geometry of a grouped-query-attention Args (fields num_attention_heads, num_key_value_heads,
    head_dim, hidden_size), and the row counts its q/k/v Rows name."""

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_rows(self) -> int:
        return self.num_attention_heads * self.dim_per_head

    @property
    def kv_rows(self) -> int:
        return self.kv_heads * self.dim_per_head


@dataclass(frozen=True)
class MixtralArgs(GQAShape):
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


_ATTN, _QKV = "model.layers.{i}.self_attn", ("q_rows", "kv_rows", "kv_rows")
# Hub checkpoints name the block block_sparse_moe, one tensor per expert; transformers 5 holds it as mlp
# with the experts fused (its state_dict, which a checkpoint may be written from).
MIXTRAL_NAMES = NameTable(
    rules=COMMON_RULES + tuple(Rule(f"{_ATTN}.{n}_proj.weight", "layers.{i}.attn.wqkv", Rows(k, _QKV))
                               for k, n in enumerate("qkv"))
    + (Rule(f"{_ATTN}.o_proj.weight", "layers.{i}.attn.wo"),),
    layouts=(
        Layout("per-expert", (Rule("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.gate"),)
               + swiglu_rules("model.layers.{i}.block_sparse_moe.experts.{e}", "layers.{i}.mlp", ("w1", "w3", "w2"))),
        Layout("fused", (Rule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.gate"),)
               + fused_experts("model.layers.{i}.mlp", "layers.{i}.mlp")),
    ))


class GQAttention(nn.Module):
    """Grouped-query attention; q, k and v projections stacked in one weight wqkv [(H + 2 Hkv) Dh, D].
    qk_norm: "head" (or True): a per-head RMSNorm of q and k before RoPE (Qwen3, GLM); "full": one RMSNorm
    over the whole q and the whole k projection, before the head split (OLMoE); args then needs rms_norm_eps.
    qkv_bias / o_bias: biases of the stacked projection (wqkv_bias, stacked like wqkv) and of wo (wo_bias).
    clip_qkv: q, k (after their norm) and v clamped to [-clip_qkv, clip_qkv] (OLMoE). A partial rotary
    (GLM) is the Rotary's: it rotates the first channels of each head."""

    def __init__(self, args: MixtralArgs, rotary: Rotary, dtype, qk_norm: bool | str = False,
                 qkv_bias: bool = False, o_bias: bool = False, clip_qkv: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.kv_heads, args.dim_per_head
        rows = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.wqkv = weight(rows, args.hidden_size, dtype=dtype)
        self.wo = weight(args.hidden_size, self.n_heads * self.head_dim, dtype=dtype)
        self.wqkv_bias = weight(rows, dtype=dtype) if qkv_bias else None
        self.wo_bias = weight(args.hidden_size, dtype=dtype) if o_bias else None
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5
        self.qk_norm = "head" if qk_norm is True else (qk_norm or None)
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm={qk_norm!r} is not one of head, full")
        full = self.qk_norm == "full"
        q_dim, k_dim = (self.n_heads * self.head_dim, self.n_kv * self.head_dim) if full else (self.head_dim,) * 2
        self.q_norm = RMSNorm(q_dim, args.rms_norm_eps, dtype) if self.qk_norm else None
        self.k_norm = RMSNorm(k_dim, args.rms_norm_eps, dtype) if self.qk_norm else None
        self.clip_qkv = clip_qkv

    def forward(self, x: torch.Tensor, angles, kv_cache, meta: AttentionMetadata):
        """kv_cache: keys at [0], values at [1] (the [2, S, Hkv, Dh] tensor, or its halves from cache_parts)."""
        T, H, Dh = x.shape[0], self.n_heads, self.head_dim
        qkv = linear(x, self.wqkv, self.wqkv_bias)                             # [T, (H + 2 Hkv) Dh]
        if self.qk_norm == "full":
            q, k, v = qkv.split([H * Dh, self.n_kv * Dh, self.n_kv * Dh], -1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], -1)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qkv = qkv.view(T, H + 2 * self.n_kv, Dh)                               # [T, H + 2 Hkv, Dh]
        qk = qkv[:, :H + self.n_kv]                                           # [T, H + Hkv, Dh]
        if self.qk_norm == "head":
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], 1)
        qk = self.rotary(qk, angles)                                           # q and k heads at once
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + self.n_kv:]
        kernels.write_cache(kv_cache[0], k, meta.slot_mapping)
        kernels.write_cache(kv_cache[1], v, meta.slot_mapping)
        out = kernels.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)   # [T, H, Dh]
        return linear(out.reshape(T, -1), self.wo, self.wo_bias)

    def projections(self) -> list[nn.Parameter]:
        """The weights this module uses only through kernels.linear.linear (see CausalLM.store_weights)."""
        return [self.wqkv, self.wo]


class MixtralModel(CausalLM):
    name_table = MIXTRAL_NAMES

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

    def kv_cache_layout(self, dtype, kv_cache_dtype: str = "auto") -> KVCacheLayout:
        """Keys and values per KV head; compressed, one scale per token and head (int4: per group of 64 values
        with a zero point, kernels.kv_quant.int4_group)."""
        a = self.args
        return KVCacheLayout((CachePart("k", a.kv_heads, a.dim_per_head), CachePart("v", a.kv_heads, a.dim_per_head)),
                             a.num_hidden_layers, dtype, kv_cache_dtype)

    def allocate_kv_cache(self, num_slots: int, dtype, device, kv_cache_dtype: str = "auto",
                          kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list:
        """Per layer the [2, S, Hkv, Dh] tensor; compressed, a (keys, values) pair of QuantizedCaches.
        kv_scales (fp8 / int8): per layer the (keys', values') scales [Hkv] every token is written with (a
        checkpoint's k_scale / v_scale) instead of scales computed per token and head."""
        a = self.args
        if kv_scales is not None and len(kv_scales) != a.num_hidden_layers:
            raise ValueError(f"kv_scales holds {len(kv_scales)} layers, the model {a.num_hidden_layers}")
        if kv_cache_dtype != "auto":
            layout = self.kv_cache_layout(dtype, kv_cache_dtype)
            group = layout.group(layout.parts[0])
            return [tuple(QuantizedCache.empty(num_slots, a.kv_heads, a.dim_per_head, group, kv_cache_dtype,
                                               dtype, device, fixed_scale=None if kv_scales is None else s)
                          for s in (kv_scales[i] if kv_scales is not None else (None, None)))
                    for i in range(a.num_hidden_layers)]
        if kv_scales is not None:
            raise ValueError("kv_scales apply to a compressed cache (kv_cache_dtype fp8 / int8), not to 'auto'")
        return [torch.zeros(2, num_slots, a.kv_heads, a.dim_per_head, dtype=dtype, device=device)
                for _ in range(a.num_hidden_layers)]

    def cache_parts(self, kv_caches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's [2, S, Hkv, Dh] cache as its (keys, values) halves; the layer reads kv_cache[0] and
        kv_cache[1] either way."""
        return [(cache[0], cache[1]) for cache in kv_caches]

    def kv_cache_bytes_per_token(self, dtype, kv_cache_dtype: str = "auto") -> int:
        return self.kv_cache_layout(dtype, kv_cache_dtype).bytes_per_token
