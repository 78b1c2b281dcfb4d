"""Routing studies on top of the routing core (moe_engine.routing): analyses of traces, token classes, plots
and report tables."""

from moe_engine.study.analysis import (adjacent_agreement, class_affinity, class_counts, coactivation, compare,
                                       expert_load, imbalance, layer_transitions, load_by_class, load_entropy,
                                       router_probabilities, summary, token_entropy, top1)
from moe_engine.study.token_classes import CLASSES, classify_tokens

__all__ = ["expert_load", "imbalance", "load_entropy", "token_entropy", "router_probabilities", "coactivation",
           "layer_transitions", "adjacent_agreement", "top1", "class_counts", "load_by_class", "class_affinity",
           "compare", "summary", "CLASSES", "classify_tokens"]
