"""gpt-oss family vs transformers.GptOssForCausalLM in float32: sinks, sliding windows (prompts longer than the
window), biases, the clamped SwiGLU; paged decode, batching, preemption, prefix caching; MXFP4 checkpoints."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_models import assert_matches_transformers, max_rel_error
from kernels.moe import ClampedSwiGLU
from moe_engine import LLM, SamplingParams
from moe_engine.mxfp4 import E2M1, dequantize_mxfp4
from test_cli import CPU
from test_parity_mixtral import incremental_logits

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=256, initializer_range=0.3)
YARN = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64}
CASES = {
    # Window 8 on layers 0 and 2 (transformers' alternation), YaRN without truncation as gpt-oss ships it.
    "window8-yarn": dict(sliding_window=8, rope_parameters={**YARN, "truncate": False}),
    # No attention biases, MHA, window 5 on the last two layers, a clamp low enough to bite, plain RoPE.
    "nobias-window5-clamp": dict(attention_bias=False, num_key_value_heads=4, sliding_window=5,
                                 layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                 swiglu_limit=1.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # MQA, 3 of 6 experts, a window longer than the prompt (exactly full attention there), truncated YaRN.
    "mqa-k3-window64": dict(num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=3, sliding_window=64,
                            swiglu_alpha=1.2, rope_parameters={**YARN, "truncate": True}),
}


def random_gpt_oss(name: str, seed: int = 0) -> transformers.GptOssForCausalLM:
    """A tiny random GptOss; the biases transformers initialises to zero (experts, attention) and the norms
    get random values too, and the sinks a scale that matters."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**BASE, **CASES[name]})).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif pname.endswith("sinks"):
                p.copy_(1.5 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> checkpoint folder, written once per module."""
    root = tmp_path_factory.mktemp("gpt_oss")
    out = {}
    for name in CASES:
        random_gpt_oss(name).save_pretrained(root / name)
        out[name] = root / name
    return out


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_config_matches_transformers(saved, name):
    """20 prompt tokens against windows of 5 and 8: logits and 32 greedy tokens as transformers'."""
    llm = LLM(saved[name], block_size=4)
    windows = [layer.attn.window for layer in llm.model.layers]
    assert any(w is not None and w < 20 for w in windows) or name == "mqa-k3-window64"
    assert any(w is None for w in windows)
    assert_matches_transformers(llm, saved[name], prompt(20), greedy_tokens=32)


def test_sinks_window_and_clamp_change_the_result(saved):
    """The checks above could not pass with the sinks, the window or the clamp ignored."""
    llm, ids = LLM(saved["nobias-window5-clamp"]), prompt(20)
    ref = llm.prompt_logits(ids)
    for layer in llm.model.layers:
        layer.mlp.activation = ClampedSwiGLU(layer.mlp.activation.alpha, 1e9)
    assert max_rel_error(llm.prompt_logits(ids), ref) > 1e-3
    path = saved["window8-yarn"]
    llm, ids = LLM(path), prompt(20)
    ref = llm.prompt_logits(ids)
    attn = llm.model.layers[0].attn
    attn.window = None
    assert max_rel_error(llm.prompt_logits(ids), ref) > 1e-3
    attn.window = 8
    sinks = attn.sinks.clone()
    attn.sinks.fill_(-1e4)
    assert max_rel_error(llm.prompt_logits(ids), ref) > 1e-3
    attn.sinks.copy_(sinks)
    assert max_rel_error(llm.prompt_logits(ids), ref) == 0


@pytest.mark.parametrize("T", [1, 5])
def test_dense_biased_experts_match_the_reference(T):
    """The sync-free formulation CUDA graphs and compiled steps use for gpt-oss's experts."""
    from kernels.moe import fused_moe_dense_biased, fused_moe_ref
    E, D, I, k = 5, 16, 12, 2
    x, w13, w2 = torch.randn(T, D), torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    b13, b2 = torch.randn(E, 2 * I), torch.randn(E, D)
    weights, ids = torch.rand(T, E).softmax(-1).topk(k)
    act = ClampedSwiGLU(1.702, 1.0)
    ref = fused_moe_ref(x, w13, w2, weights, ids, b13, b2, act)
    assert max_rel_error(fused_moe_dense_biased(x, w13, w2, weights, ids, b13, b2, act), ref) <= 1e-5
    assert max_rel_error(fused_moe_ref(x, w13, w2, weights, ids), ref) > 1e-2


@pytest.mark.parametrize("block_size", [4, 16])
def test_incremental_decode_equals_full_forward(saved, block_size):
    llm = LLM(saved["nobias-window5-clamp"], block_size=block_size)
    ids = prompt(30, seed=4)
    full = llm.prompt_logits(ids)
    assert max_rel_error(incremental_logits(llm, ids, 7), full[6:]) <= 1e-5


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
LENGTHS = [1, 3, 6, 9, 14, 20, 27, 40]


@pytest.fixture(scope="module")
def batch_case(saved):
    path = saved["window8-yarn"]
    prompts = [prompt(n, seed=10 + n) for n in LENGTHS]
    alone_llm = LLM(path, block_size=4, enable_prefix_caching=False)
    alone = [alone_llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in prompts]
    return path, prompts, alone


def test_batch_of_8_equals_each_alone(batch_case):
    path, prompts, alone = batch_case
    llm = LLM(path, block_size=4, max_num_batched_tokens=16)       # long prompts get chunked
    assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)] == alone


