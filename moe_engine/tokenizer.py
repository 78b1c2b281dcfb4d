"""Tokenizers behind one interface: sentencepiece `tokenizer.model` or `tokenizer.json` (tokenizers
library), with special tokens and the chat template from tokenizer_config.json."""

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from moe_engine.errors import MoeEngineError


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer(ABC):
    """encode(text) -> ids (BOS added as the model expects), decode(ids) -> text, chat template rendering."""

    bos_id: int | None
    eos_ids: set[int]

    def __init__(self, path: Path, model_cfg: dict):
        cfg_path = path / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
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

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the chat template. The special-token text the template
        writes (BOS, EOS between turns) becomes those tokens' ids, never their spelling, and BOS appears once."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
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

    def _special_ids(self) -> dict[str, int]:
        """Text of the BOS/EOS tokens as the chat template writes them -> their ids."""
        out = {}
        bos = self.special_text("bos_token")
        if bos and self.bos_id is not None:
            out[bos] = self.bos_id
        eos = self.special_text("eos_token")
        if eos and len(self.eos_ids) == 1:
            out[eos] = next(iter(self.eos_ids))
        return out

    def special_text(self, key: str) -> str:
        return _token_text(self.config.get(key)) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's jinja template in a sandbox (as transformers does); without a
        template, a plain 'role: content' transcript."""
        if not self.chat_template:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.special_text("bos_token"), eos_token=self.special_text("eos_token"))


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, model_cfg: dict):
        import sentencepiece
        super().__init__(path, model_cfg)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        if self.bos_id is None and self.sp.bos_id() >= 0:
            self.bos_id = self.sp.bos_id()
        if not self.eos_ids and self.sp.eos_id() >= 0:
            self.eos_ids = {self.sp.eos_id()}
        self.add_bos = self.config.get("add_bos_token", True)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        specials = self.eos_ids | {self.bos_id}
        return self.sp.decode([i for i in ids if i not in specials])


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, model_cfg: dict):
        from tokenizers import Tokenizer as Backend
        super().__init__(path, model_cfg)
        self.tk = Backend.from_file(str(path / "tokenizer.json"))
        self.vocab_size = self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # BOS, where the model wants one, comes from tokenizer.json's post-processor.
        return self.tk.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)


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
