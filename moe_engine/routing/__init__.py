"""Routing research toolkit: trace, analyse, plot and intervene on expert routing (see LLM.trace_routing)."""

from moe_engine.routing.analysis import (adjacent_agreement, class_affinity, class_counts, coactivation, compare,
                                         expert_load, imbalance, layer_transitions, load_by_class, load_entropy,
                                         router_probabilities, summary, token_entropy, top1)
from moe_engine.routing.hooks import HookStack, override_routing, trace_routing
from moe_engine.routing.override import Override, random_route, weights_for
from moe_engine.routing.perplexity import perplexity
from moe_engine.routing.token_classes import CLASSES, classify_tokens
from moe_engine.routing.trace import Trace

__all__ = ["Trace", "trace_routing", "override_routing", "perplexity", "Override", "HookStack", "weights_for",
           "random_route", "expert_load", "imbalance", "load_entropy", "token_entropy", "router_probabilities",
           "coactivation", "layer_transitions", "adjacent_agreement", "top1", "class_counts", "load_by_class",
           "class_affinity", "compare", "summary", "CLASSES", "classify_tokens"]