def test_preemption_still_matches(batch_case):
    path, prompts, alone = batch_case
    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    llm = LLM(path, block_size=4, num_kv_blocks=longest // 4 + 3)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_caching_reuses_blocks_past_the_window(batch_case):
    """A shared 24-token prefix (3 windows of 8) read from the cache gives the tokens computed afresh."""
    path, _, _ = batch_case
    llm = LLM(path, block_size=4)
    prefix = prompt(24, seed=7)
    a, b = prefix + [5, 6, 7], prefix + [8, 9]
    first = llm.generate(prompt_token_ids=[a], sampling_params=GREEDY)[0].token_ids
    hits = llm.engine.blocks.prefix_hits
    second = llm.generate(prompt_token_ids=[b], sampling_params=GREEDY)[0].token_ids
    assert llm.engine.blocks.prefix_hits - hits == 6
    plain = LLM(path, block_size=4, enable_prefix_caching=False)
    assert [first, second] == [plain.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids
                               for p in (a, b)]


# --- MXFP4 -------------------------------------------------------------------------------------------------


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float (K a multiple of 32) -> (blocks [..., N, K/32, 16] uint8, scales [..., N, K/32]
    uint8): per 32 values the smallest power of two putting them within e2m1's +-6, each value rounded to
    the nearest e2m1 code, two codes a byte (the even-indexed value in the low nibble)."""
    *prefix, N, K = w.shape
    groups = w.reshape(*prefix, N, K // 32, 32)
    exponent = torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 6).ceil().clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    magnitudes = torch.tensor(E2M1[:8])
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1) | ((scaled < 0).long() << 3)   # [..., 32]
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent[..., 0] + 127).to(torch.uint8)


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)   # every code
    scales = torch.randint(100, 150, (3, 10, 4), generator=gen, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)             # [3, 128, 10]
    assert torch.equal(dequantize_mxfp4(blocks, scales).transpose(-1, -2), ref)
    w = torch.randn(2, 6, 64, generator=gen)
    back = dequantize_mxfp4(*quantize_mxfp4(w))
    assert (back - w).abs().max() <= w.abs().max() / 4       # a coarse format, but the right values
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(back)), back)   # representable values are exact


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """A tiny gpt-oss saved as the hub saves gpt-oss-20b: experts as *_blocks / *_scales, the rest bf16-free
    float32, quantization_config as its config.json."""
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4") / "m"
    CASES["mxfp4"] = dict(hidden_size=64, intermediate_size=32, sliding_window=6,
                          rope_parameters={**YARN, "truncate": False})
    try:
        random_gpt_oss("mxfp4", seed=5).save_pretrained(path)
    finally:
        del CASES["mxfp4"]
    state = load_file(path / "model.safetensors")
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(state.pop(name).transpose(-1, -2))   # stored [E, out, in]
        state[name + "_blocks"], state[name + "_scales"] = blocks, scales
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_mxfp4_checkpoint_matches_transformers(mxfp4_checkpoint):
    """transformers itself reads and dequantises the folder: the same logits and greedy tokens."""
    llm = LLM(mxfp4_checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_checkpoint, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True),
        experts_implementation="eager").eval()
    assert torch.equal(hf.model.layers[1].mlp.experts.down_proj.transpose(-1, -2),
                       llm.model.layers[1].mlp.w2.dequantize())      # held in MXFP4, its values transformers'
    ids = prompt(20, seed=2)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits[0]
        greedy = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert max_rel_error(llm.prompt_logits(ids), ref) <= 1e-4
    ours = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=32, ignore_eos=True))
    assert ours[0].token_ids == greedy


def test_mxfp4_checkpoint_without_its_scales_is_one_clear_error(mxfp4_checkpoint, tmp_path):
    import shutil
    from moe_engine import MoeEngineError
    broken = tmp_path / "broken"
    shutil.copytree(mxfp4_checkpoint, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeEngineError, match="missing 1: model.layers.1.mlp.experts.down_proj .*unexpected 1: "
                                             "model.layers.1.mlp.experts.down_proj_blocks"):
        LLM(broken)


def test_info_reports_gpt_oss(saved, capsys):
    from moe_engine.cli import main     # in process: a subprocess would spend its time importing torch
    assert main(["info", "--model", str(saved["window8-yarn"]), *CPU, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "gpt_oss" in out and "sliding window 8 on 2 of 3 layers" in out and "4 routed + 0 shared" in out


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8", "int4"])
def test_speculation_over_a_compressed_cache_with_sinks_and_windows(saved, kv_cache_dtype):
    """Greedy n-gram speculation gives plain decoding's tokens on window + sink layers, the 1 + k verify rows
    reading the (compressed) paged cache across a window shorter than the context."""
    ids, params = prompt(20), SamplingParams(max_tokens=24)
    runs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3}):
        llm = LLM(saved["window8-yarn"], device="cpu", dtype=torch.float32, block_size=4,
                  kv_cache_dtype=kv_cache_dtype, speculative_config=spec)
        runs.append(llm.generate([ids], params)[0])
    plain, speculated = runs
    assert speculated.num_draft_tokens > 0 and speculated.token_ids == plain.token_ids


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_keep_their_biases_and_clamp(saved, fmt):
    """gpt-oss experts held quantized run with their biases and clamped SwiGLU: equal to the same model on
    the dequantised experts (a quantized path that dropped either would differ by far more than 1e-4)."""
    from kernels.quant import QuantizedWeight
    from moe_engine.quantize import held_weight, quantized_weights
    path = saved["nobias-window5-clamp"]
    quant = LLM(path, device="cpu", dtype=torch.float32, quantization=fmt, quant_group_size=8)
    held = quantized_weights(quant.model)
    assert held and all(isinstance(q, QuantizedWeight) for q in held.values())
    twin = LLM(path, device="cpu", dtype=torch.float32)
    for name, qw in held.items():
        held_weight(twin.model, name).copy_(qw.dequantize())
    ids = prompt(12)
    assert max_rel_error(quant.prompt_logits(ids), twin.prompt_logits(ids)) <= 1e-4
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    assert (quant.generate(prompt_token_ids=[ids], sampling_params=params)[0].token_ids
            == twin.generate(prompt_token_ids=[ids], sampling_params=params)[0].token_ids)
