"""Routing research core: trace, replay and override expert routing (see LLM.trace_routing). The analyses,
token classes, plots and report tables built on traces live in moe_engine.study."""

from moe_engine.routing.hooks import HookStack, override_routing, trace_routing
from moe_engine.routing.override import Override, random_route, weights_for
from moe_engine.routing.trace import Trace

__all__ = ["Trace", "trace_routing", "override_routing", "Override", "HookStack", "weights_for", "random_route"]
