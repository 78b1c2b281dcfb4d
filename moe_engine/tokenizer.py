"""Tokenizers behind one interface: sentencepiece `tokenizer.model` or `tokenizer.json` (tokenizers
library), with special tokens and the chat template from tokenizer_config.json (or chat_template.jinja).
A broken side file is a one-line MoeEngineError naming the file and what is wrong with it."""

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

from moe_engine.chat_template import LimitedEnvironment, compile_template
from moe_engine.checkpoint import read_text
from moe_engine.errors import MoeEngineError


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


def read_json(path: Path) -> dict:
    """A side file's JSON object ({} when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise MoeEngineError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise MoeEngineError(f"{path} should hold a JSON object, not a {type(data).__name__}; re-download it")
    return data


def _check_tokenizer_config(path: Path, cfg: dict) -> None:
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(key)
        if v is not None and not isinstance(_token_text(v), str):
            raise MoeEngineError(f"{path} has a bad {key} {v!r}: it must be a string or an object with a string "
                                 "\"content\"; fix or re-download the file")
    for key in ("add_bos_token", "add_eos_token"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise MoeEngineError(f"{path} has {key}={cfg[key]!r}; it must be true or false")


def _pick_template(path: Path, cfg: dict) -> tuple[str | None, str]:
    """(the chat template, where it came from): chat_template.jinja first (transformers 5 writes it),
    then tokenizer_config.json's chat_template, a string or a list of {name, template} (the "default")."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja), str(jinja)
    source, value = str(path / "tokenizer_config.json"), cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value, source
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"], source
        raise MoeEngineError(f"{source} has named chat templates ({', '.join(sorted(named))}) but none named "
                             "\"default\"; name one default")
    raise MoeEngineError(f"{source} has a bad chat_template (a {type(value).__name__}): it must be a string or a "
                         "list of {\"name\", \"template\"} objects; fix or re-download the file")


def _special_id(value, source: str, key: str, vocab: int | None) -> None:
    """Each id of a bos/eos setting: an integer inside the model's vocabulary."""
    for i in value if isinstance(value, list) else [value]:
        if isinstance(i, bool) or not isinstance(i, int):
            raise MoeEngineError(f"{source} has a bad {key} {value!r}: it must be a token id (an integer) or a "
                                 "list of them; fix the file")
        if i < 0 or (vocab is not None and i >= vocab):
            raise MoeEngineError(f"{source} has {key} {i}, outside the model's vocabulary [0, {vocab}); fix the "
                                 "file (the id is the tokenizer's, not the prompt's)")


