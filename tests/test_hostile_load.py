"""Hostile and broken checkpoint folders (issue 24, kinds 3-7): each gives its exact outcome, a one-line
MoeEngineError naming the field, tensor or file, or the correct model; chat templates stop within limits."""

import json
import os
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import WEIGHTS
from moe_engine import LLM, MoeEngineError
from moe_engine import checkpoint as checkpoint_mod
from moe_engine import loader as loader_mod
from moe_engine.preflight import available_bytes
from moe_engine.tokenizer import load_tokenizer

MIXTRAL = WEIGHTS / "tiny-mixtral"
DEEPSEEK = WEIGHTS / "tiny-deepseek"
IDS = [1] + list(range(100, 124))
EDITABLE = ("config.json", "model.safetensors.index.json", "tokenizer_config.json", "generation_config.json",
            "tokenizer.json", "tokenizer.model")


def link_model(tmp_path: Path, src: Path = MIXTRAL, name: str = "model", copy_shards: bool = False) -> Path:
    """A model folder whose small side files are copies (to edit) and whose shards are symlinks to the
    shipped ones (as in the Hugging Face cache), or copies with copy_shards."""
    dst = tmp_path / name
    dst.mkdir()
    for f in src.iterdir():
        if f.name in EDITABLE or copy_shards:
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f.resolve())
    return dst


def edit_json(path: Path, edit, file: str = "config.json") -> None:
    data = json.loads((path / file).read_text())
    edit(data)
    (path / file).write_text(json.dumps(data))


