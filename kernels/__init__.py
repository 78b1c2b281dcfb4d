"""Hot ops of moe-engine: each has one entry point that dispatches to a kernel or its torch reference."""

from kernels.attention import paged_attention, paged_attention_ref, write_cache
from kernels.moe import fused_moe, fused_moe_ref
from kernels.pointwise import rms_norm, rms_norm_cpu, rotary, rotary_swapped, spread_angles, write_latent_cache
from kernels.route import fused_route

__all__ = ["fused_moe", "fused_moe_ref", "fused_route", "paged_attention", "paged_attention_ref",
           "rms_norm", "rms_norm_cpu", "rotary", "rotary_swapped", "spread_angles", "write_cache",
           "write_latent_cache"]
