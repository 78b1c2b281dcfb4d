"""Shared layers: RMSNorm, rotary embeddings (default and YaRN), SwiGLU MLP, plain linear weights."""

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.linear import swiglu


def weight(*shape: int, dtype=None) -> nn.Parameter:
    """An uninitialised, frozen parameter: every value comes from the checkpoint."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.weight = weight(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_and_norm(x, None)[0]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the norm after it, fused on CUDA; on
        the CPU a float32 norm is kernels.rms_norm_cpu (the same result in about half the time)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class Rotary(nn.Module):
    """Rotary position embedding over `dim` channels; `scaling` is a HF rope_scaling dict or None.

    `interleave` rotates channel pairs (0,1), (2,3), ... (DeepSeek's layout); otherwise the two halves
    (Llama/Mixtral's rotate_half layout). Heads wider than `dim` are rotated in their first `dim`
    channels and the rest pass through (GLM's partial_rotary_factor).
    """

    def __init__(self, dim: int, theta: float, scaling: dict | None, interleave: bool = False,
                 max_position_embeddings: int | None = None):
        super().__init__()
        self.interleave, self.dim = interleave, dim
        pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)   # [dim/2]
        inv_freq = 1.0 / pos_freqs
        self.attention_factor = 1.0
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "yarn":
            inv_freq, self.attention_factor = self._yarn(dim, theta, scaling, pos_freqs, max_position_embeddings)
        elif kind == "linear":
            inv_freq = 1.0 / (float(scaling["factor"]) * pos_freqs)
        elif kind != "default":
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, yarn)")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def _yarn(dim, theta, s, pos_freqs, max_pos):
        original = s["original_max_position_embeddings"]
        factor = s.get("factor") or max_pos / original
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                                if mscale and mscale_all else yarn_mscale(factor))
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp   # 1 where high-frequency channels keep their original frequency
        return (1.0 / (factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate,
                float(attention_factor))

    def angles(self, positions: torch.Tensor, dtype=torch.float32) -> kernels.RotaryAngles:
        """Angles for positions [T], shaped [T, 1, dim/2] to broadcast over heads; computed once a step in
        float32 and cast once to the dtype the layers rotate in, then put in the form this device's
        rotation takes (kernels.rotary_angles)."""
        freqs = positions.float()[:, None, None] * self.inv_freq              # [T, 1, dim/2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        if dtype != torch.float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return kernels.rotary_angles(cos, sin, self.interleave)

    def forward(self, x: torch.Tensor, angles: kernels.RotaryAngles) -> torch.Tensor:
        """x [T, H, dim] rotated by the step's angles; x [T, H, > dim]: its first dim channels rotated."""
        if x.shape[-1] != self.dim:
            return torch.cat([kernels.rotate(x[..., :self.dim], angles, self.interleave), x[..., self.dim:]], -1)
        return kernels.rotate(x, angles, self.interleave)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up stacked in one weight w13 [2I, D]."""

    def __init__(self, dim: int, intermediate: int, dtype=None):
        super().__init__()
        self.w13 = weight(2 * intermediate, dim, dtype=dtype)
        self.w2 = weight(dim, intermediate, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w13, self.w2)                     # [T, D]

    def projections(self) -> list[nn.Parameter]:
        return [self.w13, self.w2]