def edit_tensors(path: Path, edit) -> None:
    """edit(tensors) on every shard (mutating the dict); the index follows."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / shard)
        edit(shard, tensors)
        (path / shard).unlink()                  # a symlink: replace it, never write through it
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def load(path, **kw) -> LLM:
    return LLM(path, device="cpu", dtype="float32", **({"num_kv_blocks": 8} | kw))


def error(fn, *args, **kw) -> str:
    with pytest.raises(MoeEngineError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def reference_logits():
    return {src.name: load(src).prompt_logits(IDS) for src in (MIXTRAL, DEEPSEEK)}


# --- 3. config values ------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("src,field,value,shown", [
    (MIXTRAL, "rope_theta", NAN, "rope_theta=nan"),
    (MIXTRAL, "rope_theta", 0, "rope_theta=0.0"),
    (MIXTRAL, "rope_theta", -INF, "rope_theta=-inf"),
    (MIXTRAL, "rms_norm_eps", -1e-5, "rms_norm_eps=-1e-05"),
    (MIXTRAL, "rms_norm_eps", INF, "rms_norm_eps=inf"),
    (MIXTRAL, "hidden_size", 0, "hidden_size=0"),
    (MIXTRAL, "num_attention_heads", 0, "num_attention_heads=0"),
    (MIXTRAL, "num_key_value_heads", 3, "num_key_value_heads=3"),
    (MIXTRAL, "num_key_value_heads", -2, "num_key_value_heads=-2"),
    (MIXTRAL, "max_position_embeddings", 0, "max_position_embeddings=0"),
    (MIXTRAL, "max_position_embeddings", NAN, "max_position_embeddings=nan"),
    (MIXTRAL, "num_hidden_layers", 0, "num_hidden_layers=0"),
    (MIXTRAL, "vocab_size", -4096, "vocab_size=-4096"),
    (MIXTRAL, "intermediate_size", 0, "intermediate_size=0"),
    (MIXTRAL, "num_experts_per_tok", 0, "num_experts_per_tok=0"),
    (MIXTRAL, "num_local_experts", 0, "num_local_experts=0"),
    (MIXTRAL, "tie_word_embeddings", "false", "tie_word_embeddings='false'"),
    (MIXTRAL, "num_hidden_layers", 4.0, "num_hidden_layers=4.0"),
    (DEEPSEEK, "qk_rope_head_dim", 15, "15"),
    (DEEPSEEK, "kv_lora_rank", 0, "kv_lora_rank=0"),
    (DEEPSEEK, "routed_scaling_factor", NAN, "routed_scaling_factor=nan"),
    (DEEPSEEK, "num_experts_per_tok", 17, "num_experts_per_tok=17"),
    (DEEPSEEK, "rope_scaling", {"type": "yarn", "factor": 0, "original_max_position_embeddings": 256},
     "factor=0"),
    (DEEPSEEK, "num_nextn_predict_layers", "1", "num_nextn_predict_layers='1'"),
])
def test_bad_config_value_names_field_and_value(tmp_path, src, field, value, shown):
    path = link_model(tmp_path, src)
    edit_json(path, lambda c: c.update({field: value}))
    msg = error(load, path)
    assert "config.json" in msg and shown in msg and "ZeroDivisionError" not in msg


# --- 3. tensors and layers -------------------------------------------------------------------------------

def test_weight_relabelled_as_integer_is_refused(tmp_path):
    path = link_model(tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight"

    def relabel(shard, t):
        if name in t:
            t[name] = t[name].view(torch.int16)      # the same bytes, called integers
    edit_tensors(path, relabel)
    msg = error(load, path)
    assert name in msg and "I16" in msg and "float" in msg


def test_bf16_weight_relabelled_as_float16_is_refused(tmp_path):
    path = link_model(tmp_path)
    name = "model.embed_tokens.weight"

    def relabel(shard, t):
        if name in t:
            assert t[name].dtype == torch.bfloat16
            t[name] = t[name].view(torch.float16)
    edit_tensors(path, relabel)
    msg = error(load, path)
    assert name in msg and "F16" in msg and "bfloat16" in msg


def test_float32_norms_in_a_bf16_checkpoint_still_load(tmp_path, reference_logits):
    """Mixed precision is legitimate (norms, router biases in float32): the model is unchanged."""
    path = link_model(tmp_path)
    edit_tensors(path, lambda shard, t: t.update({k: v.float() for k, v in t.items() if "norm" in k}))
    assert torch.equal(load(path).prompt_logits(IDS), reference_logits["tiny-mixtral"])


def test_layer_past_num_hidden_layers_is_refused(tmp_path):
    path = link_model(tmp_path)
    extra = "model.layers.4.input_layernorm.weight"

    def add(shard, t):
        if "model.layers.3.input_layernorm.weight" in t:
            t[extra] = t["model.layers.3.input_layernorm.weight"].clone()
    edit_tensors(path, add)
    msg = error(load, path)
    assert extra in msg and "num_hidden_layers=4" in msg


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(tmp_path):
    path = link_model(tmp_path)
    edit_json(path, lambda c: c.update(num_hidden_layers=3))
    msg = error(load, path)
    assert "model.layers.3." in msg and "num_hidden_layers=3" in msg


def test_deepseek_mtp_layer_is_still_ignored(tmp_path, reference_logits):
    """A multi-token-prediction layer (index num_hidden_layers, num_nextn_predict_layers=1) is not used."""
    path = link_model(tmp_path, DEEPSEEK)
    edit_json(path, lambda c: c.update(num_nextn_predict_layers=1))

    def add_mtp(shard, t):
        for k in [k for k in t if k.startswith("model.layers.3.")]:
            t[k.replace("model.layers.3.", "model.layers.4.")] = t[k].clone()
        if "model.embed_tokens.weight" in t:
            t["model.layers.4.eh_proj.weight"] = torch.zeros(256, 512, dtype=torch.bfloat16)
    edit_tensors(path, add_mtp)
    assert torch.equal(load(path).prompt_logits(IDS), reference_logits["tiny-deepseek"])


def test_tied_config_with_its_own_lm_head_warns_and_follows_transformers(tmp_path, reference_logits):
    from transformers import AutoModelForCausalLM
    path = link_model(tmp_path)
    edit_json(path, lambda c: c.update(tie_word_embeddings=True))
    with pytest.warns(UserWarning, match="lm_head.weight") as record:
        logits = load(path).prompt_logits(IDS)
    assert "tie_word_embeddings" in str(record[0].message)
    # transformers does not tie a head the checkpoint holds with other values: it is the checkpoint's.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head = load_file(path / json.loads((path / "model.safetensors.index.json").read_text())
                     ["weight_map"]["lm_head.weight"])["lm_head.weight"]
    assert torch.equal(hf.lm_head.weight, head.float())
    assert torch.equal(logits, reference_logits["tiny-mixtral"])


def test_tied_config_with_an_equal_lm_head_stays_tied_without_warning(tmp_path):
    path = link_model(tmp_path)
    edit_json(path, lambda c: c.update(tie_word_embeddings=True))

    def same_head(shard, t):
        t.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in t:
            t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    edit_tensors(path, same_head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load(path).model
    assert model.lm_head is model.embed


# --- 4. memory preflight ---------------------------------------------------------------------------------

def _fast_and_small(fn):
    """fn's MoeEngineError message; it must come within 2 s and allocate under 100 MB (Python heap)."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        msg = error(fn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2.0
    assert peak < 100 * 2 ** 20, f"allocated {peak / 2**20:.0f} MB"
    return msg


