"""LLM.chat forwards tools and chat_template_kwargs to the chat template: the prompt ids the engine gets are
transformers' apply_chat_template ids (the tiny Qwen3 tokenizer of test_chat_templates on the tiny model)."""

import copy
from pathlib import Path

import pytest
import transformers

from moe_engine.errors import MoeEngineError
from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams
from moe_engine.tokenizer import load_tokenizer
from tests.test_chat_templates import TOOL_TURN, TOOLS, USER, hf_ids, write_folder

MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "tiny-mixtral"

# OpenAI-style: a call with an id, arguments as a JSON string, null content; the tool answer names the call
OPENAI_TURN = copy.deepcopy(TOOL_TURN)
OPENAI_TURN[2].update(content=None, tool_calls=[{"id": "call_1", "type": "function", "function": {
    "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}])
OPENAI_TURN[3]["tool_call_id"] = "call_1"


def qwen3_tokenizers(path: Path):
    """(ours, transformers') on a tiny Qwen3 tokenizer folder; its 400 ids fit the tiny model's vocabulary."""
    return load_tokenizer(path, write_folder(path, "qwen3_moe")), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    ours, hf = qwen3_tokenizers(tmp_path_factory.mktemp("qwen3_moe"))
    llm = LLM(MODEL_DIR, "cpu", max_num_seqs=4)
    llm.tokenizer = ours
    return llm, hf


def as_transformers_sees(messages):
    """transformers' input for the same turn: the Qwen3 template reads .content, so null content is ''."""
    return [{**m, "content": m["content"] or ""} for m in copy.deepcopy(messages)]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["default", "thinking-off"])
def test_chat_prompt_ids_are_transformers_ids_with_tools(qwen3, kwargs):
    llm, hf = qwen3
    params = SamplingParams(temperature=0.0, max_tokens=2)
    conversations = [[USER], OPENAI_TURN]
    outs = llm.chat(conversations, params, tools=TOOLS, chat_template_kwargs=kwargs or None)
    for conversation, out in zip(conversations, outs):
        want = hf_ids(hf, as_transformers_sees(conversation), tools=TOOLS, add_generation_prompt=True, **kwargs)
        assert out.prompt_token_ids == want and out.finish_reason in ("length", "stop")
    assert "get_weather" in hf.decode(outs[0].prompt_token_ids)
    # without tools the prompt is the plain one: the tools made a difference
    plain = llm.chat([USER], params)[0].prompt_token_ids
    assert plain == hf_ids(hf, [USER], add_generation_prompt=True) and plain != outs[0].prompt_token_ids


def test_chat_refuses_bad_tools_and_kwargs(qwen3):
    llm, _ = qwen3
    for kw, needle in [({"tools": {"name": "f"}}, "tools must be a list"),
                       ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs must be a dict"),
                       ({"chat_template_kwargs": {"tools": TOOLS}}, "may not set tools")]:
        with pytest.raises(MoeEngineError, match=needle) as e:
            llm.chat([USER], **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(MoeEngineError, match="content"):       # null content only in a turn of tool calls
        llm.chat([{"role": "user", "content": None}])
