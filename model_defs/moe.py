"""Expert routing (a pure function of router logits and config) and the sparse MoE block."""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

import kernels
from kernels.linear import linear, router_logits as compute_router_logits
from model_defs.layers import SwiGLU, weight


@dataclass(frozen=True)
class RoutingConfig:
    """How router logits become top-k experts and weights, in the published variants.

    scoring: "softmax" (Mixtral, DeepSeek-V2) or "sigmoid" (DeepSeek-V3).
    method: "greedy" (plain top-k), "group_limited_greedy" (V2: keep topk_group groups ranked by their
      best expert), "noaux_tc" (V3: groups ranked by the sum of their best two biased scores).
    scale_normalized: V3 multiplies by routed_scaling_factor after normalising; V2 scales only
      weights it did not normalise.
    """
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scale_normalized: bool = True
    has_bias: bool = False

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring!r} is not supported (softmax, sigmoid)")
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method {self.method!r} is not supported "
                             "(greedy, group_limited_greedy, noaux_tc)")
        if self.method != "greedy" and self.num_experts % self.n_group:
            raise ValueError(f"{self.num_experts} experts do not split into n_group={self.n_group} groups")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be between 1 and the {self.num_experts} experts")
        if self.method != "greedy" and not (1 <= self.topk_group <= self.n_group and
                                            self.top_k <= self.topk_group * self.num_experts // self.n_group):
            raise ValueError(f"topk_group={self.topk_group} of n_group={self.n_group} groups cannot hold "
                             f"num_experts_per_tok={self.top_k} experts")

    def weight_rule(self, k: int) -> tuple[bool, float]:
        """For k chosen experts: (normalise their weights to sum 1?, the factor they are scaled by after).
        V3 scales after normalising; V2 scales only weights it did not normalise."""
        normalize = self.norm_topk_prob and (k > 1 or self.scale_normalized)
        return normalize, (self.routed_scaling_factor if self.scale_normalized or not normalize else 1.0)


def _keep_groups(choice: torch.Tensor, group_scores: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """choice [T, E] with every expert outside the best cfg.topk_group groups set to -inf."""
    T = choice.shape[0]
    top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices                       # [T, topk_group]
    drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, False)  # [T, G]
    return choice.view(T, cfg.n_group, -1).masked_fill(drop[:, :, None], float("-inf")).view(T, -1)


def route(router_logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None = None,
          allowed: torch.Tensor | None = None, ranked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64).

    The correction bias (noaux_tc) only steers which experts are chosen; weights come from the
    unbiased scores. `allowed` [E] bool removes experts: as if their router logit were -inf.
    ranked: the k experts best first (what traces report); the MoE itself needs no order, and in torch
    on CUDA the ranking is a sort kernel per layer (the routing kernel returns them ranked regardless).
    """
    logits = router_logits.float()
    if allowed is None:
        # On CUDA one Triton program per token does all of it (best first, so `ranked` holds either way).
        normalize, scaling = cfg.weight_rule(cfg.top_k)
        fused = kernels.fused_route(logits, cfg.top_k, cfg.scoring == "sigmoid", bias, normalize, scaling,
                                    cfg.method, cfg.n_group, cfg.topk_group)
        if fused is not None:
            return fused
    if (cfg.scoring == "softmax" and cfg.method == "greedy" and cfg.norm_topk_prob and cfg.scale_normalized
            and bias is None and allowed is None):
        # Mixtral's case in two ops: a softmax renormalised over the top k is the softmax of the top-k logits.
        top = logits.topk(cfg.top_k, dim=-1, sorted=ranked)
        weights = top.values.softmax(-1)                                              # [T, k]
        return (weights if cfg.routed_scaling_factor == 1.0 else weights * cfg.routed_scaling_factor), top.indices
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()   # [T, E]
    choice = scores if bias is None else scores + bias.float()
    if allowed is not None:
        choice = choice.masked_fill(~allowed, float("-inf"))
    if cfg.method == "group_limited_greedy":
        grouped = choice.view(choice.shape[0], cfg.n_group, -1)                     # [T, G, E/G]
        choice = _keep_groups(choice, grouped.max(-1).values, cfg)
    elif cfg.method == "noaux_tc":
        grouped = choice.view(choice.shape[0], cfg.n_group, -1)
        choice = _keep_groups(choice, grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1), cfg)
    topk_ids = choice.topk(cfg.top_k, dim=-1, sorted=ranked).indices                 # [T, k]
    return expert_weights(scores, topk_ids, cfg), topk_ids


def expert_weights(scores: torch.Tensor, topk_ids: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """The weights of the chosen experts topk_ids [T, k] from the scores [T, E]: normalised and scaled
    as the variant says (V3 scales after normalising; V2 scales only what it does not normalise)."""
    weights = scores.gather(1, topk_ids)                                             # [T, k]
    normalize, scaling = cfg.weight_rule(topk_ids.shape[1])
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling if scaling != 1.0 else weights


class RoutingHook(Protocol):
    """Research hook (record, override, mask): routes in place of route() for every MoE layer."""

    def route(self, moe_index: int, router_logits: torch.Tensor, cfg: RoutingConfig,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...


class MoEBlock(nn.Module):
    """Routed SwiGLU experts stacked as w13 [E, 2I, D] and w2 [E, D, I], plus optional shared experts,
    whose output shared_gate (Qwen2-MoE) scales by sigmoid(shared_gate x) per token.
    moe_index numbers the model's MoE layers 0, 1, ... (set by CausalLM)."""

    def __init__(self, dim: int, intermediate: int, routing: RoutingConfig, shared_intermediate: int = 0,
                 dtype=None, shared_gate: bool = False):
        super().__init__()
        E = routing.num_experts
        self.routing = routing
        self.moe_index = -1
        self.gate = weight(E, dim, dtype=torch.float32)   # routing runs in float32, as the references do
        self.bias = weight(E, dtype=torch.float32) if routing.has_bias else None
        self.w13 = weight(E, 2 * intermediate, dim, dtype=dtype)
        self.w2 = weight(E, dim, intermediate, dtype=dtype)
        self.shared = SwiGLU(dim, shared_intermediate, dtype=dtype) if shared_intermediate else None
        self.shared_gate = weight(1, dim, dtype=dtype) if shared_gate and shared_intermediate else None

    def forward(self, x: torch.Tensor, hook: RoutingHook | None = None) -> torch.Tensor:
        router_logits = compute_router_logits(x, self.gate)          # [T, E] float32
        if hook is None:
            # Ranked where that costs nothing (kernels.ranking_is_free says where).
            topk_weights, topk_ids = route(router_logits, self.routing, self.bias,
                                           ranked=kernels.ranking_is_free(router_logits))
        else:
            topk_weights, topk_ids = hook.route(self.moe_index, router_logits, self.routing, self.bias)
        if self.shared_gate is not None:       # the gated shared expert, added after the routed ones
            routed = kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)            # [T, D]
            return routed + torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)       # [T, 1] * [T, D]
        shared = None if self.shared is None else (self.shared.w13, self.shared.w2)
        return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, shared=shared)   # [T, D]