def test_a_million_layers_fail_at_once(tmp_path):
    path = link_model(tmp_path)
    edit_json(path, lambda c: c.update(num_hidden_layers=10 ** 6))
    msg = _fast_and_small(lambda: load(path))
    assert "num_hidden_layers=1000000" in msg and "4 layer(s)" in msg


def test_a_billion_hidden_size_fails_at_once(tmp_path):
    path = link_model(tmp_path)
    edit_json(path, lambda c: c.update(hidden_size=10 ** 9, head_dim=32))
    msg = _fast_and_small(lambda: load(path))
    assert "model.embed_tokens.weight" in msg and "1000000000" in msg


def test_kv_cache_beyond_memory_is_refused_with_the_figures(tmp_path):
    path = link_model(tmp_path)
    edit_json(path, lambda c: c.update(max_position_embeddings=10 ** 10))
    msg = _fast_and_small(lambda: LLM(path, device="cpu", dtype="float32"))
    assert "KV cache of one 10000000000-token sequence" in msg and "max_model_len" in msg and "GiB" in msg


def test_weights_beyond_memory_are_refused_with_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setattr(loader_mod, "available_bytes", lambda device: 10 * 2 ** 20)
    msg = error(load, MIXTRAL)
    for words in ("not enough memory on cpu", "only 0.01 GiB is free", "float32", "--quantization",
                  "--dtype bfloat16", "another device", "num_kv_blocks"):
        assert words in msg, words
    weights = sum(t.numel() for f in MIXTRAL.glob("*.safetensors") for t in load_file(f).values()) * 4
    assert f"weights {weights / 2**30:.2f} GiB" in msg


def test_preflight_counts_quantized_weights_as_held(tmp_path, monkeypatch):
    """35 MiB free: the float32 model (~50 MB of weights) is refused, the same model with int4 experts (~20 MB
    held) loads; a refusal of a quantized load says how its weights are held and offers no --quantization
    it already has."""
    monkeypatch.setattr(loader_mod, "available_bytes", lambda device: 35 * 2 ** 20)
    assert "weights 0.05 GiB (float32)" in error(load, MIXTRAL)
    assert load(MIXTRAL, quantization="int4").generate(prompt_token_ids=[IDS[:4]])[0].token_ids
    monkeypatch.setattr(loader_mod, "available_bytes", lambda device: 2 ** 20)
    msg = error(load, MIXTRAL, quantization="int4")
    assert "(int4, the rest float32)" in msg and "--quantization" not in msg


def test_available_memory_is_plausible():
    free = available_bytes(torch.device("cpu"))
    assert free is None or 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- 5. paths --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,words", [
    ("../outside.safetensors", "outside the model folder"),
    ("/etc/model.safetensors", "outside the model folder"),
    ("sub/../../x.safetensors", "outside the model folder"),
    ("pytorch_model.bin", "not a .safetensors file"),
])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, bad, words):
    path = link_model(tmp_path)
    edit_json(path, lambda ix: ix["weight_map"].update({"model.norm.weight": bad}),
              "model.safetensors.index.json")
    msg = error(load, path)
    assert words in msg and repr(bad) in msg


