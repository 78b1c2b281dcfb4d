"""DeepSeek-V2/V3 family: multi-head latent attention (MLA) and DeepSeek routing with shared experts."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.attention import AttentionMetadata, causal_attention
from kernels.kv_quant import CachePart, KVCacheLayout, QuantizedCache
from kernels.linear import linear
from model_defs.base import CausalLM, DecoderLayer
from model_defs.checkpoint_names import (COMMON_RULES, Layout, NameTable, Rows, Rule, Target, expand_extra_layer,
                                         fused_experts, swiglu_rules)
from model_defs.hf_config import args_from_hf_config
from model_defs.layers import RMSNorm, Rotary, SwiGLU, weight, yarn_mscale
from model_defs.moe import MoEBlock, RoutingConfig

# Published defaults that differ between the two generations (used only when config.json omits them).
_DEFAULTS = {
    "deepseek_v2": {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False},
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True},
    "kimi_k2": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True},
}


@dataclass(frozen=True)
class DeepseekArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    model_type: str
    q_lora_rank: int | None = None
    moe_intermediate_size: int | None = None
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "DeepseekArgs":
        return args_from_hf_config(cls, cfg, _DEFAULTS.get(cfg.get("model_type"), {}))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def q_a_rows(self) -> int:
        """Rows of wq_kv_a from q (or q_a with a q LoRA); kv_a_rows follow them."""
        return self.q_lora_rank or self.num_attention_heads * self.qk_head_dim

    @property
    def kv_a_rows(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def routing(self) -> RoutingConfig:
        return RoutingConfig(
            num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok, scoring=self.scoring_func,
            method=self.topk_method, n_group=self.n_group or 1, topk_group=self.topk_group or 1,
            norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
            scale_normalized=self.model_type != "deepseek_v2", has_bias=self.topk_method == "noaux_tc")


_ATTN, _OURS, _MLP = "model.layers.{i}.self_attn", "layers.{i}.attn", "model.layers.{i}.mlp"
_Q, _KV = Rows(0, ("q_a_rows", "kv_a_rows")), Rows(1, ("q_a_rows", "kv_a_rows"))
DEEPSEEK_NAMES = NameTable(
    rules=COMMON_RULES + (
        Rule(f"{_ATTN}.q_proj.weight", f"{_OURS}.wq_kv_a", _Q, ("!q_lora_rank",)),
        Rule(f"{_ATTN}.q_a_proj.weight", f"{_OURS}.wq_kv_a", _Q, ("q_lora_rank",)),
        Rule(f"{_ATTN}.kv_a_proj_with_mqa.weight", f"{_OURS}.wq_kv_a", _KV),
        Rule(f"{_ATTN}.q_a_layernorm.weight", f"{_OURS}.q_a_norm.weight", when=("q_lora_rank",)),
        Rule(f"{_ATTN}.q_b_proj.weight", f"{_OURS}.q_b", when=("q_lora_rank",)),
        Rule(f"{_ATTN}.kv_a_layernorm.weight", f"{_OURS}.kv_a_norm.weight"),
        Rule(f"{_ATTN}.kv_b_proj.weight", f"{_OURS}.kv_b"),
        Rule(f"{_ATTN}.o_proj.weight", f"{_OURS}.wo"),
        # q_proj has no bias (q_a_proj has): without a q LoRA the q part of wq_kv_a_bias stays zero.
        Rule(f"{_ATTN}.q_a_proj.bias", f"{_OURS}.wq_kv_a_bias", _Q, ("attention_bias", "q_lora_rank")),
        Rule(f"{_ATTN}.kv_a_proj_with_mqa.bias", f"{_OURS}.wq_kv_a_bias", _KV, ("attention_bias",)),
        Rule(f"{_ATTN}.o_proj.bias", f"{_OURS}.wo_bias", when=("attention_bias",)),
        Rule(f"{_MLP}.gate.weight", "layers.{i}.mlp.gate", when=("moe",)),
        Rule(f"{_MLP}.gate.e_score_correction_bias", "layers.{i}.mlp.bias", when=("router_bias",)),
    ) + swiglu_rules(f"{_MLP}.shared_experts", "layers.{i}.mlp.shared", when=("shared",))
    + swiglu_rules(_MLP, "layers.{i}.mlp", when=("dense",)),
    layouts=(Layout("per-expert", swiglu_rules(f"{_MLP}.experts.{{e}}", "layers.{i}.mlp")),
             Layout("fused", fused_experts(_MLP, "layers.{i}.mlp"))))


class MLAttention(nn.Module):
    """Multi-head latent attention. The cache holds, per token, the normalised latent [kv_lora_rank]
    and the roped shared key [qk_rope_head_dim]; nothing per head.

    absorb: "auto" uses the absorbed form when every sequence brings one token (decode) and the
    expanded form otherwise (prefill); "always"/"never" force one (tests compare them).
    """

    def __init__(self, a: DeepseekArgs, rotary: Rotary, dtype, absorb: str = "auto"):
        super().__init__()
        self.a, self.rotary, self.absorb = a, rotary, absorb
        H = a.num_attention_heads
        # The two projections of x (q, or q_a with a q LoRA; and kv_a) stacked in one weight: one read of x
        # and one launch where decode pays for each.
        self.q_width = a.q_lora_rank or H * a.qk_head_dim
        self.wq_kv_a = weight(self.q_width + a.kv_lora_rank + a.qk_rope_head_dim, a.hidden_size, dtype=dtype)
        if a.q_lora_rank:
            self.q_a_norm = RMSNorm(a.q_lora_rank, a.rms_norm_eps, dtype)
            self.q_b = weight(H * a.qk_head_dim, a.q_lora_rank, dtype=dtype)
        self.kv_a_norm = RMSNorm(a.kv_lora_rank, a.rms_norm_eps, dtype)
        self.kv_b = weight(H * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank, dtype=dtype)
        self.wo = weight(a.hidden_size, H * a.v_head_dim, dtype=dtype)
        if a.attention_bias:
            # Stacked like wq_kv_a and loaded the same way; q_proj has no bias (q_a_proj has), so without a
            # q LoRA its part stays zero.
            self.wq_kv_a_bias = nn.Parameter(torch.zeros(self.wq_kv_a.shape[0], dtype=dtype), requires_grad=False)
            self.wo_bias = weight(a.hidden_size, dtype=dtype)
        self.scale = a.qk_head_dim ** -0.5
        if a.rope_scaling and a.rope_scaling.get("mscale_all_dim"):
            self.scale *= yarn_mscale(a.rope_scaling["factor"], a.rope_scaling["mscale_all_dim"]) ** 2

    def split_kv_b(self) -> None:
        """Key and value halves of kv_b per head, for the absorbed form: w_uk [H, nope, L], w_uv [H, v, L]."""
        a = self.a
        kv_b = self.kv_b.view(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        self.w_uk, self.w_uv = kv_b.split([a.qk_nope_head_dim, a.v_head_dim], dim=1)

    def projections(self) -> list[nn.Parameter]:
        """The weights this module uses only through kernels.linear.linear (see CausalLM.store_weights):
        not kv_b, which the absorbed form reads as per-head views."""
        return [self.wq_kv_a, self.wo] + ([self.q_b] if self.a.q_lora_rank else [])

    def _bias(self, name):
        return getattr(self, name, None)

    def forward(self, x: torch.Tensor, angles, cache: torch.Tensor, meta: AttentionMetadata):
        a, T, H = self.a, x.shape[0], self.a.num_attention_heads
        q_kv = linear(x, self.wq_kv_a, self._bias("wq_kv_a_bias"))           # [T, q_width + L + R]
        q, kv = q_kv.split([self.q_width, q_kv.shape[1] - self.q_width], -1)   # q [T, q_width], kv [T, L + R]
        if a.q_lora_rank:
            q = linear(self.q_a_norm(q), self.q_b)
        q = q.view(T, H, a.qk_head_dim)                                        # [T, H, nope + R]
        # Norm, rotary and the cache write: one kernel on CUDA, the CPU's few-call forms elsewhere.
        norm = self.kv_a_norm
        kernels.write_rotated_latent(cache, kv, norm.weight, norm.eps, angles, self.rotary.interleave,
                                     meta.slot_mapping)
        # A static (graph) decode step knows its contexts only on the device: only the absorbed form serves it.
        absorbed = self.absorb == "always" or meta.context_slots is None or (self.absorb == "auto" and meta.is_decode)
        if absorbed:                          # the absorbed query, q_pe's rotation included (one kernel on CUDA)
            q_full = kernels.absorbed_query(q, a.qk_nope_head_dim, self.w_uk, angles, self.rotary.interleave)
            out = self._attend_latent(q_full, cache, meta)
        else:
            q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)   # [T, H, *]
            out = self._per_sequence(q_nope, self.rotary(q_pe, angles), cache, meta)
        return linear(out.reshape(T, H * a.v_head_dim), self.wo, self._bias("wo_bias"))

    def _attend_latent(self, q_full, cache, meta):
        """Attend over the latent itself: q_full [T, H, L + R] (kv_b's key half folded in) against the cached
        latents; the value half of kv_b applied after: [T, H, v]."""
        L = self.a.kv_lora_rank
        if isinstance(cache, QuantizedCache):          # [S, 1, L + R] already; the values: its latent
            entries, values = cache, cache.values()
        else:
            entries = cache[:, None, :]                                          # [S, 1, L + R]
            values = entries[..., :L]
        out_latent = kernels.paged_attention(q_full, entries, values, meta, self.scale)   # [T, H, L]
        return torch.bmm(out_latent.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]

    def _per_sequence(self, q_nope, q_pe, cache, meta):
        """A batch with prefill in it, one sequence at a time. Expanding the latent into per-head keys and
        values costs a kv_b matmul over the whole context, which pays off for many queries (a prompt or a
        large chunk); a decode token or a small chunk attends over the latent directly (absorbed)."""
        a, H = self.a, self.a.num_attention_heads
        out = q_nope.new_empty(q_nope.shape[0], H, a.v_head_dim)               # [T, H, v]
        for b in range(meta.num_seqs):
            lo, hi = meta.query_start_loc[b], meta.query_start_loc[b + 1]
            entries = cache[meta.context_slots[b]].to(q_nope.dtype)             # [ctx, L + R]
            if entries.dim() == 3:                        # a QuantizedCache's rows, dequantised: [ctx, 1, L + R]
                entries = entries[:, 0]
            expand = self.absorb == "never" or hi - lo == entries.shape[0] or hi - lo > 64
            attend = self._expanded_one if expand else self._absorbed_one
            out[lo:hi] = attend(q_nope[lo:hi], q_pe[lo:hi], entries)
        return out

    def _expanded_one(self, q_nope, q_pe, entries):
        """q_nope [n, H, nope], q_pe [n, H, R], entries [ctx, L + R] -> [n, H, v]."""
        a, H, ctx = self.a, self.a.num_attention_heads, entries.shape[0]
        q = torch.cat([q_nope, q_pe], -1).transpose(0, 1)                       # [H, n, nope + R]
        kv = F.linear(entries[:, : a.kv_lora_rank], self.kv_b).view(ctx, H, -1)   # [ctx, H, nope + v]
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], -1)
        k = torch.cat([k_nope, entries[:, None, a.kv_lora_rank:].expand(ctx, H, -1)], -1)  # [ctx, H, nope+R]
        o = causal_attention(q, k.transpose(0, 1), v.transpose(0, 1), self.scale)   # [H, n, v]
        return o.transpose(0, 1)

    def _absorbed_one(self, q_nope, q_pe, entries):
        """The absorbed form for one sequence: same arguments and result as _expanded_one."""
        L = self.a.kv_lora_rank
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk)                 # [H, n, L]
        q = torch.cat([q_latent, q_pe.transpose(0, 1)], -1)                     # [H, n, L + R]
        o = causal_attention(q, entries[None], entries[None, :, :L], self.scale, enable_gqa=True)   # [H, n, L]
        return torch.bmm(o, self.w_uv.transpose(1, 2)).transpose(0, 1)          # [n, H, v]


def _decoder_layer(args: DeepseekArgs, i: int, rotary: Rotary, dtype, absorb: str) -> DecoderLayer:
    """Decoder layer i (MLA + an MoE block where args.is_moe_layer(i), else a dense SwiGLU)."""
    if args.is_moe_layer(i):
        shared = args.moe_intermediate_size * (args.n_shared_experts or 0)
        mlp = MoEBlock(args.hidden_size, args.moe_intermediate_size, args.routing(), shared, dtype)
    else:
        mlp = SwiGLU(args.hidden_size, args.intermediate_size, dtype)
    return DecoderLayer(MLAttention(args, rotary, dtype, absorb), mlp, args.hidden_size, args.rms_norm_eps, dtype)


# The multi-token-prediction layer's own tensors (its decoder layer's follow the main table's names).
_NEXTN = (("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"), ("eh_proj.weight", "eh_proj"),
          ("shared_head.norm.weight", "head_norm.weight"), ("shared_head.head.weight", "head"))


class MultiTokenPredictor(nn.Module):
    """DeepSeek-V3's multi-token-prediction (MTP) module, checkpoint layer model.layers.{num_hidden_layers}:
    at position p it combines the main model's hidden state h_p (after its final norm) with the embedding
    of the next token t_{p+1}, eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)]), runs one decoder layer (MLA
    at position p, with a cache of its own, + MoE) and predicts t_{p+2} through shared_head (norm, head).
    The embedding is the main model's. forward returns the layer's output before shared_head.norm, which is
    also what a chained step takes as its h (as vLLM's deepseek_mtp does)."""

    def __init__(self, args: DeepseekArgs, rotary: Rotary, dtype, absorb: str):
        super().__init__()
        D = args.hidden_size
        self.enorm = RMSNorm(D, args.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(D, args.rms_norm_eps, dtype)
        self.eh_proj = weight(D, 2 * D, dtype=dtype)
        self.layer = _decoder_layer(args, args.num_hidden_layers, rotary, dtype, absorb)
        self.head_norm = RMSNorm(D, args.rms_norm_eps, dtype)
        self.head = weight(args.vocab_size, D, dtype=dtype)
        self.rotary = rotary

    def projections(self) -> list[nn.Parameter]:
        return [self.eh_proj]

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cache,
                meta: AttentionMetadata) -> torch.Tensor:
        """embeds [T, D] (of the tokens t_{p+1}), hidden [T, D] (h_p), positions [T] (p) -> [T, D]."""
        x = linear(torch.cat([self.enorm(embeds), self.hnorm(hidden)], -1), self.eh_proj)     # [T, D]
        out, residual = self.layer(x, None, self.rotary.angles(positions, x.dtype), cache, meta)
        return out + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] (forward's output) -> float32 [N, V]."""
        return linear(self.head_norm(hidden), self.head).float()


class DeepseekModel(CausalLM):
    name_table = DEEPSEEK_NAMES

    def __init__(self, args: DeepseekArgs, dtype=torch.float32, absorb: str = "auto", mtp: bool = False):
        """mtp: also build the multi-token-prediction layer (self.mtp) and load its weights (speculative
        method "mtp"); without it a checkpoint's MTP tensors are ignored."""
        # V2 checkpoints always rotate interleaved pairs; V3 says so in rope_interleave.
        interleave = args.rope_interleave or args.model_type == "deepseek_v2"
        rotary = Rotary(args.qk_rope_head_dim, args.rope_theta, args.rope_scaling, interleave,
                        args.max_position_embeddings)
        layers = [_decoder_layer(args, i, rotary, dtype, absorb) for i in range(args.num_hidden_layers)]
        super().__init__(args, layers, rotary, dtype)
        self.mtp = MultiTokenPredictor(args, rotary, dtype, absorb) if mtp else None

    def checkpoint_targets(self, names=None) -> dict[str, Target]:
        out = super().checkpoint_targets(names)
        if self.mtp is not None:
            n = self.args.num_hidden_layers
            out.update(expand_extra_layer(self, self.name_table, n, self.mtp.layer, "mtp.layer", names))
            out.update({f"model.layers.{n}.{hf}": (f"mtp.{ours}", None) for hf, ours in _NEXTN})
        return out

    def post_load(self) -> None:
        for layer in self.layers:
            layer.attn.split_kv_b()
        if self.mtp is not None:
            self.mtp.layer.attn.split_kv_b()
            same = isinstance(self.lm_head, torch.Tensor) and self.mtp.head.shape == self.lm_head.shape
            if same and torch.equal(self.mtp.head, self.lm_head):
                self.mtp.head = self.lm_head       # shared_head.head is usually a copy of lm_head: hold one

    def kv_cache_layout(self, dtype, kv_cache_dtype: str = "auto") -> KVCacheLayout:
        """The latent and the rope key (FlashMLA's layout): compressed, the latent has one scale per 128
        values (per the whole latent when it is not a multiple of 128; int4: kernels.kv_quant.int4_group) and
        the rope key stays in dtype."""
        a = self.args
        L = a.kv_lora_rank
        group = 128 if L % 128 == 0 else L
        return KVCacheLayout((CachePart("latent", 1, L, group=group),
                              CachePart("rope", 1, a.qk_rope_head_dim, compressed=False)),
                             a.num_hidden_layers, dtype, kv_cache_dtype)

    def allocate_kv_cache(self, num_slots: int, dtype, device, kv_cache_dtype: str = "auto") -> list:
        """Per layer [S, L + R]; compressed, a QuantizedCache [S, 1, L] with the rope key [S, 1, R] as its tail."""
        a = self.args
        if kv_cache_dtype != "auto":
            layout = self.kv_cache_layout(dtype, kv_cache_dtype)
            return [QuantizedCache.empty(num_slots, 1, a.kv_lora_rank, layout.group(layout.parts[0]), kv_cache_dtype,
                                         dtype, device, tail_width=a.qk_rope_head_dim) for _ in self.layers]
        width = a.kv_lora_rank + a.qk_rope_head_dim
        return [torch.zeros(num_slots, width, dtype=dtype, device=device) for _ in self.layers]

    def kv_cache_bytes_per_token(self, dtype, kv_cache_dtype: str = "auto") -> int:
        return self.kv_cache_layout(dtype, kv_cache_dtype).bytes_per_token
