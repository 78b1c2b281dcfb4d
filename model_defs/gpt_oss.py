"""gpt-oss family: biased GQA with attention sinks and sliding windows on alternate layers, YaRN, and biased
softmax-top-k experts with a clamped SwiGLU."""

import dataclasses
from dataclasses import dataclass

import torch

import kernels
from kernels.attention import AttentionMetadata
from kernels.linear import linear
from kernels.linear import router_logits as compute_router_logits
from kernels.moe import ClampedSwiGLU
from model_defs.base import DecoderLayer
from model_defs.checkpoint_names import COMMON_RULES, Layout, NameTable, Rows, Rule
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import Rotary, weight
from model_defs.mixtral import GQAShape, GQAttention, MixtralModel
from model_defs.moe import MoEBlock, RoutingConfig, route

# transformers' GptOssConfig default when a config.json names no rope scaling.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


@dataclass(frozen=True)
class GptOssArgs(GQAShape):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    sliding_window: int | None = 128
    layer_types: tuple[str, ...] | list[str] | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: dict | None = None
    attention_bias: bool = True
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False
    model_type: str = "gpt_oss"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "GptOssArgs":
        args = args_from_hf_config(cls, {"num_local_experts": cfg.get("num_experts"), **cfg})
        if args.rope_scaling is None and not _names_default_rope(cfg):
            args = dataclasses.replace(args, rope_scaling=dict(DEFAULT_ROPE))
        return args

    def window(self, i: int) -> int | None:
        """Layer i's sliding window, or None for full attention (transformers: even layers slide)."""
        kind = self.layer_types[i] if self.layer_types else ("sliding_attention" if i % 2 == 0 else "full_attention")
        if kind not in ("sliding_attention", "full_attention"):
            raise ValueError(f"layer_types[{i}]={kind!r} is not supported (sliding_attention, full_attention)")
        return self.sliding_window if kind == "sliding_attention" else None


def _names_default_rope(cfg: dict) -> bool:
    """Whether config.json asks for plain RoPE explicitly (rather than naming no scaling at all)."""
    for key in ("rope_parameters", "rope_scaling"):
        value = cfg.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type")) == "default":
            return True
    return False


class SinkAttention(GQAttention):
    """GQAttention with q/k/v/o biases, one learned sink logit per head, and an optional sliding window."""

    def __init__(self, args: GptOssArgs, rotary: Rotary, window: int | None, dtype):
        super().__init__(args, rotary, dtype)
        rows = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.wqkv_bias = weight(rows, dtype=dtype) if args.attention_bias else None
        self.wo_bias = weight(args.hidden_size, dtype=dtype) if args.attention_bias else None
        self.sinks = weight(self.n_heads, dtype=torch.float32)
        self.window = window

    def forward(self, x: torch.Tensor, angles, kv_cache, meta: AttentionMetadata):
        T, H = x.shape[0], self.n_heads
        qkv = linear(x, self.wqkv, self.wqkv_bias).view(T, H + 2 * self.n_kv, self.head_dim)   # [T, H + 2 Hkv, Dh]
        qk = self.rotary(qkv[:, :H + self.n_kv], angles)                       # q and k heads at once
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + self.n_kv:]
        kernels.write_cache(kv_cache[0], k, meta.slot_mapping)
        kernels.write_cache(kv_cache[1], v, meta.slot_mapping)
        out = kernels.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale, sinks=self.sinks,
                                      window=self.window)                      # [T, H, Dh]
        return linear(out.reshape(T, -1), self.wo, self.wo_bias)


class BiasedMoE(MoEBlock):
    """MoEBlock whose router has a bias added to its logits (softmax over the top k), and experts with
    biases b13 [E, 2I] (gate, then up) and b2 [E, D] and the clamped SwiGLU."""

    def __init__(self, dim: int, intermediate: int, routing: RoutingConfig, activation: ClampedSwiGLU, dtype):
        super().__init__(dim, intermediate, routing, dtype=dtype)
        E = routing.num_experts
        self.router_bias = weight(E, dtype=torch.float32)
        self.b13 = weight(E, 2 * intermediate, dtype=dtype)
        self.b2 = weight(E, dim, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        router_logits = compute_router_logits(x, self.gate) + self.router_bias          # [T, E] float32
        if hook is None:
            topk_weights, topk_ids = route(router_logits, self.routing,
                                           ranked=kernels.ranking_is_free(router_logits))
        else:
            topk_weights, topk_ids = hook.route(self.moe_index, router_logits, self.routing, None)
        return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, b13=self.b13, b2=self.b2,
                                 activation=self.activation)                       # [T, D]


