"""Routing interventions: another top-k, experts removed, random experts, or a recorded routing replayed."""

import dataclasses

import torch

from model_defs.moe import RoutingConfig, expert_weights, route
from moe_engine.errors import MoeEngineError
from moe_engine.routing.trace import RequestKeys, Trace


def weights_for(router_logits: torch.Tensor, topk_ids: torch.Tensor, cfg: RoutingConfig,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """topk_weights [T, k] float32 the model's scoring gives the experts topk_ids [T, k]: the same
    scoring, normalisation and scaling as route() applies to the experts it picks."""
    logits = router_logits.float()                                                  # [T, E]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()   # [T, E]
    return expert_weights(scores, topk_ids, cfg)


def random_route(router_logits: torch.Tensor, cfg: RoutingConfig, generator: torch.Generator,
                 allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cfg.top_k distinct experts per token drawn uniformly (among the allowed), weighted by the model's
    scoring of that choice -> (topk_weights [T, k], topk_ids [T, k])."""
    noise = torch.rand(router_logits.shape, generator=generator, device=router_logits.device)   # [T, E]
    if allowed is not None:
        noise = noise.masked_fill(~allowed, -1.0)
    topk_ids = noise.topk(cfg.top_k, dim=-1).indices                                # [T, k]
    return weights_for(router_logits, topk_ids, cfg, allowed), topk_ids


class Override:
    """One routing intervention for every MoE layer.

    top_k: experts per token (group-limited models: at most topk_group * experts per group).
    disabled_experts: {moe_layer: [expert ids]}; those experts are routed as if their logit were -inf
      (route(..., allowed=mask)), so the rest renormalise. Each layer must keep at least top_k experts.
    random: seed; experts drawn uniformly from a generator on the model's device, in processing order,
      weighted by the model's own scores of the drawn experts. Combines with top_k and disabled_experts.
    replay: a Trace; each token takes the recorded ids and weights of the matching token of the trace.
      Matching: the n-th request of this run takes the n-th request of the trace (requests in id order,
      which is submission order), prompt_logits/perplexity calls likewise in call order, then by position;
      the last processing of each token in the trace is used. So running the same prompts, sampling
      params and calls again reproduces the traced run exactly. Tokens with no match (e.g. a longer
      generation) route normally and are counted in replay_misses. Excludes the other options.
    """

    def __init__(self, moe_routing: list[RoutingConfig], device, top_k: int | None = None,
                 disabled_experts: dict[int, list[int]] | None = None, replay: Trace | None = None,
                 random: int | None = None):
        L, cfg = len(moe_routing), moe_routing[0]
        E = cfg.num_experts
        if replay is not None and (top_k is not None or disabled_experts or random is not None):
            raise MoeEngineError("replay forces the recorded routing and cannot combine with top_k, "
                                 "disabled_experts or random; use replay alone")
        if top_k is not None:
            most = E if cfg.method == "greedy" else cfg.topk_group * (E // cfg.n_group)
            if not isinstance(top_k, int) or not 1 <= top_k <= most:
                raise MoeEngineError(f"bad top_k={top_k!r}: this model allows 1..{most} experts per token")
        k = top_k or cfg.top_k
        self.top_k = top_k
        self.allowed: dict[int, torch.Tensor] = {}          # moe layer -> [E] bool
        for layer, experts in (disabled_experts or {}).items():
            experts = [experts] if isinstance(experts, int) else list(experts)
            if not isinstance(layer, int) or not 0 <= layer < L:
                raise MoeEngineError(f"disabled_experts: MoE layer {layer!r} does not exist; this model has "
                                     f"MoE layers 0..{L - 1}")
            bad = [e for e in experts if not isinstance(e, int) or not 0 <= e < E]
            if bad:
                raise MoeEngineError(f"disabled_experts: expert id(s) {bad} at MoE layer {layer} are outside "
                                     f"0..{E - 1}; give expert ids of this model")
            mask = torch.ones(E, dtype=torch.bool, device=device)
            mask[experts] = False
            if int(mask.sum()) < k:
                raise MoeEngineError(f"disabled_experts leaves {int(mask.sum())} experts at MoE layer {layer}, "
                                     f"fewer than top_k={k}; disable fewer experts or lower top_k")
            self.allowed[layer] = mask
        self.generator = None
        if random is not None:
            if not isinstance(random, int) or isinstance(random, bool):
                raise MoeEngineError(f"random={random!r}: give an integer seed")
            self.generator = torch.Generator(device=device).manual_seed(random)
        self.replay = Replay(replay, L, E, device) if replay is not None else None

    @property
    def replay_misses(self) -> int:
        return self.replay.misses if self.replay is not None else 0

    def begin_step(self, owners: list[int], token_ids: list[int], positions: list[int]) -> None:
        if self.replay is not None:
            self.replay.begin_step(owners, positions)

    def route(self, moe_index: int, router_logits: torch.Tensor, cfg: RoutingConfig,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.replay is not None:
            return self.replay.route(moe_index, router_logits, cfg, bias)
        if self.top_k is not None:
            cfg = dataclasses.replace(cfg, top_k=self.top_k)
        allowed = self.allowed.get(moe_index)
        if self.generator is not None:
            return random_route(router_logits, cfg, self.generator, allowed)
        return route(router_logits, cfg, bias, allowed)


class Replay:
    """A trace's final routing on device, looked up per step by (request order, position)."""

    def __init__(self, trace: Trace, num_layers: int, num_experts: int, device):
        final = trace.final()
        if len(final) == 0:
            raise MoeEngineError("replay: the trace is empty; record one with llm.trace_routing() first")
        if final.num_layers != num_layers or final.num_experts != num_experts:
            raise MoeEngineError(f"replay: the trace has {final.num_layers} MoE layers x {final.num_experts} "
                                 f"experts but this model has {num_layers} x {num_experts}; replay a trace "
                                 "of the same model")
        ids = torch.from_numpy(final.topk_ids).long()                                    # [L, N, k]
        weights = torch.from_numpy(final.topk_weights)                                    # [L, N, k]
        # Narrower records (a trace spanning several top-k) were padded with id -1: weight 0 on expert 0.
        self.ids = ids.clamp(min=0).to(device)
        self.weights = weights.masked_fill(ids < 0, 0.0).to(device)
        self.row_of = {key: row for row, key in enumerate(final.match_keys())}
        self.keys = RequestKeys()
        self.request_rank: dict[int, int] = {}     # this run's request id -> rank among its requests
        self.rows = self.hit = None
        self.num_hits = 0
        self.misses = 0

    def begin_step(self, owners: list[int], positions: list[int]) -> None:
        rows = []
        for owner, pos in zip(self.keys(owners), positions):
            if owner >= 0:
                key = (0, self.request_rank.setdefault(owner, len(self.request_rank)), pos)
            else:
                key = (1, -owner - 1, pos)
            rows.append(self.row_of.get(key, -1))
        device = self.ids.device
        rows_t = torch.tensor(rows, dtype=torch.long)                                     # [T]
        self.num_hits = int((rows_t >= 0).sum())
        self.misses += len(rows) - self.num_hits
        self.hit = (rows_t >= 0).to(device)
        self.rows = rows_t.clamp(min=0).to(device)

    def route(self, moe_index, router_logits, cfg, bias):
        topk_ids = self.ids[moe_index, self.rows]                                         # [T, k]
        topk_weights = self.weights[moe_index, self.rows]                                 # [T, k]
        if self.num_hits == len(self.rows):
            return topk_weights, topk_ids
        own_weights, own_ids = route(router_logits, cfg, bias)                           # [T, k_model]
        k = max(topk_ids.shape[1], own_ids.shape[1])
        topk_weights, topk_ids = _widen(topk_weights, topk_ids, k)
        own_weights, own_ids = _widen(own_weights, own_ids, k)
        hit = self.hit[:, None]
        return torch.where(hit, topk_weights, own_weights), torch.where(hit, topk_ids, own_ids)


def _widen(weights: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, j] -> [T, k] with extra slots on expert 0 at weight 0 (they add nothing)."""
    extra = k - ids.shape[1]
    if extra == 0:
        return weights, ids
    return (torch.cat([weights, weights.new_zeros(weights.shape[0], extra)], 1),
            torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], 1))

