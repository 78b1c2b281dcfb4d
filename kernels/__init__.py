"""Hot ops of moe-engine: each has one entry point that dispatches to a kernel or its torch reference."""

from kernels.attention import paged_attention, paged_attention_ref, write_cache
from kernels.moe import fused_moe, fused_moe_ref
from kernels.mla import absorbed_query
from kernels.pointwise import (RotaryAngles, rms_norm, rms_norm_cpu, rotary, rotary_angles, rotary_swapped, rotate,
                               spread_angles, write_latent_cache, write_rotated_latent)
from kernels.route import fused_route, ranking_is_free

__all__ = ["RotaryAngles", "absorbed_query", "fused_moe", "fused_moe_ref", "fused_route", "paged_attention",
           "paged_attention_ref", "ranking_is_free", "rms_norm", "rms_norm_cpu", "rotary", "rotary_angles",
           "rotary_swapped", "rotate", "spread_angles", "write_cache", "write_latent_cache", "write_rotated_latent"]
