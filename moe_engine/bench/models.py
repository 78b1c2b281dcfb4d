"""Random-weight models with real shapes for speed benchmarks, and a transformers twin sharing their memory."""

import math

import torch

from model_defs import model_family

# Published shapes (config.json field names). Random weights: fine for speed, never for quality.
SHAPES = {
    "mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5)),
    "deepseek-v2-lite": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy",
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096)),
    # A real shape that fits a 24 GB CPU machine in bf16: Mixtral-style with half of OLMoE-1B-7B's layers
    # (3.56B parameters, ~0.64B active per token).
    "mixtral-3.6b": ("mixtral", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=16, num_local_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, rope_theta=1e4, rms_norm_eps=1e-5)),
    # Real shapes for a 24 GB CPU machine: OLMoE-1B-7B in bf16 (~14 GB), Qwen3-30B-A3B with int4 experts
    # (~18 GB; bench decode --quantization int4), DeepSeek-V2-Lite with int8 / int4 experts.
    "olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, rope_theta=1e4, rms_norm_eps=1e-5, norm_topk_prob=False)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Small stand-ins with the same structure, to check the benchmark's plumbing on a CPU.
    "mixtral-tiny": ("mixtral", dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024)),
    "deepseek-tiny": ("deepseek_v2", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy", norm_topk_prob=False,
        max_position_embeddings=1024)),
}


def hf_config_dict(name: str) -> dict:
    model_type, fields = SHAPES[name]
    return {"model_type": model_type, **fields}


def _classes(cfg: dict):
    return model_family(cfg["model_type"])


def weight_bytes(name: str, dtype) -> int:
    """Bytes the named shape's weights take in dtype, counted on the meta device (nothing allocated)."""
    cfg = hf_config_dict(name)
    args_cls, model_cls = _classes(cfg)
    with torch.device("meta"):
        model = model_cls(args_cls.from_hf_config(cfg), dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_random(name: str, device, dtype, seed: int = 0, quantization=None):
    """Our model with the named shape, random weights made directly on the device; with quantization (a
    moe_engine.quantize.QuantSpec) the weights it selects are made directly in their held format (random
    values and scales of the same spread, never a full-precision copy first)."""
    cfg = hf_config_dict(name)
    args_cls, model_cls = _classes(cfg)
    with torch.device(device):            # empty tensors: no memory is touched until they are written
        model = model_cls(args_cls.from_hf_config(cfg), dtype=dtype)
    if quantization is not None:          # the full-precision tensors it replaces are dropped unwritten
        from moe_engine.quantize import quantize_weights
        quantize_weights(model, quantization, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32))
            else:
                fan_in = p.shape[-1]
                p.normal_(0, 1 / math.sqrt(fan_in), generator=gen)
        if quantization is not None:
            _fill_quantized(model, gen)
    model.post_load()
    return model.eval()


def _fill_quantized(model, gen) -> None:
    """Random held values for every QuantizedWeight: uniform integers (or fp8 values) over the format's range
    and scales that give each weight a spread of about 1 / sqrt(fan_in), as the full-precision ones have."""
    from moe_engine.quantize import quantized_weights
    for qw in quantized_weights(model).values():
        fan_in = qw.shape[-1]
        q = qw.qweight
        if qw.format == "fp8":
            q.copy_(torch.randn(q.shape, generator=gen, device=q.device).to(q.dtype))
            spread = 1.0
        else:
            bits = 8 if q.dtype == torch.int8 else 4
            top = 127 if bits == 8 else 255                  # int4: two random nibbles per byte
            q.copy_(torch.randint(-top if bits == 8 else 0, top + 1, q.shape, generator=gen,
                                  device=q.device, dtype=torch.int16).to(q.dtype))
            spread = (127 if bits == 8 else 8) / math.sqrt(3)
        qw.scale.fill_(1 / (math.sqrt(fan_in) * spread))
        if qw.zero is not None:
            qw.zero.zero_()


def hf_twin(model, name: str):
    """The transformers implementation of the same architecture, its parameters aliasing ours (no copy)."""
    import transformers
    cfg = hf_config_dict(name)
    config = transformers.AutoConfig.for_model(**cfg)
    param = next(model.parameters())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    state = {}
    for ckpt_name, (ours, index) in model.checkpoint_targets().items():
        tensor = model.get_parameter(ours)
        internal = ckpt_name.replace("block_sparse_moe", "mlp")
        if ".experts." in internal:        # per-expert checkpoint names -> transformers' stacked tensors
            prefix = internal.split(".experts.")[0]
            is_down = internal.endswith(("w2.weight", "down_proj.weight"))
            state[f"{prefix}.experts.{'down_proj' if is_down else 'gate_up_proj'}"] = tensor
        else:
            state[internal] = tensor if index is None else tensor[index]
    # Our router weights are float32; transformers keeps its parameters in the model dtype.
    state = {k: t if t.dtype == param.dtype else t.to(param.dtype) for k, t in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"hf twin mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rotary = hf.model.rotary_emb
    with torch.device(param.device):                 # its buffers were made on meta
        hf.model.rotary_emb = type(rotary)(config)
    return hf.eval()
