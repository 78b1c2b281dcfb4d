"""Both shipped tokenizers (sentencepiece and tokenizer.json): BOS, round trips, chat template and token ids
against transformers' AutoTokenizer."""

import json

import pytest
import transformers

from conftest import WEIGHTS
from moe_engine.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

MODELS = {"tiny-mixtral": SentencePieceTokenizer, "tiny-deepseek": HFTokenizer}

SOURCES = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n\n\tdef push(self, x):\n\t\tself.items.append(x)\n",
    "name = 'naïve café'  # π ≈ 3.14159, λx: x² → 🚀 世界\n",
    "if x:\n    pass\n\n\n\n    \n",
    "s = \"\"\"doc\n  string\"\"\"\r\nprint(s)\t\t# trailing tab\t\n",
    "x  =  [1,2 ,  3]   ",
    "import os\nfrom typing import Any\n\n@decorator\nasync def main() -> None: ...\n",
    "{\"key\": [null, true, 1e-5]}\n",
    "    leading indentation kept\n",
    " a leading space\n",
    "",
]


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    """(our tokenizer, transformers' AutoTokenizer) for one shipped model folder."""
    path = WEIGHTS / request.param
    ours = load_tokenizer(path, json.loads((path / "config.json").read_text()))
    assert type(ours) is MODELS[request.param]
    return ours, transformers.AutoTokenizer.from_pretrained(path)


def test_bos_is_added_exactly_once(pair):
    ours, hf = pair
    assert ours.bos_id == hf.bos_token_id is not None
    for text in SOURCES + ["a"]:
        ids = ours.encode(text)
        assert ids[0] == ours.bos_id and ours.bos_id not in ids[1:], text


@pytest.mark.parametrize("text", SOURCES)
def test_decode_encode_round_trips_source(pair, text):
    ours, _ = pair
    assert ours.decode(ours.encode(text)) == text


def test_decode_drops_bos_and_eos(pair):
    ours, _ = pair
    body = ours.encode("x = 1")[1:]
    eos = next(iter(ours.eos_ids))
    assert ours.decode([ours.bos_id] + body + [eos]) == "x = 1"


CODE = [s for s in SOURCES if s and not s[0].isspace()] + [
    "for i in range(10):\n\tprint(i)",
    "return {k: v for k, v in d.items() if v is not None}",
    "héllo → 世界 🚀",
    "a\r\nb\n\n\nc",
]


def test_token_ids_match_transformers_on_code(pair):
    ours, hf = pair
    for text in CODE:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_leading_space_is_kept(pair):
    """Known difference: for a text that starts with a space, transformers' Llama (sentencepiece-converted)
    tokenizer drops that space (it decodes ' x' back to 'x'); ours keeps it, so the round trip is exact.
    Texts without a leading space get the same ids from both (test above)."""
    ours, hf = pair
    for text in (" leading space", "  two", " \tdef f(): pass"):
        ids = ours.encode(text)
        assert ids[0] == ours.bos_id and ours.decode(ids) == text
        if isinstance(ours, SentencePieceTokenizer):
            assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) != text   # the difference


CONVERSATIONS = {
    "user-assistant": [
        {"role": "user", "content": "Write a function that adds\ntwo numbers"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
    "then-user": [
        {"role": "user", "content": "Sort a list"},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "in reverse\n  please"},
    ],
}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(pair, conversation, add_generation_prompt):
    ours, hf = pair
    messages = CONVERSATIONS[conversation]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert got.startswith(hf.bos_token) and messages[0]["content"].split("\n")[0] in got


def test_folder_without_tokenizer_gives_none(tmp_path):
    assert load_tokenizer(tmp_path, {}) is None
