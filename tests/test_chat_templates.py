"""The chat templates of the MoE families as shipped (tests/data/chat_templates): our rendering gives the same
token ids as transformers' apply_chat_template, on tiny byte-level BPE tokenizers with each family's special
tokens; and the end-of-turn ids of generation_config.json are the ones generation stops on."""

import copy
import json
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_engine.engine import Engine
from moe_engine.llm import _eos_ids
from moe_engine.tokenizer import load_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

CORPUS = [
    "You are a helpful assistant. Write a function that adds two numbers.",
    "def add(a, b):\n    return a + b\n", "What is the weather in Paris today?",
    "The user wants the weather, so I call the tool with the city.", "system user assistant tool",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}', "Reasoning: medium\n# Valid channels: analysis",
    "naïve café, π ≈ 3.14 → 世界", "Sort a list in reverse please", "function namespace type string",
]

# family: (special tokens, tokenizer_config settings, end-of-turn tokens in generation_config.json)
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
        "</tool_response>"]
FAMILIES = {
    "qwen3_moe": (QWEN + ["<think>", "</think>"], {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                  ["<|im_end|>", "<|endoftext|>"]),
    "qwen2_moe": (QWEN, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_end|>", "<|endoftext|>"]),
    "glm4_moe": (["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                  "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                  "</arg_value>", "<tool_response>", "</tool_response>"],
                 {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
                 ["<|endoftext|>", "<|user|>", "<|observation|>"]),
    "gpt_oss": (["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>",
                 "<|return|>", "<|call|>", "<|constrain|>"],
                {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"},
                ["<|return|>", "<|endoftext|>", "<|call|>"]),
    "olmoe": (["<|endoftext|>", "<|padding|>"],
              {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"},
              ["<|endoftext|>"]),
}
ALL = sorted(FAMILIES)
WITH_TOOLS = [f for f in ALL if f != "olmoe"]      # OLMoE's template has no tools
JINJA_FILE = {"gpt_oss", "glm4_moe"}     # their template in chat_template.jinja, the others' in tokenizer_config.json


def write_folder(path: Path, family: str, generation_config: bool = True, cfg_eos: str | None = None) -> dict:
    """A tokenizer folder for family (tokenizer.json, tokenizer_config.json, generation_config.json); returns
    the minimal model config our loader is given."""
    specials, settings, ends = FAMILIES[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    template, config = (TEMPLATES / f"{family}.jinja").read_text(), {"tokenizer_class": "PreTrainedTokenizerFast"}
    if family in JINJA_FILE:        # the file transformers 5 writes
        (path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    vocab = tk.get_vocab()
    if generation_config:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab[t] for t in ends]}))
    cfg = {"vocab_size": tk.get_vocab_size(), "eos_token_id": vocab[cfg_eos or ends[0]]}
    if "bos_token" in settings:
        cfg["bos_token_id"] = vocab[settings["bos_token"]]
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (our tokenizer, transformers' AutoTokenizer) on one tiny tokenizer folder, built once."""
    made = {}

    def get(family):
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            ours = load_tokenizer(path, write_folder(path, family))
            want = "chat_template.jinja" if family in JINJA_FILE else "tokenizer_config.json"
            assert ours.template_source.endswith(want)
            made[family] = ours, transformers.AutoTokenizer.from_pretrained(path)
        return made[family]
    return get


def hf_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(copy.deepcopy(messages), tokenize=True, **kw)
    return out if isinstance(out, list) else list(out["input_ids"])


def assert_same(ours, hf, messages, add_generation_prompt, **kw):
    """Same text and same token ids as transformers, and the template's special tokens are single tokens."""
    want_text = hf.apply_chat_template(copy.deepcopy(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kw)
    assert ours.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=add_generation_prompt,
                                    **kw) == want_text
    got = ours.encode_chat(copy.deepcopy(messages), add_generation_prompt=add_generation_prompt, **kw)
    assert got == hf_ids(hf, messages, add_generation_prompt=add_generation_prompt, **kw)
    specials = {hf.convert_tokens_to_ids(t) for t in hf.all_special_tokens + list(hf.added_tokens_encoder)
                if t in want_text}
    assert specials and specials <= set(got)
    return want_text


USER = {"role": "user", "content": "Write a function that adds\ntwo numbers"}
CONVERSATIONS = {
    "single-user": [USER],
    "system-multi-turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        USER,
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "naïve café → 世界, in reverse\n  please"},
    ],
    "ends-with-assistant": [USER, {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
}


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_conversation_gives_transformers_ids(folders, family, conversation, add_generation_prompt):
    ours, hf = folders(family)
    text = assert_same(ours, hf, CONVERSATIONS[conversation], add_generation_prompt)
    assert "two numbers" in text


# --- reasoning ---------------------------------------------------------------------------------------------
THOUGHT = "The user wants an adder, so I write one."
REASONING = {"qwen3_moe": "reasoning_content", "glm4_moe": "reasoning_content", "gpt_oss": "thinking"}


@pytest.mark.parametrize("field", ["own", "reasoning"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("family", sorted(REASONING))
def test_reasoning_turn_gives_transformers_ids(folders, family, field, add_generation_prompt):
    """The last assistant turn's reasoning, under the field the template reads and under the alias
    transformers copies it from ('reasoning'), is rendered (the earlier turn's is dropped by the templates)."""
    ours, hf = folders(family)
    name = REASONING[family] if field == "own" else "reasoning"
    messages = [USER, {"role": "assistant", "content": "ok", name: "an earlier thought"},
                {"role": "user", "content": "Sort a list"},
                {"role": "assistant", "content": "sorted(xs)", name: THOUGHT}]
    if add_generation_prompt:
        messages.append({"role": "user", "content": "in reverse"})
    text = assert_same(ours, hf, messages, add_generation_prompt)
    # the templates keep reasoning only after the last user turn
    assert (THOUGHT in text) == (not add_generation_prompt) and "an earlier thought" not in text


@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, {"enable_thinking": True}],
                         ids=["thinking-off", "thinking-on"])
@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_enable_thinking_reaches_the_template(folders, family, kwargs):
    ours, hf = folders(family)
    text = assert_same(ours, hf, CONVERSATIONS["system-multi-turn"], True, **kwargs)
    assert ("</think>" in text.split("<|assistant|>")[-1].split("<|im_start|>assistant")[-1]) == (
        not kwargs["enable_thinking"])


def test_gpt_oss_reasoning_effort_and_identity_reach_the_template(folders):
    ours, hf = folders("gpt_oss")
    kw = {"reasoning_effort": "high", "model_identity": "You are a tiny test model.", "builtin_tools": ["python"]}
    text = assert_same(ours, hf, CONVERSATIONS["system-multi-turn"], True, **kw)
    assert "Reasoning: high" in text and "tiny test model" in text


# --- tools -------------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": "integer", "description": "days ahead"}}}}}]
TOOL_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris today?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 1}}}]},
    {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("answered", [False, True])
@pytest.mark.parametrize("family", WITH_TOOLS)
def test_tool_call_turn_gives_transformers_ids(folders, family, add_generation_prompt, answered):
    ours, hf = folders(family)
    messages = TOOL_TURN + ([{"role": "assistant", "content": "It is 21 degrees and clear."}] if answered else [])
    text = assert_same(ours, hf, messages, add_generation_prompt, tools=TOOLS)
    assert "get_weather" in text and "Paris" in text and "clear" in text


@pytest.mark.parametrize("family", ALL)
def test_tools_without_a_tool_turn(folders, family):
    ours, hf = folders(family)
    text = assert_same(ours, hf, [USER], True, tools=TOOLS)
    assert ("get_weather" in text) == (family != "olmoe")


@pytest.mark.parametrize("family", ALL)
def test_none_valued_keys_are_dropped_as_transformers_does(folders, family):
    """OpenAI-style messages carry tool_calls=None: transformers drops such keys before rendering."""
    ours, hf = folders(family)
    messages = [USER, {"role": "assistant", "content": "def add(a, b): ...", "tool_calls": None}, USER]
    assert_same(ours, hf, messages, True)


@pytest.mark.parametrize("family", ALL)
def test_messages_are_not_changed(folders, family):
    ours, hf = folders(family)
    messages = copy.deepcopy(TOOL_TURN) + [{"role": "assistant", "content": "x", "reasoning": "y"}]
    before = copy.deepcopy(messages)
    ours.encode_chat(messages, tools=TOOLS)
    assert messages == before


# --- special-token ids and end of turn ---------------------------------------------------------------------
def test_eos_text_takes_the_vocabulary_id_when_config_names_another_end(tmp_path):
    """Qwen1.5-MoE: config.json's eos_token_id is <|endoftext|> while tokenizer_config's eos_token (written by
    the template) is <|im_end|>; without a generation_config.json the rendered <|im_end|> must stay <|im_end|>."""
    cfg = write_folder(tmp_path, "qwen2_moe", generation_config=False, cfg_eos="<|endoftext|>")
    ours, hf = load_tokenizer(tmp_path, cfg), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.eos_ids == {hf.convert_tokens_to_ids("<|endoftext|>")}
    assert ours.special_text("eos_token") == "<|im_end|>"
    for name in sorted(CONVERSATIONS):
        assert ours.encode_chat(CONVERSATIONS[name], add_generation_prompt=False) == hf_ids(
            hf, CONVERSATIONS[name], add_generation_prompt=False)


@pytest.mark.parametrize("family", ALL)
def test_generation_stops_on_every_end_of_turn_token(folders, family):
    """generation_config.json's eos_token_id list (gpt-oss <|return|>/<|call|>, Qwen <|im_end|>, GLM
    <|user|>/<|observation|>) is what the LLM and the engine stop on, over config.json's single id."""
    ours, hf = folders(family)
    ends = {hf.convert_tokens_to_ids(t) for t in FAMILIES[family][2]}
    assert ours.eos_ids == ends and len(ends) == len(FAMILIES[family][2])
    assert _eos_ids(ours, {"eos_token_id": min(ends)}) == ends
    engine = Engine(None, None, num_blocks=4, block_size=16, device="cpu", tokenizer=ours)
    assert engine.eos_ids == ends
