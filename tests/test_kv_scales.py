"""Checkpoint KV-cache scales (k_scale / v_scale, compressed-tensors kv_cache_scheme): an fp8 / int8 cache written
with them, checked against transformers with the same per-tensor quantization applied to its keys and values;
bad scales or schemes one line each, and ignored under kv_cache_dtype="auto"."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import WEIGHTS
from hf_models import max_rel_error, save_random
from kernels.attention import AttentionMetadata
from kernels.kv_quant import QuantizedCache, quantize_with_scale
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.cli import main
from moe_engine.scheduler import ScheduledBatch
from moe_engine.sequence import Sequence

LAYERS, HKV, QMAX = 2, 2, {"fp8": 448.0, "int8": 127.0}
CONFIG = dict(vocab_size=101, num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=24, num_attention_heads=4,
              num_key_value_heads=HKV, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
              initializer_range=0.25)
FP8_TENSOR = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
# How public checkpoints name a layer's scales: compressed-tensors / vLLM, ModelOpt, older compressed-tensors and
# AutoFP8 (k_proj.output_scale), AutoFP8's deprecated single kv_scale.
FORMS = {"self_attn": ("self_attn.k_scale", "self_attn.v_scale"),
         "modelopt": ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
         "output_scale": ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
         "kv_scale": ("self_attn.kv_scale", None)}


def prompt(n, seed):
    return torch.randint(3, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fake_quant(x, scale, kind):
    """x [B, Hkv, T, D] (transformers' keys / values) through the cache and back: x / scale per head saturated to
    the storage's range, rounded as it stores, times scale. The oracle: written independently of kernels.kv_quant."""
    s = scale.reshape(1, -1, 1, 1)
    y = (x / s).clamp(-QMAX[kind], QMAX[kind])
    y = y.to(torch.float8_e4m3fn).float() if kind == "fp8" else y.round()
    return y * s


def hf_run(path, ids, scales=None, kind="fp8", record=None, generate=0):
    """transformers' Mixtral on ids, its attention's keys and values quantized per tensor with scales
    ([(k [Hkv], v [Hkv]) per layer]; None: as they are), optionally recording them first. The logits [T, V],
    or with generate=n the n greedy tokens."""
    from transformers.models.mixtral import modeling_mixtral as m
    original = m.eager_attention_forward

    def attend(module, q, k, v, *args, **kwargs):
        if record is not None:
            record.append((module.layer_idx, k.clone(), v.clone()))
        if scales is not None:
            ks, vs = scales[module.layer_idx]
            k, v = fake_quant(k, ks, kind), fake_quant(v, vs, kind)
        return original(module, q, k, v, *args, **kwargs)

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                              experts_implementation="eager").eval()
    m.eager_attention_forward = attend
    try:
        with torch.no_grad():
            x = torch.tensor([ids])
            if generate:
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=generate,
                                     min_new_tokens=generate, do_sample=False, eos_token_id=None, pad_token_id=0)
                return out[0, len(ids):].tolist()
            return model(x).logits[0].float()
    finally:
        m.eager_attention_forward = original


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Mixtral and scales calibrated on one prompt (amax / qmax of each layer's keys and values,
    per tensor and per head), times 0.7 so that other prompts' largest values saturate."""
    path = save_random(transformers.MixtralForCausalLM, transformers.MixtralConfig(**CONFIG),
                       tmp_path_factory.mktemp("kv") / "base")
    seen = []
    hf_run(path, prompt(48, seed=5), record=seen)
    amax = {(i, w): t.abs().amax(dim=(0, 2, 3)) for i, k, v in seen for w, t in (("k", k), ("v", v))}   # [Hkv]
    scales = {(kind, per_head): [tuple((amax[i, w] if per_head else amax[i, w].max().expand(HKV)) * 0.7 / q
                                       for w in "kv") for i in range(LAYERS)]
              for kind, q in QMAX.items() for per_head in (False, True)}
    return path, scales


