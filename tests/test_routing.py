"""route() against hand-computed cases for every routing variant, and against transformers' routers."""

import math

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from model_defs.deepseek import DeepseekArgs
from model_defs.moe import RoutingConfig, route


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """Rows sorted by expert id, so the order topk happens to return does not matter."""
    order = ids.argsort(-1)
    return ids.gather(1, order).tolist(), weights.gather(1, order)


def check(weights, ids, want_ids, want_weights):
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    got_ids, got_weights = by_id(weights, ids)
    assert got_ids == want_ids
    torch.testing.assert_close(got_weights, torch.tensor(want_weights), rtol=1e-5, atol=1e-6)


def softmax_logits(probs: list[list[float]], shift: float = 0.0) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (plus a per-row shift, which softmax must ignore)."""
    p = torch.tensor(probs, dtype=torch.float64)
    return (p.log() + shift * torch.arange(len(probs))[:, None]).float()


def sigmoid_logits(scores: list[list[float]]) -> torch.Tensor:
    """Logits whose sigmoid is exactly `scores`."""
    s = torch.tensor(scores, dtype=torch.float64)
    return (s / (1 - s)).log().float()


def deepseek_routing(model_type: str, **fields) -> RoutingConfig:
    """The RoutingConfig our DeepSeek family builds from a config.json holding `fields`."""
    cfg = dict(model_type=model_type, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
               moe_intermediate_size=8, **fields)
    return DeepseekArgs.from_hf_config(cfg).routing()


# --- Mixtral: softmax, greedy top-k, renormalised over the chosen k ----------------------------------

def test_mixtral_softmax_topk_renormalised():
    logits = softmax_logits([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.3, 0.1]], shift=7.0)
    w, ids = route(logits, RoutingConfig(num_experts=4, top_k=2))
    # row 0: experts 2, 3 with 0.3 / 0.7 and 0.4 / 0.7; row 1: experts 0, 2 with 0.5 / 0.8 and 0.3 / 0.8
    check(w, ids, [[2, 3], [0, 2]], [[3 / 7, 4 / 7], [5 / 8, 3 / 8]])


def test_mixtral_top1_weight_is_one():
    logits = softmax_logits([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.3, 0.1]])
    w, ids = route(logits, RoutingConfig(num_experts=4, top_k=1))
    check(w, ids, [[3], [0]], [[1.0], [1.0]])


# --- DeepSeek-V2: softmax; weights times routed_scaling_factor unless normalised ----------------------

def test_v2_greedy_unnormalised_times_scaling_factor():
    cfg = deepseek_routing("deepseek_v2", n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=16.0)
    assert (cfg.scoring, cfg.method, cfg.norm_topk_prob) == ("softmax", "greedy", False)
    w, ids = route(softmax_logits([[0.1, 0.2, 0.3, 0.4]]), cfg)
    check(w, ids, [[2, 3]], [[0.3 * 16, 0.4 * 16]])


# Eight experts in four groups of two:   G0          G1          G2          G3
V2_GROUP_PROBS = [[0.05, 0.05, 0.20, 0.01, 0.16, 0.08, 0.15, 0.30]]
# Group maxima .05 .20 .16 .30 keep G1, G3 -> best three of {2: .20, 3: .01, 6: .15, 7: .30} = 2, 6, 7.
# (Plain top-3 would be 2, 4, 7; ranking groups by their sums .10 .21 .24 .45 would give 4, 6, 7.)


def test_v2_group_limited_greedy_ranks_groups_by_their_max():
    cfg = deepseek_routing("deepseek_v2", n_routed_experts=8, num_experts_per_tok=3, routed_scaling_factor=16.0,
                           topk_method="group_limited_greedy", n_group=4, topk_group=2)
    w, ids = route(softmax_logits(V2_GROUP_PROBS), cfg)
    check(w, ids, [[2, 6, 7]], [[0.20 * 16, 0.15 * 16, 0.30 * 16]])


def test_v2_plain_greedy_ignores_groups():
    cfg = deepseek_routing("deepseek_v2", n_routed_experts=8, num_experts_per_tok=3, routed_scaling_factor=16.0,
                           n_group=4, topk_group=2)
    w, ids = route(softmax_logits(V2_GROUP_PROBS), cfg)
    check(w, ids, [[2, 4, 7]], [[0.20 * 16, 0.16 * 16, 0.30 * 16]])


def test_v2_norm_topk_prob_normalises_and_does_not_scale():
    """DeepSeek-V2's own code: `if top_k > 1 and norm_topk_prob: normalise, else: scale`."""
    cfg = deepseek_routing("deepseek_v2", n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=16.0,
                           norm_topk_prob=True)
    w, ids = route(softmax_logits([[0.1, 0.2, 0.3, 0.4]]), cfg)
    check(w, ids, [[2, 3]], [[3 / 7, 4 / 7]])


def test_v2_norm_topk_prob_with_top1_scales_instead():
    cfg = deepseek_routing("deepseek_v2", n_routed_experts=4, num_experts_per_tok=1, routed_scaling_factor=16.0,
                           norm_topk_prob=True)
    w, ids = route(softmax_logits([[0.1, 0.2, 0.3, 0.4]]), cfg)
    check(w, ids, [[3]], [[0.4 * 16]])


# --- DeepSeek-V3: sigmoid, noaux_tc with correction bias, normalise then scale -------------------------