class Tokenizer(ABC):
    """encode(text) -> ids (BOS added as the model expects), decode(ids) -> text, chat template rendering."""

    bos_id: int | None
    eos_ids: set[int]

    def __init__(self, path: Path, model_cfg: dict):
        self.path = path
        self.config = read_json(path / "tokenizer_config.json")
        _check_tokenizer_config(path / "tokenizer_config.json", self.config)
        self.chat_template, self.template_source = _pick_template(path, self.config)
        self._env = self._template = None
        gen_path = path / "generation_config.json"
        gen = read_json(gen_path)
        vocab = model_cfg.get("vocab_size")
        vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        for key in ("eos_token_id", "bos_token_id"):
            source = gen_path if gen.get(key) is not None else path / "config.json"
            value = gen.get(key, model_cfg.get(key))
            if value is not None:
                _special_id(value, str(source), key, vocab)
        eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.bos_id = gen.get("bos_token_id", model_cfg.get("bos_token_id"))

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def decode_continuation(self, context_ids: list[int], ids: list[int]) -> str:
        """The text ids add after context_ids. Decoding ids alone can lose what joins them to the context
        (sentencepiece drops the leading space of a first word), so decode both and cut the context off."""
        head = self.decode(context_ids)
        full = self.decode(context_ids + ids)
        return full[len(head):] if head and full.startswith(head) else self.decode(ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        """Token ids of a conversation rendered with the chat template. The special-token text the template
        writes (BOS, EOS between turns) becomes those tokens' ids, never their spelling, and BOS appears once.
        tools and template_kwargs (enable_thinking, reasoning_effort, ...) reach the template as in transformers."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        **template_kwargs)
        specials = self._special_ids()
        adds_bos = self.bos_id is not None and self.encode("a")[:1] == [self.bos_id]
        ids: list[int] = []
        parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
        for part in parts:
            if part in specials:
                ids.append(specials[part])
            elif part:
                piece = self.encode(part)
                ids += piece[1:] if adds_bos and piece[:1] == [self.bos_id] else piece
        if adds_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled text in the vocabulary, or None."""
        return None

    def _special_ids(self) -> dict[str, int]:
        """Text of the BOS/EOS tokens as the chat template writes them -> their ids: the vocabulary's id of that
        text where it has one (config.json's eos_token_id may name another end token, e.g. Qwen's <|endoftext|>
        while the template writes <|im_end|>), else the configured id."""
        out = {}
        bos = self.special_text("bos_token")
        if bos and self.bos_id is not None:
            out[bos] = self.bos_id
        eos = self.special_text("eos_token")
        if eos and len(self.eos_ids) == 1:
            out[eos] = next(iter(self.eos_ids))
        for text in (bos, eos):
            if text and self.token_id(text) is not None:
                out[text] = self.token_id(text)
        return out

    def special_text(self, key: str) -> str:
        return _token_text(self.config.get(key)) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        """Render messages with the model's jinja template in a sandbox (as transformers does: message keys
        whose value is None dropped, reasoning under its three names, the special tokens and template_kwargs in
        the context); without a template, a plain 'role: content' transcript."""
        if not self.chat_template:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        if self._template is None:      # compiled once; a syntax error names the file
            self._env = LimitedEnvironment()
            self._template = compile_template(self._env, self.chat_template, self.template_source)
        context = {key: self.special_text(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if self.special_text(key)}
        context.update(documents=None, **template_kwargs)   # template_kwargs override the special tokens
        context.update(add_generation_prompt=add_generation_prompt)
        return self._env.render(self._template, self.template_source, messages=_template_messages(messages),
                                tools=tools, **context)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_messages(messages: list[dict]) -> list:
    """messages as transformers hands them to a template: keys whose value is None dropped (templates test
    for a missing key), and a message's reasoning under each name templates read (Qwen's reasoning_content,
    gpt-oss's thinking)."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, model_cfg: dict):
        import sentencepiece
        super().__init__(path, model_cfg)
        file = path / "tokenizer.model"
        read_text_check(file)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except Exception as e:    # sentencepiece raises OSError / RuntimeError for a damaged file
            raise MoeEngineError(f"{file} is not a valid sentencepiece model ({_first_line(e)}); "
                                 "re-download it") from None
        if self.bos_id is None and self.sp.bos_id() >= 0:
            self.bos_id = self.sp.bos_id()
        if not self.eos_ids and self.sp.eos_id() >= 0:
            self.eos_ids = {self.sp.eos_id()}
        self.add_bos = self.config.get("add_bos_token", True)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def token_id(self, text: str) -> int | None:
        i = self.sp.piece_to_id(text)
        return i if i != self.sp.unk_id() and self.sp.id_to_piece(i) == text else None

    def decode(self, ids: list[int]) -> str:
        specials = self.eos_ids | {self.bos_id}
        return self.sp.decode([i for i in ids if i not in specials])


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, model_cfg: dict):
        from tokenizers import Tokenizer as Backend
        super().__init__(path, model_cfg)
        file = path / "tokenizer.json"
        read_text_check(file)
        try:
            self.tk = Backend.from_file(str(file))
        except Exception as e:    # the tokenizers library raises a bare Exception for a bad file
            raise MoeEngineError(f"{file} is not a valid tokenizer.json ({_first_line(e)}); re-download it") from None
        self.vocab_size = self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # BOS, where the model wants one, comes from tokenizer.json's post-processor.
        return self.tk.encode(text, add_special_tokens=True).ids

    def token_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)


def read_text_check(file: Path) -> None:
    """An unreadable tokenizer file says so (permission denied) before a library calls it damaged."""
    try:
        with open(file, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise MoeEngineError(f"cannot read {file}: permission denied; make it readable (chmod a+r)") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def load_tokenizer(path: Path, model_cfg: dict) -> Tokenizer | None:
    """The folder's tokenizer (tokenizer.json preferred), or None when it has none (token ids only)."""
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path, model_cfg)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path, model_cfg)
    return None


def require_tokenizer(tokenizer: Tokenizer | None, path: Path) -> Tokenizer:
    if tokenizer is None:
        raise MoeEngineError(f"{path} has no tokenizer.json or tokenizer.model; copy the model's tokenizer "
                             "files there, or pass prompt_token_ids instead of text")
    return tokenizer
