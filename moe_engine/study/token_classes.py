"""Token classes for code (whitespace, keyword, identifier, ...) from a small lexer over a request's text."""

import keyword
import re

import numpy as np

CLASSES = ("whitespace", "keyword", "identifier", "punctuation", "number", "string", "comment", "other")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}

# Python-flavoured, forgiving of broken code: an unterminated string ends at the line end (one quote) or at
# the end of the text (three quotes). Quote state thus carries across tokens of one request.
LEXER = re.compile(r"""
    (?P<string>[rRbBuUfF]{0,2}(?:\"\"\"[\s\S]*?(?:\"\"\"|\Z)|'''[\s\S]*?(?:'''|\Z)
                              |"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))
  | (?P<comment>\#[^\n]*)
  | (?P<number>\d[\w.]*|\.\d\w*)
  | (?P<word>[^\W\d]\w*)
  | (?P<whitespace>\s+)
  | (?P<punctuation>[!-/:-@\[-`{-~])
  | (?P<other>.)
""", re.VERBOSE)


class TokenTexts:
    """Token id -> its text as it reads inside running text (with its leading space: sentencepiece drops
    that when a token is decoded alone, so each token is decoded after an anchor token and the anchor's
    text is cut off). Cached per instance."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = [i for i in tokenizer.encode("a") if i != tokenizer.bos_id]
        self.anchor = ids[-1:]
        self.anchor_text = tokenizer.decode(self.anchor) if self.anchor else ""
        self.cache: dict[int, str] = {}

    def __getitem__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            both = self.tokenizer.decode(self.anchor + [token_id])
            text = (both[len(self.anchor_text):] if self.anchor and both.startswith(self.anchor_text)
                    else self.tokenizer.decode([token_id]))
            self.cache[token_id] = text
        return text


def char_classes(text: str) -> np.ndarray:
    """int8 [len(text)]: the class of every character of the text."""
    out = np.full(len(text), CLASS_INDEX["other"], dtype=np.int8)
    for m in LEXER.finditer(text):
        kind = m.lastgroup
        if kind == "word":
            kind = "keyword" if keyword.iskeyword(m.group()) else "identifier"
        out[m.start():m.end()] = CLASS_INDEX[kind]
    return out


def classify_tokens(texts: list[str]) -> np.ndarray:
    """int8 [len(texts)]: one request's tokens in order -> the class of each token's first non-space
    character (a token of only spaces: whitespace, or string/comment when inside one)."""
    full = "".join(texts)
    chars = char_classes(full)
    out = np.full(len(texts), CLASS_INDEX["other"], dtype=np.int8)
    start = 0
    for i, text in enumerate(texts):
        if text:
            stripped = len(text) - len(text.lstrip())
            out[i] = chars[start + (stripped if stripped < len(text) else 0)]
        start += len(text)
    return out


def classify_stream(token_ids, tokenizer) -> np.ndarray:
    """int8 [n]: the class of every token of one continuous token stream (e.g. a text evaluated in
    perplexity windows: classing each window alone would lose the quote state at its start)."""
    texts = TokenTexts(tokenizer)
    return classify_tokens([texts[int(t)] for t in token_ids])


def classify_records(request_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray,
                     tokenizer) -> np.ndarray:
    """int8 [N] class of every trace record: each request's text is rebuilt from its records in position
    order (a recomputed position counts once) and lexed as a whole."""
    texts = TokenTexts(tokenizer)
    out = np.full(len(token_ids), CLASS_INDEX["other"], dtype=np.int8)
    order = np.lexsort((positions, request_ids))
    for rows in np.split(order, np.flatnonzero(np.diff(request_ids[order])) + 1):
        if not len(rows):
            continue
        first_of = {}
        for r in rows:
            first_of.setdefault(int(positions[r]), r)
        by_position = sorted(first_of)
        classes = classify_tokens([texts[int(token_ids[first_of[p]])] for p in by_position])
        class_of = dict(zip(by_position, classes))
        out[rows] = [class_of[int(positions[r])] for r in rows]
    return out
