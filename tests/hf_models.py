"""Helpers that build tiny random transformers models, save them, and compare our logits with theirs."""

from pathlib import Path

import torch

import transformers


def save_random(model_cls, config, path: Path, seed: int = 0, randomize_bias: bool = True) -> Path:
    """Random-weight HF model saved with save_pretrained; norms and the V3 correction bias get random
    values too, as do projection biases (transformers initialises them to ones / zeros, which would hide
    bugs)."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias") and "proj" in name:   # attention_bias: transformers initialises zeros
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if randomize_bias and name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(path)
    return path


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    with torch.no_grad():
        # An explicit mask: without one, generate masks every token equal to pad_token_id (a BOS of 0).
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: relative to the logits' scale, not per element (near-zero logits
    would make a per-element ratio meaningless)."""
    return float((ours - ref).abs().max() / ref.abs().max())


def assert_matches_transformers(llm, path: Path, ids: list[int], greedy_tokens: int = 32) -> None:
    """Our logits within 1e-4 (relative to their scale) of transformers', and the same greedy tokens."""
    from moe_engine import SamplingParams
    assert max_rel_error(llm.prompt_logits(ids), hf_logits(path, ids)) <= 1e-4
    ours = llm.generate(prompt_token_ids=[ids],
                        sampling_params=SamplingParams(max_tokens=greedy_tokens, ignore_eos=True))
    assert ours[0].token_ids == hf_greedy(path, ids, greedy_tokens)