_ATTN, _MLP, _QKV = "model.layers.{i}.self_attn", "model.layers.{i}.mlp", ("q_rows", "kv_rows", "kv_rows")
# Only the fused expert tensors exist for gpt-oss (bf16 as transformers writes them, or MXFP4 as on the hub,
# which the loader dequantises to the same tensors): gate_up_proj [E, D, 2I] with gate and up columns
# interleaved, down_proj [E, I, D]; arrange_checkpoint_tensor puts them in our layout.
GPT_OSS_NAMES = NameTable(
    rules=COMMON_RULES
    + tuple(Rule(f"{_ATTN}.{n}_proj.weight", "layers.{i}.attn.wqkv", Rows(k, _QKV)) for k, n in enumerate("qkv"))
    + tuple(Rule(f"{_ATTN}.{n}_proj.bias", "layers.{i}.attn.wqkv_bias", Rows(k, _QKV), when=("attention_bias",))
            for k, n in enumerate("qkv"))
    + (Rule(f"{_ATTN}.o_proj.weight", "layers.{i}.attn.wo"),
       Rule(f"{_ATTN}.o_proj.bias", "layers.{i}.attn.wo_bias", when=("attention_bias",)),
       Rule(f"{_ATTN}.sinks", "layers.{i}.attn.sinks"),
       Rule(f"{_MLP}.router.weight", "layers.{i}.mlp.gate"),
       Rule(f"{_MLP}.router.bias", "layers.{i}.mlp.router_bias")),
    layouts=(Layout("fused", (
        Rule(f"{_MLP}.experts.gate_up_proj", "layers.{i}.mlp.w13"),
        Rule(f"{_MLP}.experts.gate_up_proj_bias", "layers.{i}.mlp.b13"),
        Rule(f"{_MLP}.experts.down_proj", "layers.{i}.mlp.w2"),
        Rule(f"{_MLP}.experts.down_proj_bias", "layers.{i}.mlp.b2"))),))


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with gate, up alternating (gate at even indices) -> [..., 2I] gate half, then up half."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], -1)


# Checkpoint name suffix -> how its tensor becomes ours (each acts on the trailing axes: any leading expert
# axis may be there or not).
_ARRANGE = {
    "experts.gate_up_proj": lambda t: _deinterleave(t).transpose(-1, -2),   # [E, D, 2I] -> [E, 2I, D]
    "experts.gate_up_proj_bias": _deinterleave,                             # [E, 2I]
    "experts.down_proj": lambda t: t.transpose(-1, -2),                     # [E, I, D] -> [E, D, I]
}


class GptOssModel(MixtralModel):
    """Mixtral's model (KV cache layout) with gpt-oss's layers; every layer is MoE."""
    name_table = GPT_OSS_NAMES

    def __init__(self, args: GptOssArgs, dtype=torch.float32):
        rotary = Rotary(args.dim_per_head, args.rope_theta, args.rope_scaling,
                        max_position_embeddings=args.max_position_embeddings)
        routing = RoutingConfig(num_experts=args.num_local_experts, top_k=args.num_experts_per_tok)
        activation = ClampedSwiGLU(args.swiglu_alpha, args.swiglu_limit)
        layers = [DecoderLayer(SinkAttention(args, rotary, args.window(i), dtype),
                               BiasedMoE(args.hidden_size, args.intermediate_size, routing, activation, dtype),
                               args.hidden_size, args.rms_norm_eps, dtype)
                  for i in range(args.num_hidden_layers)]
        super(MixtralModel, self).__init__(args, layers, rotary, dtype)

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings     # sliding windows are implemented: no cap

    def arrange_checkpoint_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for suffix, arrange in _ARRANGE.items():
            if name.endswith(suffix):
                return arrange(t)
        return t
