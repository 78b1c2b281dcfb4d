"""Checks of what users hand the API (token ids, conversations, chat-template settings, text, flags): each
bad value is one MoeEngineError naming the argument and the fix."""

import numbers

import torch

from moe_engine.errors import MoeEngineError


def is_integer(t) -> bool:
    """An int, a numpy integer or a 0-d integer tensor (bools are not token ids)."""
    if isinstance(t, torch.Tensor):
        return t.ndim == 0 and not t.is_floating_point() and t.dtype != torch.bool
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def token_list(ids, what: str) -> list:
    """A 1-d sequence of token ids (list, tuple, tensor, array) -> a list; refuses what has no integer
    values to give (a meta tensor, floats, text, nesting) with a line naming `what`."""
    if isinstance(ids, str):
        raise MoeEngineError(f"{what} must be integers, got text {ids[:20]!r}; encode it first or pass it as a prompt")
    if isinstance(ids, torch.Tensor):
        if ids.device.type == "meta":
            raise MoeEngineError(f"{what} are a meta tensor (a shape without values); pass a tensor with values")
        if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise MoeEngineError(f"{what} must be a 1-d integer tensor, got {ids.dtype} of shape {list(ids.shape)}")
        return ids.tolist()
    if not isinstance(ids, (list, tuple)) and not hasattr(ids, "__array__"):
        raise MoeEngineError(f"{what} must be a list of integers, got {type(ids).__name__}")
    ids = list(ids)
    if not all(is_integer(t) for t in ids):
        raise MoeEngineError(f"{what} must be integers, got {[type(t).__name__ for t in ids][:3]}; "
                             "pass text as prompts or lists of ints as prompt_token_ids")
    return ids


def token_batch(batch) -> list:
    """prompt_token_ids: one flat sequence of ids or a list of them -> a list of per-prompt sources."""
    if isinstance(batch, str) or not (isinstance(batch, (list, tuple, torch.Tensor)) or hasattr(batch, "__array__")):
        raise MoeEngineError(f"prompt_token_ids must be a list of token ids or a list of such lists, got "
                             f"{type(batch).__name__}" + ("; pass text as prompts=..." if isinstance(batch, str) else ""))
    if isinstance(batch, torch.Tensor) and batch.device.type == "meta":
        raise MoeEngineError("prompt_token_ids are a meta tensor (a shape without values); pass a tensor with values")
    if isinstance(batch, torch.Tensor) and batch.ndim == 1:
        return [batch]
    if len(batch) and is_integer(batch[0]):
        return [batch]                       # one prompt given as a flat sequence of ids
    return list(batch)


def template_settings(chat_template_kwargs: dict | None) -> dict:
    """chat_template_kwargs as encode_chat's keyword arguments: string keys; add_generation_prompt may be set
    there (as in vLLM), messages and tools have their own arguments."""
    kwargs = dict(chat_template_kwargs or {})
    bad = sorted(str(k) for k in kwargs if not isinstance(k, str) or k in ("messages", "tools"))
    if bad:
        raise MoeEngineError(f"chat_template_kwargs may not set {', '.join(bad)}; give the messages and tools "
                             "as their own arguments")
    return kwargs


def conversations(messages) -> list[list[dict]]:
    """chat's argument: one conversation (a list of messages) or a list of them, each message a dict with
    text "role" and "content" (null in a turn of tool_calls); anything else is refused naming what is wrong."""
    how = 'chat takes a conversation [{"role": "user", "content": "..."}, ...] or a list of them'
    if not isinstance(messages, (list, tuple)) or not messages:
        got = "an empty list" if isinstance(messages, (list, tuple)) else type(messages).__name__
        raise MoeEngineError(f"{how}, got {got}" + ("; for plain text use generate" if isinstance(messages, str) else ""))
    conversations = [messages] if isinstance(messages[0], dict) else messages
    for c in conversations:
        if not isinstance(c, (list, tuple)) or not c:
            raise MoeEngineError(f"{how}, got a {type(c).__name__ if c else 'empty conversation'} in it")
        for m in c:
            calls = isinstance(m, dict) and m.get("tool_calls") and m.get("content") is None   # content may be null
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                    calls or isinstance(m.get("content"), str)):
                raise MoeEngineError(f"{how}; each message needs text role and content, got {str(m)[:60]}")
            if not calls:
                check_text("message content", m["content"])
    # an assistant turn of tool calls alone renders with empty content, as in vLLM (templates read .content)
    return [[{**m, "content": ""} if m.get("content") is None else m for m in c] for c in conversations]


def check_text(what: str, text: str) -> None:
    """Refuse lone surrogates (bytes that were not UTF-8, smuggled in by surrogateescape): no tokenizer
    can encode them."""
    bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        raise MoeEngineError(f"{what} is not valid text: a lone surrogate {text[bad]!r} at character {bad} "
                             "(bytes that were not UTF-8?); give UTF-8 text")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise MoeEngineError(f"{name}={value!r}: must be True or False")
