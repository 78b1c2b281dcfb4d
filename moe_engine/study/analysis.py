"""Routing statistics of a Trace: load, imbalance, entropy, co-activation, layer agreement, token classes."""

import numpy as np

from moe_engine.errors import MoeEngineError
from moe_engine.study.token_classes import CLASSES


def _final(trace):
    final = trace.final()
    if len(final) == 0:
        raise MoeEngineError("the trace is empty; run generate() or prompt_logits() inside "
                             "`with llm.trace_routing() as trace:`")
    return final


def _onehot(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """topk_ids [N, k] (-1 = no expert) -> float32 [N, E] with 1 where the expert was chosen."""
    out = np.zeros((topk_ids.shape[0], num_experts + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(topk_ids < 0, num_experts, topk_ids), 1.0, axis=1)
    return out[:, :num_experts]


def _counts_to_load(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts, dtype=np.float64), where=total > 0)


def expert_load(trace, weighted: bool = False) -> np.ndarray:
    """[moe_layers, experts]: each expert's share of the layer's token-to-expert assignments (rows sum to
    1). weighted=True shares the routing weights instead of counting assignments."""
    t = _final(trace)
    ids, E = t.topk_ids, t.num_experts
    weights = t.topk_weights if weighted else np.ones_like(t.topk_weights)
    counts = np.stack([np.bincount(ids[l][ids[l] >= 0], weights[l][ids[l] >= 0], minlength=E)
                       for l in range(ids.shape[0])])                              # [L, E]
    return _counts_to_load(counts)


def imbalance(trace) -> dict[str, np.ndarray]:
    """Per MoE layer [L]: max_over_mean (busiest expert's load / the mean load; 1 = perfectly even) and cv
    (coefficient of variation of the loads; 0 = even)."""
    load = expert_load(trace)
    mean = load.mean(1)
    return {"max_over_mean": load.max(1) / mean, "cv": load.std(1) / mean}


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits over the last axis of a distribution."""
    logs = np.log2(p, out=np.zeros_like(p, dtype=np.float64), where=p > 0)
    return -(p * logs).sum(-1)


def load_entropy(trace) -> np.ndarray:
    """[L] entropy (bits) of each layer's expert-load distribution; log2(experts) = perfectly even."""
    return _entropy_bits(expert_load(trace))


def router_probabilities(trace) -> np.ndarray:
    """[L, N, E] the router's distribution over experts per token: softmax of the logits, or for sigmoid
    scoring the sigmoid scores normalised to sum 1. Needs a trace recorded with scores=True."""
    t = _final(trace)
    if not t.has_scores:
        raise MoeEngineError("this needs the router scores; record with llm.trace_routing(scores=True)")
    logits = t.scores.astype(np.float64)
    if t.routing["scoring"] == "softmax":
        p = np.exp(logits - logits.max(-1, keepdims=True))
    else:
        p = 1.0 / (1.0 + np.exp(-logits))
    return p / p.sum(-1, keepdims=True)


def token_entropy(trace) -> np.ndarray:
    """[L] mean per-token entropy (bits) of the router's distribution (how decided the router is)."""
    return _entropy_bits(router_probabilities(trace)).mean(-1)


def coactivation(trace) -> np.ndarray:
    """[L, E, E]: fraction of tokens that chose both experts i and j (diagonal: that chose expert i)."""
    t = _final(trace)
    onehots = [_onehot(ids, t.num_experts) for ids in t.topk_ids]                  # L x [N, E]
    return np.stack([m.T @ m for m in onehots]) / len(t)


def layer_transitions(trace) -> np.ndarray:
    """[L-1, E, E]: P(expert j is chosen at MoE layer l+1 | expert i is chosen at layer l), over all
    top-k pairs of a token (rows of experts never chosen are 0)."""
    t = _final(trace)
    onehots = [_onehot(ids, t.num_experts) for ids in t.topk_ids]
    return np.stack([_counts_to_load(a.T @ b) for a, b in zip(onehots, onehots[1:])]) if len(onehots) > 1 \
        else np.zeros((0, t.num_experts, t.num_experts))


def top1(trace) -> np.ndarray:
    """int [L, N]: each token's highest-weight expert per layer."""
    t = _final(trace)
    return np.take_along_axis(t.topk_ids, t.topk_weights.argmax(-1)[..., None], -1)[..., 0]


def adjacent_agreement(trace) -> np.ndarray:
    """[L-1]: normalised mutual information between a token's top-1 expert at MoE layer l and at l+1
    (0: the next layer's choice is independent of this one; 1: one determines the other). Expert ids of
    different layers are unrelated, so this measures predictability, not equal ids."""
    t = _final(trace)
    best, E = top1(t), t.num_experts
    out = []
    for a, b in zip(best, best[1:]):
        joint = np.bincount(a * E + b, minlength=E * E).reshape(E, E) / len(a)
        pa, pb = joint.sum(1), joint.sum(0)
        ratio = np.divide(joint, np.outer(pa, pb), out=np.ones_like(joint), where=joint > 0)
        mi = (joint * np.log2(ratio)).sum()
        ha, hb = _entropy_bits(pa), _entropy_bits(pb)
        out.append(mi / np.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0)
    return np.array(out)


def class_counts(trace) -> dict[str, int]:
    """Tokens per token class (classes with none left out)."""
    classes = _final(trace).token_classes()
    return {name: int((classes == i).sum()) for i, name in enumerate(CLASSES) if (classes == i).any()}


def load_by_class(trace) -> dict[str, np.ndarray]:
    """{token class: [L, E] expert load of that class's tokens alone} (rows sum to 1)."""
    t = _final(trace)
    classes = t.token_classes()
    return {name: expert_load(t.select(classes == i)) for i, name in enumerate(CLASSES) if (classes == i).any()}


def class_affinity(trace) -> dict[str, np.ndarray]:
    """{token class: [L, E]} how over-represented the class is among each expert's tokens: the class's
    load share over the expert's overall share (1 = as often as overall, 2 = twice, 0 = never)."""
    overall = expert_load(trace)
    return {name: np.divide(load, overall, out=np.zeros_like(load), where=overall > 0)
            for name, load in load_by_class(trace).items()}


def compare(trace_a, trace_b) -> dict:
    """Two traces of one model: load_tv [L] (total-variation distance of the expert loads, 0..1), and over
    the tokens both processed (matched by request order and position, as replay matches them) with the
    same token id: matched_tokens, topk_overlap [L] (mean shared experts / k) and top1_agreement [L]."""
    a, b = _final(trace_a), _final(trace_b)
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts):
        raise MoeEngineError(f"cannot compare traces of {a.num_layers}x{a.num_experts} and "
                             f"{b.num_layers}x{b.num_experts} (MoE layers x experts); compare traces of one model")
    out = {"load_tv": 0.5 * np.abs(expert_load(a) - expert_load(b)).sum(1)}
    row_of_b = {key: row for row, key in enumerate(b.match_keys())}
    pairs = [(ra, row_of_b[key]) for ra, key in enumerate(a.match_keys()) if key in row_of_b]
    pairs = [(ra, rb) for ra, rb in pairs if a.token_ids[ra] == b.token_ids[rb]]
    out["matched_tokens"] = len(pairs)
    if pairs:
        rows_a, rows_b = (np.array(r) for r in zip(*pairs))
        E = a.num_experts
        ma = np.stack([_onehot(ids[rows_a], E) for ids in a.topk_ids])                 # [L, M, E]
        mb = np.stack([_onehot(ids[rows_b], E) for ids in b.topk_ids])
        k = np.maximum(ma.sum(-1), mb.sum(-1))                                           # [L, M]
        out["topk_overlap"] = ((ma * mb).sum(-1) / np.maximum(k, 1)).mean(1)
        out["top1_agreement"] = (top1(a)[:, rows_a] == top1(b)[:, rows_b]).mean(1)
    return out


def summary(trace) -> dict:
    """The headline numbers as plain JSON-able values."""
    t = _final(trace)
    load, imb = expert_load(t), imbalance(t)
    out = {"records": len(trace), "tokens": len(t), "recomputed_records": len(trace) - len(t),
           "requests": len(set(t.request_ids.tolist())), "moe_layers": t.num_layers, "experts": t.num_experts,
           "top_k": t.top_k, "expert_load": load.round(6).tolist(),
           "max_over_mean": imb["max_over_mean"].round(4).tolist(), "cv": imb["cv"].round(4).tolist(),
           "load_entropy_bits": load_entropy(t).round(4).tolist(),
           "adjacent_agreement_nmi": adjacent_agreement(t).round(4).tolist()}
    if t.has_scores:
        out["token_entropy_bits"] = token_entropy(t).round(4).tolist()
    return out