def test_symlinked_shards_load_as_in_the_hub_cache(tmp_path, reference_logits):
    """Hub-cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in DEEPSEEK.iterdir():
        shutil.copy(f, blobs / f"{abs(hash(f.name))}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"{abs(hash(f.name))}")
    assert torch.equal(load(snap).prompt_logits(IDS), reference_logits["tiny-deepseek"])


def _deny(monkeypatch, module, denied: Path):
    real_open = open

    def guarded(file, *args, **kwargs):
        if Path(file).name == denied.name:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(module, "open", guarded, raising=False)


def test_unreadable_shard_says_permission_denied(tmp_path, monkeypatch):
    path = link_model(tmp_path, copy_shards=True)
    shard = path / "model-00002-of-00003.safetensors"
    if os.geteuid() != 0:
        shard.chmod(0)          # a real unreadable file where the tests do not run as root
    else:
        _deny(monkeypatch, checkpoint_mod, shard)     # root reads anything: simulate the refusal
    msg = error(load, path)
    assert "permission denied" in msg and shard.name in msg and "truncated" not in msg


def test_unreadable_config_says_permission_denied(tmp_path, monkeypatch):
    path = link_model(tmp_path)
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if self.name == "config.json" else real_read_text(self, *a, **k))
    msg = error(load, path)
    assert "permission denied" in msg and "config.json" in msg


# --- 6. side files ---------------------------------------------------------------------------------------

def _write(path: Path, name: str, content) -> None:
    (path / name).unlink(missing_ok=True)
    if isinstance(content, bytes):
        (path / name).write_bytes(content)
    else:
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))


def _tokenizer_error(path: Path) -> str:
    return error(load_tokenizer, path, json.loads((path / "config.json").read_text()))


@pytest.mark.parametrize("src,file,content,words", [
    (DEEPSEEK, "tokenizer.json", "{not json", ["tokenizer.json", "not a valid tokenizer.json"]),
    (DEEPSEEK, "tokenizer.json", {"model": 3}, ["tokenizer.json", "not a valid tokenizer.json"]),
    (MIXTRAL, "tokenizer.model", b"\x00garbage" * 8, ["tokenizer.model", "not a valid sentencepiece model"]),
    (MIXTRAL, "tokenizer_config.json", "{\"bos_token\": ", ["tokenizer_config.json", "not valid JSON"]),
    (MIXTRAL, "tokenizer_config.json", ["a list"], ["tokenizer_config.json", "JSON object, not a list"]),
    (MIXTRAL, "tokenizer_config.json", {"bos_token": 5}, ["tokenizer_config.json", "bos_token 5"]),
    (MIXTRAL, "tokenizer_config.json", {"add_bos_token": "yes"}, ["tokenizer_config.json", "add_bos_token='yes'"]),
    (MIXTRAL, "tokenizer_config.json", {"chat_template": 42}, ["tokenizer_config.json", "chat_template"]),
    (MIXTRAL, "tokenizer_config.json", {"chat_template": [{"name": "tools", "template": "x"}]},
     ["tokenizer_config.json", "\"default\""]),
    (MIXTRAL, "generation_config.json", "{eos", ["generation_config.json", "not valid JSON"]),
    (MIXTRAL, "generation_config.json", {"eos_token_id": 99999}, ["generation_config.json", "eos_token_id 99999",
                                                                   "vocabulary [0, 4096)", "not the prompt"]),
    (MIXTRAL, "generation_config.json", {"eos_token_id": [2, -1]}, ["generation_config.json", "eos_token_id -1"]),
    (MIXTRAL, "generation_config.json", {"bos_token_id": "1"}, ["generation_config.json", "bos_token_id '1'"]),
    (DEEPSEEK, "generation_config.json", {"bos_token_id": 4096}, ["generation_config.json", "bos_token_id 4096"]),
    (MIXTRAL, "config.json", None, ["config.json", "eos_token_id 70000"]),
])
def test_broken_side_file_is_named(tmp_path, src, file, content, words):
    path = link_model(tmp_path, src)
    if file == "config.json":
        edit_json(path, lambda c: c.update(eos_token_id=70000))
        (path / "generation_config.json").unlink()
    else:
        _write(path, file, content)
    msg = _tokenizer_error(path)
    assert all(w in msg for w in words), msg


def test_bad_special_token_blames_the_file_through_llm(tmp_path):
    path = link_model(tmp_path)
    _write(path, "generation_config.json", {"bos_token_id": 5000, "eos_token_id": 2})
    msg = error(load, path)
    assert "generation_config.json" in msg and "bos_token_id 5000" in msg and "prompt token" not in msg


# --- 7. chat templates under limits ----------------------------------------------------------------------

HOSTILE = {
    "huge range": ("{% for i in range(10**12) %}x{% endfor %}", "Range too big"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "ran longer than"),
    "loops over messages": ("{% for a in messages * 100000 %}{% for b in messages * 100000 %}{% endfor %}"
                            "{% endfor %}", "ran longer than"),
    "repeat": ("{{ 'x' * 10**10 }}", "10000000000 items"),
    "doubling ~": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                   "{% endfor %}{{ ns.s }}", "over the limit"),
    "doubling +": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                   "{% endfor %}{{ ns.s }}", "over the limit"),
    "center": ("{{ 'x'|center(10**10) }}", "width or count of 10000000000"),
    "ljust": ("{{ 'x'.ljust(10**10) }}", "width or count of 10000000000"),
    "format width": ("{{ '{:>9999999999}'.format('x') }}", "format width"),
    "percent width": ("{{ '%*s' % (9999999999, 'x') }}", "width or count"),
    "power": ("{{ 7 ** (10 ** 9) }}", "digits"),
    "replace": ("{{ ('x' * 1000000)|replace('x', 'y' * 1000) }}", "over the limit"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}", "an output of"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deep"),
    "raise_exception": ("{{ raise_exception('Conversation roles must alternate') }}",
                        "refused the conversation: Conversation roles must alternate"),
    "syntax": ("{% for m in messages %}{{ m }", "syntax error"),
    "undefined": ("{{ messages[0].nope.deeper }}", "UndefinedError"),
    "private attr": ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    "unsafe call": ("{{ cycler.__init__.__globals__ }}{{ messages.pop() }}", "SecurityError"),
}


@pytest.fixture(scope="module")
def template_folder(tmp_path_factory):
    return link_model(tmp_path_factory.mktemp("tpl"), DEEPSEEK)


def _with_template(folder: Path, template: str):
    edit_json(folder, lambda c: c.update(chat_template=template), "tokenizer_config.json")
    return load_tokenizer(folder, json.loads((folder / "config.json").read_text()))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_chat_template_stops_with_a_clear_error(template_folder, case):
    template, words = HOSTILE[case]
    tok = _with_template(template_folder, template)
    start = time.monotonic()
    msg = error(tok.apply_chat_template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 4.0      # the limit is 2 s of rendering
    assert words in msg and "tokenizer_config.json" in msg, msg


def test_endless_template_through_llm_chat(tmp_path):
    path = link_model(tmp_path, DEEPSEEK)
    edit_json(path, lambda c: c.update(chat_template=HOSTILE["nested loops"][0]), "tokenizer_config.json")
    llm = load(path)
    msg = error(llm.chat, [{"role": "user", "content": "hi"}])
    assert "ran longer than" in msg and "tokenizer_config.json" in msg


TYPICAL = {   # the constructs hub templates use: namespace, tojson, raise_exception, loop controls, tools
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"),
    "chatml-tools": (
        "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}"
        "{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}{%- endif %}"
        "{%- set ns = namespace(last_user=0) %}{%- for m in messages %}{%- if m.role == 'user' %}"
        "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
        "{%- for m in messages %}{%- if m.role == 'system' and not loop.first %}{% continue %}{% endif %}"
        "{{- '<|im_start|>' + m.role + '\\n' + m.content | trim }}{% if loop.index0 == ns.last_user %}"
        "{{- ' <last>' }}{% endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "json-and-generation": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content | tojson(indent=2) }}"
        "{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}{% if loop.last %}{% break %}{% endif %}\n"
        "{% endfor %}{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(' | ') }}"
        "{{ '%-6s|' % 'x' }}{{ '{:>5}'.format(7) }}{{ (messages | length) * 3 }}{{ 2 ** 10 }}"),
}
MESSAGES = [{"role": "user", "content": "Wie heißt <du> & \"warum\"?"},
            {"role": "assistant", "content": "def f():\n    return {'a': 1}"},
            {"role": "user", "content": "  und 世界  "}]


@pytest.mark.parametrize("name", sorted(TYPICAL))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_typical_templates_render_as_transformers(template_folder, name, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template
    tok = _with_template(template_folder, TYPICAL[name])
    kw = {"bos_token": tok.special_text("bos_token"), "eos_token": tok.special_text("eos_token")}
    want = render_jinja_template([MESSAGES], chat_template=TYPICAL[name],
                                 add_generation_prompt=add_generation_prompt, **kw)[0][0]
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == want


def test_private_attributes_stay_hidden_as_in_transformers(template_folder):
    tok = _with_template(template_folder, "[{{ messages.__class__ }}]")     # undefined, as in the sandbox
    assert tok.apply_chat_template(MESSAGES) == "[]"


def test_mistral_template_raises_on_bad_roles_as_transformers_does(template_folder):
    tok = _with_template(template_folder, TYPICAL["mistral"])
    msg = error(tok.apply_chat_template, MESSAGES[1:])
    assert "Conversation roles must alternate" in msg


def test_chat_template_jinja_file_is_used_as_transformers_does(tmp_path):
    from transformers import AutoTokenizer
    path = link_model(tmp_path, DEEPSEEK)
    _write(path, "chat_template.jinja", TYPICAL["chatml-tools"])
    want = AutoTokenizer.from_pretrained(path).apply_chat_template(MESSAGES, tokenize=False,
                                                                   add_generation_prompt=True)
    tok = load_tokenizer(path, json.loads((path / "config.json").read_text()))
    assert tok.apply_chat_template(MESSAGES) == want and tok.template_source.endswith("chat_template.jinja")
