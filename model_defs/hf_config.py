"""Building frozen args dataclasses from a Hugging Face config.json dict."""

import dataclasses
from typing import Any, TypeVar

from model_defs.config_checks import check_args
from model_defs.errors import MoeEngineError

A = TypeVar("A")


def rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """(rope_theta, rope_scaling) from either the classic keys or transformers-5 `rope_parameters`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else dict(params)
        return {"rope_theta": float(params["rope_theta"]), "rope_scaling": scaling}
    out = {}
    if cfg.get("rope_theta") is not None:
        out["rope_theta"] = float(cfg["rope_theta"])
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        out["rope_scaling"] = dict(scaling)
    return out


def args_from_hf_config(cls: type[A], cfg: dict[str, Any], defaults: dict[str, Any] | None = None) -> A:
    """cls(**known keys of cfg): unknown keys are ignored, a missing required key is a clear error, and a
    value of the wrong type or range (NaN, 0 heads, top-k above the experts) a TypeError / ValueError
    naming the field (model_defs.config_checks)."""
    merged = {**(defaults or {}), **{k: v for k, v in cfg.items() if v is not None}, **rope_fields(cfg)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [name for name, f in fields.items()
               if name not in merged and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MoeEngineError(
            f"config.json ({cfg.get('model_type', '?')}) lacks required field(s) {', '.join(missing)}; "
            "add them from the model's original config.json")
    args = cls(**{k: v for k, v in merged.items() if k in fields})
    check_args(args)
    return args
