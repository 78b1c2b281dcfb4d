"""The engine's routing hook stack (one override routes, every trace records) and the context managers."""

from contextlib import contextmanager

from model_defs.moe import route
from moe_engine.errors import MoeEngineError
from moe_engine.routing.override import Override
from moe_engine.routing.trace import Trace


class HookStack:
    """Installed as engine.routing_hook while anything is attached; removed (hook None again, so the engine
    routes with no hook at all) when the last trace or override leaves.

    While installed, the engine's prefix cache is neither used nor filled: a cached block would skip
    recording its tokens, and its K/V would carry the routing of the run that wrote it into a run with
    another routing (or the other way round, after an override)."""

    def __init__(self, engine):
        self.engine = engine
        self.traces: list[Trace] = []
        self.override: Override | None = None
        self.prefix_caching = engine.blocks.enable_prefix_caching
        engine.blocks.enable_prefix_caching = False

    def close(self) -> None:
        self.engine.blocks.enable_prefix_caching = self.prefix_caching

    def begin_step(self, owners: list[int], token_ids: list[int], positions: list[int]) -> None:
        if self.override is not None:
            self.override.begin_step(owners, token_ids, positions)
        for trace in self.traces:
            trace.begin_step(owners, token_ids, positions)

    def route(self, moe_index, router_logits, cfg, bias):
        if self.override is None:
            topk_weights, topk_ids = route(router_logits, cfg, bias)            # [T, k] each
        else:
            topk_weights, topk_ids = self.override.route(moe_index, router_logits, cfg, bias)
        for trace in self.traces:
            trace.record(moe_index, router_logits, cfg, topk_weights, topk_ids)
        return topk_weights, topk_ids


@contextmanager
def attached(engine, trace: Trace | None = None, override: Override | None = None):
    """Attach a trace or an override to the engine's hook stack for the duration of the block. Enter and
    leave between requests: a request running across the boundary mixes two routings in its cache."""
    stack = engine.routing_hook
    if stack is not None and not isinstance(stack, HookStack):
        raise MoeEngineError("another routing hook is installed on this engine; remove it "
                             "(engine.routing_hook = None) before tracing or overriding routing")
    if override is not None and stack is not None and stack.override is not None:
        raise MoeEngineError("override_routing is already active; give all options (top_k, disabled_experts, "
                             "random, replay) in one override_routing call")
    if stack is None:
        stack = engine.routing_hook = HookStack(engine)
    if trace is not None:
        stack.traces.append(trace)
    if override is not None:
        stack.override = override
    try:
        yield trace if trace is not None else override
    finally:
        if trace is not None:
            stack.traces.remove(trace)
        if override is not None:
            stack.override = None
        if not stack.traces and stack.override is None:
            stack.close()
            engine.routing_hook = None


def trace_routing(llm, scores: bool = False):
    """`with trace_routing(llm) as trace:` records every MoE layer's routing of every token processed
    inside the block (generate, stream, prompt_logits, perplexity). scores=True also keeps the router
    logits [T, E] per layer (E times the memory of the top-k ids)."""
    return attached(llm.engine, trace=Trace(scores, llm.tokenizer))


def override_routing(llm, top_k: int | None = None, disabled_experts: dict[int, list[int]] | None = None,
                     replay: Trace | None = None, random: int | None = None):
    """`with override_routing(llm, ...) as override:` routes differently inside the block: top_k experts
    per token, experts removed per MoE layer ({moe_layer: [expert ids]}), a recorded routing forced
    (replay=trace), or experts chosen at random (random=seed). See Override for the rules."""
    moe_routing = [block.routing for block in llm.model.moe_blocks]
    return attached(llm.engine, override=Override(moe_routing, llm.device, top_k, disabled_experts, replay,
                                                  random))