def checkpoint(base_path, dest, tensors: dict, scheme=FP8_TENSOR, drop=()):
    """A copy of base_path with extra tensors in its safetensors and, unless scheme is None, a KV-cache-only
    compressed-tensors quantization_config declaring scheme."""
    shutil.copytree(base_path, dest)
    weights = load_file(dest / "model.safetensors")
    weights.update(tensors)
    for name in drop:
        del weights[name]
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    if scheme is not None:
        cfg = json.loads((dest / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
                                      "kv_cache_scheme": scheme}
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def scale_tensors(scales, form="self_attn", shape=()):
    """The checkpoint tensors for scales [(k [Hkv], v [Hkv]) per layer] under a naming form; shape: () / (1,)
    for one value (the first head's), (Hkv, 1, 1) for compressed-tensors' attn_head."""
    k_name, v_name = FORMS[form]
    out = {}
    for i, (k, v) in enumerate(scales):
        pick = (lambda s: s.reshape(shape).clone()) if shape == (HKV, 1, 1) else (lambda s: s[0].reshape(shape).clone())
        if v_name is None:
            out[f"model.layers.{i}.{k_name}"] = pick(torch.maximum(k, v))
        else:
            out[f"model.layers.{i}.{k_name}"], out[f"model.layers.{i}.{v_name}"] = pick(k), pick(v)
    return out


def engine_prefill(llm, ids):
    """Prefill ids through the engine's own runner and caches; the caches and the block table used."""
    engine = llm.engine
    seq = Sequence(10_000, list(ids), SamplingParams(max_tokens=1), llm.max_model_len)
    assert engine.blocks.allocate_prompt(seq, len(ids))
    engine.forward(ScheduledBatch([seq], [len(ids)]))
    return engine.runner.kv_caches, seq.blocks


# -- the cache and the logits --------------------------------------------------------------------------------

def test_cache_holds_keys_and_values_at_the_checkpoint_scale(base, tmp_path):
    path, scales = base
    fp8 = scales["fp8", False]
    llm = LLM(checkpoint(path, tmp_path / "ct", scale_tensors(fp8)), kv_cache_dtype="fp8")
    assert llm.cache_info()["kv_scales"] == "the checkpoint's k_scale / v_scale, per tensor per layer"
    ids = prompt(40, seed=1)
    caches, table = engine_prefill(llm, ids)
    seen = []
    hf_run(path, ids, fp8, record=seen)          # quantized: later layers see what the engine's do
    slots = torch.tensor([table[p // llm.block_size] * llm.block_size + p % llm.block_size for p in range(len(ids))])
    saturated = 0
    for i, hf_k, hf_v in seen:
        for cache, hf, s in ((caches[i][0], hf_k, fp8[i][0]), (caches[i][1], hf_v, fp8[i][1])):
            assert isinstance(cache, QuantizedCache)
            assert torch.equal(cache.scale[slots], s.view(1, HKV, 1).expand(len(ids), HKV, 1))   # exactly s
            stored = cache.data[slots].float()                                   # [T, Hkv, D] e4m3 codes
            ours = cache[slots]                                                  # dequantised: codes * s
            assert torch.equal(ours, stored * s.view(1, HKV, 1))
            ref = fake_quant(hf, s, "fp8")[0].transpose(0, 1)                    # [T, Hkv, D]
            # Equal but for a rare value whose float32 key differs in the last bit across a rounding boundary.
            assert (ours == ref).float().mean() >= 0.99
            assert ((ours - ref).abs() <= ref.abs() * 2 ** -3 + s.view(1, HKV, 1) * 2 ** -9).all()
            over = (hf[0].transpose(0, 1) / s.view(1, HKV, 1)).abs() > 448 * 1.01
            assert torch.equal(stored.abs()[over], torch.full_like(stored[over], 448.0))   # saturated, not inf
            saturated += int(over.sum())
    assert saturated > 0                                                          # the clamp was exercised


@pytest.mark.parametrize("form,kind,per_head", [("self_attn", "fp8", False), ("modelopt", "fp8", False),
                                                ("output_scale", "fp8", False), ("kv_scale", "fp8", False),
                                                ("self_attn", "fp8", True), ("self_attn", "int8", False)])
def test_logits_match_transformers_with_the_same_quantization(base, tmp_path, form, kind, per_head):
    path, scales = base
    s = scales[kind, per_head]
    if form == "kv_scale":                 # one scale for both: the larger, as vLLM duplicates it
        s = [(torch.maximum(k, v), torch.maximum(k, v)) for k, v in s]
    scheme = (dict(FP8_TENSOR, type="int") if kind == "int8"
              else dict(FP8_TENSOR, strategy="attn_head") if per_head else None if form != "self_attn" else FP8_TENSOR)
    tensors = scale_tensors(s, form, (HKV, 1, 1) if per_head else (1,) if form == "output_scale" else ())
    llm = LLM(checkpoint(path, tmp_path / form, tensors, scheme), kv_cache_dtype=kind)
    assert "per KV head" in llm.cache_info()["kv_scales"] if per_head else "per tensor" in llm.cache_info()["kv_scales"]
    ids = prompt(40, seed=1)
    ref = hf_run(path, ids, s, kind)
    ours = llm.prompt_logits(ids)
    assert max_rel_error(ours, ref) <= 1e-4
    # The oracle tells the scales apart: the same cache dtype with per-token scales is far from it.
    per_token = LLM(path, kv_cache_dtype=kind).prompt_logits(ids)
    assert max_rel_error(per_token, ref) > 10 * max(max_rel_error(ours, ref), 1e-6)


def test_greedy_tokens_and_static_step_match_transformers(base, tmp_path):
    """32 greedy tokens (prefill, then decode steps reading the cache) equal transformers' under the same
    quantization; the static decode step (what CUDA graphs capture; eagerly here) gives the same."""
    path, scales = base
    fp8 = scales["fp8", False]
    ckpt = checkpoint(path, tmp_path / "ct", scale_tensors(fp8))
    ids = prompt(20, seed=3)
    want = hf_run(path, ids, fp8, "fp8", generate=32)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    for graphs in (False, True):
        llm = LLM(ckpt, kv_cache_dtype="fp8", cuda_graphs=graphs)
        assert llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].token_ids == want


def test_triton_decode_kernel_reads_a_fixed_scale_cache():
    """The decode kernel (the interpreter here) over caches written with fixed per-head scales, some values
    saturating, against plain attention over their dequantised rows."""
    pytest.importorskip("triton")
    from kernels.triton_attention_quant import paged_decode_quant_triton
    g = torch.Generator().manual_seed(0)
    block_size, S, H, D = 4, 64, 4, 16
    scale = torch.tensor([0.004, 0.02])
    caches = [QuantizedCache.empty(S, HKV, D, D, "fp8", torch.float32, "cpu", fixed_scale=scale) for _ in range(2)]
    lens = [5, 9, 1]
    tables = [[3, 7], [0, 2, 9], [5]]
    meta = AttentionMetadata.build(tables, lens, [1, 1, 1], block_size, torch.device("cpu"))
    slots = torch.cat(list(meta.context_slots))
    for c in caches:
        c.write(torch.randn(len(slots), HKV, D, generator=g) * 3, slots)
    assert caches[0].data.float().abs().max() == 448                             # saturated
    q = torch.randn(3, H, D, generator=g)
    out = paged_decode_quant_triton(q, caches[0], caches[1], meta.block_tables, meta.device_context_lens(q.device),
                                    block_size, 0.3, max(lens))
    for b, ctx_slots in enumerate(meta.context_slots):
        k, v = (c[ctx_slots].repeat_interleave(H // HKV, 1) for c in caches)    # [ctx, H, D]
        ref = torch.einsum("hk,khd->hd", (torch.einsum("hd,khd->hk", q[b], k) * 0.3).softmax(-1), v)
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)


def test_quantize_with_scale_saturates():
    x = torch.tensor([[[1.0, -1.0, 1000.0, -1000.0]], [[0.5, 0.0, 3.0, -3.0]]])          # [T 2, H 1, D 4]
    q, slots = quantize_with_scale(x, torch.tensor([0.5]), "fp8", 4)
    assert q.float().tolist() == [[[2.0, -2.0, 448.0, -448.0]], [[1.0, 0.0, 6.0, -6.0]]]
    assert slots.shape == (2, 1, 1) and (slots == 0.5).all()
    q, _ = quantize_with_scale(x, torch.tensor([0.5]), "int8", 4)
    assert q.tolist() == [[[2, -2, 127, -127]], [[1, 0, 6, -6]]]


# -- which cache uses them ------------------------------------------------------------------------------------

def test_auto_keeps_the_model_dtype_and_other_caches_compute_their_scales(base, tmp_path):
    """kv_cache_dtype='auto' never turns into fp8 because a checkpoint carries scales (cache_info says they
    exist); int8 and int4 caches compute their own scales from fp8-calibrated ones, exactly as without them."""
    path, scales = base
    ckpt = checkpoint(path, tmp_path / "ct", scale_tensors(scales["fp8", False]))
    ids = prompt(30, seed=2)
    auto = LLM(ckpt)
    assert auto.cache_info()["dtype"] == "float32"
    assert "kv_cache_dtype='fp8'" in auto.cache_info()["kv_scales"]
    assert torch.equal(auto.prompt_logits(ids), LLM(path).prompt_logits(ids))
    for d in ("int8", "int4"):
        llm = LLM(ckpt, kv_cache_dtype=d)
        assert llm.cache_info()["kv_scales"].startswith("computed at write")
        assert torch.equal(llm.prompt_logits(ids), LLM(path, kv_cache_dtype=d).prompt_logits(ids))


def test_info_names_the_scales_in_use(base, tmp_path, capsys):
    path, scales = base
    ckpt = checkpoint(path, tmp_path / "ct", scale_tensors(scales["fp8", False]))
    assert main(["info", "--model", str(ckpt), "--kv-cache-dtype", "fp8"]) == 0
    assert "the checkpoint's k_scale / v_scale, per tensor per layer" in capsys.readouterr().out


# -- bad scales and schemes -------------------------------------------------------------------------------------

def _bad_cases(s):
    """name -> (tensors, scheme, tensors to drop, what the one line must say)."""
    good = scale_tensors(s)
    k0 = "model.layers.0.self_attn.k_scale"
    with_k0 = lambda t: {**good, k0: t}                                          # noqa: E731
    return {
        "missing layer": (good, FP8_TENSOR, ["model.layers.1.self_attn.v_scale"],
                          "model.layers.1.self_attn.v_scale is missing"),
        "declared, none stored": ({}, FP8_TENSOR, [], "model.layers.0.self_attn.k_scale is missing"),
        "shape": (with_k0(torch.full((3,), 0.01)), FP8_TENSOR, [], f"{k0} has shape [3], expected one value"),
        "per head, tensor scheme": (with_k0(torch.full((HKV, 1, 1), 0.01)), FP8_TENSOR, [],
                                    f"{k0} has shape [2, 1, 1], expected one value"),
        "zero": (with_k0(torch.tensor(0.0)), FP8_TENSOR, [], f"{k0} holds 0, not a positive finite scale"),
        "negative": (with_k0(torch.tensor(-0.01)), FP8_TENSOR, [], f"{k0} holds -0.01, not a positive"),
        "nan": (with_k0(torch.tensor(float("nan"))), FP8_TENSOR, [], f"{k0} holds nan"),
        "inf": (with_k0(torch.tensor(float("inf"))), None, [], f"{k0} holds inf"),
        "integer": (with_k0(torch.tensor(3, dtype=torch.int32)), FP8_TENSOR, [], f"{k0} has dtype int32"),
        "4 bits": (good, dict(FP8_TENSOR, num_bits=4, type="int"), [], "kv_cache_scheme is 4-bit int"),
        "channel": (good, dict(FP8_TENSOR, strategy="channel"), [], "kv_cache_scheme is strategy 'channel'"),
        "asymmetric": (good, dict(FP8_TENSOR, symmetric=False), [], "kv_cache_scheme is asymmetric"),
        "zero point": ({**good, "model.layers.0.self_attn.k_zero_point": torch.tensor(3.0)}, None, [],
                       "model.layers.0.self_attn.k_zero_point is a non-zero KV zero point"),
    }


@pytest.mark.parametrize("case", list(_bad_cases([(torch.ones(HKV), torch.ones(HKV))] * LAYERS)))
def test_bad_scales_are_one_line_naming_the_tensor_and_ignored_under_auto(base, tmp_path, case):
    path, scales = base
    tensors, scheme, drop, message = _bad_cases(scales["fp8", False])[case]
    ckpt = checkpoint(path, tmp_path / "bad", tensors, scheme, drop)
    with pytest.raises(MoeEngineError) as err:
        LLM(ckpt, kv_cache_dtype="fp8")
    text = str(err.value)
    assert message in text and "\n" not in text and "kv_cache_dtype='auto'" in text, text
    ids = prompt(12, seed=4)
    assert torch.equal(LLM(ckpt).prompt_logits(ids), LLM(path).prompt_logits(ids))   # auto: loads, exact


def test_bad_scales_through_the_cli_are_one_line(base, tmp_path, capsys):
    path, _ = base
    ckpt = checkpoint(path, tmp_path / "bad", {"model.layers.0.self_attn.k_scale": torch.tensor(0.0),
                                               "model.layers.0.self_attn.v_scale": torch.tensor(0.1)})
    assert main(["info", "--model", str(ckpt), "--kv-cache-dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.0.self_attn.k_scale holds 0" in err[0]


def test_a_quantized_copy_keeps_its_kv_scales_and_scheme(base, tmp_path):
    """`moe-engine quantize` over a checkpoint with KV scales: the pack-quantized copy carries them and the
    kv_cache_scheme they were calibrated under, and its fp8 cache is written with them."""
    path, scales = base
    int8 = scales["int8", False]
    src = checkpoint(path, tmp_path / "ct", scale_tensors(int8), dict(FP8_TENSOR, type="int"))
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--out", str(out), "--quiet", "--quantization", "int8"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["kv_cache_scheme"] == dict(FP8_TENSOR, type="int") and cfg["config_groups"]
    llm = LLM(out, kv_cache_dtype="int8")
    assert llm.cache_info()["kv_scales"] == "the checkpoint's k_scale / v_scale, per tensor per layer"
    caches, _ = engine_prefill(llm, prompt(10, seed=6))
    assert all(torch.equal(c.fixed_scale, s) for layer, pair in zip(caches, int8) for c, s in zip(layer, pair))


def test_mla_cache_computes_its_own_scales_beside_checkpoint_scales(tmp_path):
    """A latent (MLA) cache has no per-head keys and values for k_scale / v_scale to scale: they load, are not
    used (cache_info says so), and the fp8 cache is what it is without them."""
    src = WEIGHTS / "tiny-deepseek"
    dest = tmp_path / "ds"
    shutil.copytree(src, dest)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    extra = {f"model.layers.{i}.self_attn.{w}_scale": torch.tensor(0.02) for i in range(layers) for w in "kv"}
    save_file(extra, dest / "kv.safetensors", metadata={"format": "pt"})
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    index["weight_map"].update({n: "kv.safetensors" for n in extra})
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    llm = LLM(dest, kv_cache_dtype="fp8")
    assert "not used here" in llm.cache_info()["kv_scales"]
    ids = prompt(20, seed=7)
    assert torch.equal(llm.prompt_logits(ids), LLM(src, kv_cache_dtype="fp8").prompt_logits(ids))