# Twelve experts in three groups of four:
V3_SCORES = [[0.90, 0.20, 0.15, 0.10,    # G0: max .90, best-two sum 1.10, sum 1.35
              0.70, 0.60, 0.05, 0.02,    # G1: max .70, best-two sum 1.30, sum 1.37
              0.42, 0.41, 0.40, 0.39]]   # G2: max .42, best-two sum 0.83, sum 1.62


def v3_config(**over) -> RoutingConfig:
    fields = dict(n_routed_experts=12, num_experts_per_tok=2, n_group=3, topk_group=1, routed_scaling_factor=2.5)
    cfg = deepseek_routing("deepseek_v3", **{**fields, **over})
    assert (cfg.scoring, cfg.method, cfg.norm_topk_prob, cfg.has_bias) == ("sigmoid", "noaux_tc", True, True)
    return cfg


def test_v3_groups_ranked_by_sum_of_best_two():
    # Best-two sums pick G1 (by max it would be G0, by full sum G2); then experts 4, 5.
    for bias in (None, torch.zeros(12)):
        w, ids = route(sigmoid_logits(V3_SCORES), v3_config(), bias)
        check(w, ids, [[4, 5]], [[0.7 / 1.3 * 2.5, 0.6 / 1.3 * 2.5]])


def test_v3_bias_changes_expert_but_not_weights():
    bias = torch.zeros(12)
    bias[7] = 0.65      # biased G1 = .70 .60 .05 .67: still the best group, but 7 now beats 5
    w, ids = route(sigmoid_logits(V3_SCORES), v3_config(), bias)
    # Weights come from the unbiased scores .70 and .02, normalised, times 2.5.
    check(w, ids, [[4, 7]], [[0.70 / 0.72 * 2.5, 0.02 / 0.72 * 2.5]])


def test_v3_bias_changes_the_chosen_group():
    bias = torch.zeros(12)
    bias[8] = bias[9] = 0.5    # biased G2 = .92 .91 .40 .39: best-two sum 1.83 beats G1's 1.30
    w, ids = route(sigmoid_logits(V3_SCORES), v3_config(), bias)
    check(w, ids, [[8, 9]], [[0.42 / 0.83 * 2.5, 0.41 / 0.83 * 2.5]])


def test_v3_keeps_topk_group_groups():
    # topk_group=2 keeps G1 and G0; the best three biased scores there are 0, 4, 5.
    w, ids = route(sigmoid_logits(V3_SCORES), v3_config(topk_group=2, num_experts_per_tok=3), torch.zeros(12))
    total = 0.9 + 0.7 + 0.6
    check(w, ids, [[0, 4, 5]], [[0.9 / total * 2.5, 0.7 / total * 2.5, 0.6 / total * 2.5]])


# --- Against transformers' routers on random logits (an independent implementation) -------------------

def _hf_route(router, logits: torch.Tensor):
    """Feed logits through an HF router whose weight is the identity (so its router logits are ours)."""
    E = logits.shape[1]
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
        _, w, ids = router(logits)
    return w, ids


@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 4), (8, 3, 6), (1, 1, 2), (2, 1, 3)])
def test_v3_matches_transformers(n_group, topk_group, k):
    E = 16
    hf_cfg = transformers.DeepseekV3Config(hidden_size=E, num_attention_heads=4, n_routed_experts=E,
                                           num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(hf_cfg)
    bias = 0.3 * torch.randn(E)
    router.e_score_correction_bias.copy_(bias)
    logits = 2 * torch.randn(64, E)
    ours = route(logits, deepseek_routing("deepseek_v3", n_routed_experts=E, num_experts_per_tok=k,
                                          n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5),
                 bias)
    theirs = _hf_route(router, logits)
    got_ids, got_w = by_id(*ours)
    want_ids, want_w = by_id(*theirs)
    assert got_ids == want_ids
    torch.testing.assert_close(got_w, want_w)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_matches_transformers(method):
    E, k = 16, 4
    hf_cfg = transformers.DeepseekV2Config(hidden_size=E, num_attention_heads=4, n_routed_experts=E,
                                           num_experts_per_tok=k, n_group=4, topk_group=2, topk_method=method,
                                           routed_scaling_factor=16.0)
    logits = 2 * torch.randn(64, E)
    ours = route(logits, deepseek_routing("deepseek_v2", n_routed_experts=E, num_experts_per_tok=k, n_group=4,
                                          topk_group=2, topk_method=method, routed_scaling_factor=16.0))
    theirs = _hf_route(DeepseekV2TopkRouter(hf_cfg), logits)
    got_ids, got_w = by_id(*ours)
    want_ids, want_w = by_id(*theirs)
    assert got_ids == want_ids
    torch.testing.assert_close(got_w, want_w)


def test_bad_routing_config_is_refused():
    with pytest.raises(ValueError, match="scoring_func"):
        RoutingConfig(num_experts=4, top_k=2, scoring="tanh")
    with pytest.raises(ValueError, match="topk_method"):
        RoutingConfig(num_experts=4, top_k=2, method="random")
    with pytest.raises(ValueError, match="n_group"):
        RoutingConfig(num_experts=6, top_k=2, method="noaux_tc", n_group=4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        RoutingConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="topk_group"):
        RoutingConfig(num_experts=8, top_k=5, method="noaux_tc", n_group=4, topk_group=2)   # 2 groups hold 4
    assert math.isclose(route(torch.zeros(1, 4), RoutingConfig(num_experts=4, top_k=2))[0].sum().item(), 1.0)
