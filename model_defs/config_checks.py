"""Generic checks of an args dataclass built from config.json: types from its annotations, ranges by field name."""

import dataclasses
import math
import types
import typing
from typing import Any

# Fields that must be >= 1 wherever a family has them (every other integer field must be >= 0).
POSITIVE_INTS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "num_local_experts",
    "num_experts", "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "q_lora_rank",
    "moe_layer_freq", "decoder_sparse_step", "n_group", "topk_group",
})   # sliding_window and shared_expert_intermediate_size may be 0: no window, no shared expert
POSITIVE_FLOATS = frozenset({"rope_theta", "rms_norm_eps", "routed_scaling_factor", "partial_rotary_factor"})
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")   # what top-k is checked against


def _kinds(annotation) -> set[type]:
    """The plain types an annotation allows: int | None -> {int, NoneType}; tuple[int, ...] -> {tuple}."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    origin = typing.get_origin(annotation)
    return {origin if origin is not None else annotation}


def _element_kinds(annotation) -> set[type]:
    """The element types a sequence annotation allows: tuple[str, ...] | list[str] -> {str}; {int} if unsaid."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set().union(*(_element_kinds(a) for a in typing.get_args(annotation)))
    if typing.get_origin(annotation) in (list, tuple):
        return {a for a in typing.get_args(annotation) if a is not Ellipsis}
    return set()


def _type_problem(name: str, value, kinds: set[type], elements: set[type] | None = None) -> str | None:
    if typing.Any in kinds:
        return None
    if value is None or type(value) in kinds:
        if isinstance(value, (list, tuple)):
            elements = elements or {int}
            if not all(type(v) in elements or (float in elements and type(v) is int) for v in value):
                wanted = "/".join(sorted(k.__name__ for k in elements))
                return f"{name}={value!r} must be a list of {wanted} values"
        return None
    if bool in kinds and value in (0, 1) and not isinstance(value, float):
        return None                            # 0/1 for false/true is unambiguous
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return None                            # 10000 for 10000.0
    if list in kinds or tuple in kinds:
        if isinstance(value, (list, tuple)):
            return _type_problem(name, value, {list, tuple}, elements)
    wanted = "/".join(sorted("null" if k is type(None) else k.__name__ for k in kinds))
    return f"{name}={value!r} is a {type(value).__name__}, must be {wanted}"


def _value_problem(name: str, value) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}={value!r} must be a finite number"
    if name in POSITIVE_FLOATS and value <= 0:
        return f"{name}={value!r} must be > 0"
    if isinstance(value, int) and name in POSITIVE_INTS and value < 1:
        return f"{name}={value!r} must be >= 1"
    if isinstance(value, int) and value < 0:
        return f"{name}={value!r} must be >= 0"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (int, float)) and v < 0 for v in value):
        return f"{name}={list(value)!r} must hold only numbers >= 0"
    return None


def _shape_problem(a) -> str | None:
    """Relations between fields: head counts that divide, top-k within the experts, usable head sizes."""
    get = lambda n: getattr(a, n, None)   # noqa: E731
    heads, kv = get("num_attention_heads"), get("num_key_value_heads")
    if heads and kv and heads % kv:
        return f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
    fields = {f.name for f in dataclasses.fields(a)}
    rope = get("qk_rope_head_dim") or (get("head_dim") if "head_dim" in fields else None)
    if rope is None and "head_dim" in fields and heads:
        rope = get("hidden_size") // heads
    if rope and rope % 2:
        return f"the rotary head size {rope} (head_dim / qk_rope_head_dim) must be even"
    top_k = get("num_experts_per_tok")
    experts = next((get(n) for n in EXPERT_COUNTS if get(n)), None)
    if top_k and experts and top_k > experts:
        return f"num_experts_per_tok={top_k} must be between 1 and the {experts} experts"
    scaling = get("rope_scaling")
    if isinstance(scaling, dict):
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            v = scaling.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                return f"rope_scaling {key}={v!r} must be a finite number > 0"
    return None


def check_args(args: Any) -> None:
    """TypeError or ValueError naming the first bad field of a config-built args dataclass."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        problem = _type_problem(f.name, value, _kinds(hints[f.name]), _element_kinds(hints[f.name]))
        if problem:
            raise TypeError(problem)
        problem = _value_problem(f.name, value)
        if problem:
            raise ValueError(problem)
    problem = _shape_problem(args)
    if problem:
        raise ValueError(problem)