def store_experts(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold each MoE block's routed expert weights (w13, w2) in `dtype` where that loses nothing: always
    when widening, and when narrowing only if every value is exact in `dtype` (a float32 model loaded from a
    bfloat16 checkpoint holds exactly bfloat16 values). compile=True narrows them to bfloat16 on the CPU:
    the compiled decode step reads experts in place and multiplies in the activations' dtype, so it
    computes the same products from half the bytes, and a decode batch of 8 tokens reads nearly every
    expert of every layer each step. The eager paths widen the experts a step uses (kernels.moe).
    Returns how many tensors changed dtype."""
    return store_lossless([p for m in model.modules() if isinstance(m, MoEBlock) for p in (m.w13, m.w2)], dtype)


def store_lossless(params: list[nn.Parameter], dtype: torch.dtype) -> int:
    """Hold each of params in `dtype` where that loses nothing (always when widening; when narrowing only
    if every value is exact in dtype); how many changed dtype."""
    changed = 0
    for p in params:
        if not isinstance(p, nn.Parameter) or p.dtype == dtype or not p.dtype.is_floating_point:   # (quantized)
            continue
        if p.element_size() < torch.finfo(dtype).bits // 8 or torch.equal(p.data.to(dtype).to(p.dtype), p.data):
            p.data = p.data.to(dtype)
            changed += 1
    return changed
