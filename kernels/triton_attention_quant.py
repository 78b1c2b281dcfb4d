"""Paged decode attention in Triton over a compressed cache (kernels.kv_quant.QuantizedCache): fp8, int8 or int4
keys and values dequantised block by block inside the loop, as kernels.triton_attention does for a full cache."""

import torch
import triton
import triton.language as tl

from kernels.kv_quant import QuantizedCache
from kernels.triton_attention import _combine_kernel
from kernels.tuning import decode_splits, decode_tuning


@triton.jit
def _decode_quant_kernel(q_ptr, k_ptr, ks_ptr, kz_ptr, kb_ptr, v_ptr, vs_ptr, vz_ptr, out_ptr, lse_ptr, block_tables_ptr,
                         context_lens_ptr, qk_scale, group, page_size, dim_a, dim_b, dim_v, group_k, group_v,
                         stride_qb, stride_qh, stride_qd, stride_ks, stride_kh, stride_kss, stride_ksh,
                         stride_kbs, stride_kbh, stride_vs, stride_vh, stride_vss, stride_vsh,
                         stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_table,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_V: tl.constexpr, HAS_B: tl.constexpr, V_IS_K: tl.constexpr, STORE_LSE: tl.constexpr,
                         PRECISION: tl.constexpr, INT4: tl.constexpr):
    """Program (head block, split, sequence), as _decode_kernel: the key's compressed columns [0, dim_a) are
    scaled by their group's scale as each block is loaded; its tail [dim_a, dim_a + dim_b) (MLA's rope key)
    is read from its own tensor as it is; with V_IS_K the value is the dequantised key columns. INT4: column d
    is nibble d % 2 (low first) of byte d // 2, code * scale + zero with the zero beside the scale (same strides)."""
    pid_h, split, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    blocks_per_kv = tl.cdiv(group, BLOCK_H)
    kv = pid_h // blocks_per_kv
    in_group = (pid_h % blocks_per_kv) * BLOCK_H + tl.arange(0, BLOCK_H)               # [BH]
    head_ok = in_group < group
    heads = kv * group + in_group
    da = tl.arange(0, BLOCK_A)
    dv = tl.arange(0, BLOCK_V)
    o_ptrs = (out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
              + dv[None, :] * stride_od)                                                # [BH, BV]
    l_ptrs = lse_ptr + seq * stride_lb + heads * stride_lh + split                      # [BH]

    context = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(context, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context)
    if start >= end:
        if STORE_LSE:
            tl.store(o_ptrs, tl.zeros([BLOCK_H, BLOCK_V], tl.float32), mask=head_ok[:, None] & (dv < dim_v)[None, :])
            tl.store(l_ptrs, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=head_ok)
        return

    q_row = q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh         # [BH, 1]
    q_a = tl.load(q_row + da[None, :] * stride_qd, mask=head_ok[:, None] & (da < dim_a)[None, :], other=0.0)
    db = tl.arange(0, BLOCK_B)
    if HAS_B:
        q_b = tl.load(q_row + (dim_a + db[None, :]) * stride_qd, mask=head_ok[:, None] & (db < dim_b)[None, :],
                      other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)                                               # [BN]
        pos_ok = pos < end
        page = tl.load(table_row + pos // page_size, mask=pos_ok, other=0)
        slots = page.to(tl.int64) * page_size + pos % page_size                         # [BN]
        a_ok = pos_ok[:, None] & (da < dim_a)[None, :]
        ks_off = slots[:, None] * stride_kss + kv * stride_ksh + (da // group_k)[None, :]     # [BN, BA]
        k_s = tl.load(ks_ptr + ks_off, mask=a_ok, other=0.0).to(tl.float32)
        if INT4:
            k_q = tl.load(k_ptr + slots[:, None] * stride_ks + kv * stride_kh + (da // 2)[None, :], mask=a_ok, other=0)
            k_q = (k_q.to(tl.int32) >> ((da % 2) * 4)[None, :]) & 15
            k_z = tl.load(kz_ptr + ks_off, mask=a_ok, other=0.0).to(tl.float32)
            k_a = (k_q.to(tl.float32) * k_s + k_z).to(q_a.dtype)
        else:
            k_q = tl.load(k_ptr + slots[:, None] * stride_ks + kv * stride_kh + da[None, :], mask=a_ok, other=0.0)
            k_a = (k_q.to(tl.float32) * k_s).to(q_a.dtype)
        scores = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)                  # [BH, BN]
        if HAS_B:
            k_b = tl.load(kb_ptr + slots[:, None] * stride_kbs + kv * stride_kbh + db[None, :],
                          mask=pos_ok[:, None] & (db < dim_b)[None, :], other=0.0)
            scores = tl.dot(q_b, tl.trans(k_b.to(q_b.dtype)), scores, input_precision=PRECISION)
        scores = tl.where(pos_ok[None, :], scores * qk_scale, float("-inf"))            # log2 domain
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])                                            # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_IS_K:
            v = k_a
        else:
            v_ok = pos_ok[:, None] & (dv < dim_v)[None, :]
            vs_off = slots[:, None] * stride_vss + kv * stride_vsh + (dv // group_v)[None, :]
            v_s = tl.load(vs_ptr + vs_off, mask=v_ok, other=0.0).to(tl.float32)
            if INT4:
                v_q = tl.load(v_ptr + slots[:, None] * stride_vs + kv * stride_vh + (dv // 2)[None, :], mask=v_ok,
                              other=0)
                v_q = (v_q.to(tl.int32) >> ((dv % 2) * 4)[None, :]) & 15
                v_z = tl.load(vz_ptr + vs_off, mask=v_ok, other=0.0).to(tl.float32)
                v = (v_q.to(tl.float32) * v_s + v_z).to(q_a.dtype)                    # [BN, BV]
            else:
                v_q = tl.load(v_ptr + slots[:, None] * stride_vs + kv * stride_vh + dv[None, :], mask=v_ok,
                              other=0.0)
                v = (v_q.to(tl.float32) * v_s).to(q_a.dtype)                            # [BN, BV]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # [BH, BV]
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (dv < dim_v)[None, :])
    if STORE_LSE:
        tl.store(l_ptrs, m_i + tl.log2(l_i), mask=head_ok)


def paged_decode_quant_triton(q: torch.Tensor, k_cache: QuantizedCache, v_cache: QuantizedCache,
                              block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int,
                              scale: float, max_context: int, num_splits: int | None = None) -> torch.Tensor:
    """q [B, H, Dk] (one token per sequence) against compressed keys k_cache [S, Hkv, Dk] (data, maybe a tail)
    and values v_cache [S, Hkv, Dv] (MLA: k_cache.values(), the same data) -> [B, H, Dv]."""
    B, H, Dk = q.shape
    Hkv = k_cache.data.shape[1]
    group = H // Hkv
    v_is_k = v_cache.data.data_ptr() == k_cache.data.data_ptr()
    dim_a = k_cache.width
    dim_b = Dk - dim_a
    Dv = v_cache.width
    int4 = k_cache.zero is not None
    if (H % Hkv or Dk != k_cache.shape[2] or v_cache.data.shape[1] != Hkv or (v_is_k and Dv != dim_a)
            or int4 != (v_cache.zero is not None)):
        raise ValueError(f"paged_decode_quant_triton: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)} want [B, H, Dk], [S, Hkv, Dk], [S, Hkv, Dv] with Hkv dividing H, "
                         "both int4 or neither")
    if int4 and (k_cache.zero.stride() != k_cache.scale.stride() or v_cache.zero.stride() != v_cache.scale.stride()):
        raise ValueError("paged_decode_quant_triton: an int4 cache's zero points must be laid out as its scales")
    tuning = decode_tuning(q.device, Dk, group, q.dtype)
    block_h = max(16, min(tuning.block_h, triton.next_power_of_2(group)))
    block_a = max(16, triton.next_power_of_2(dim_a))
    head_blocks = Hkv * triton.cdiv(group, block_h)
    splits = num_splits or decode_splits(B * head_blocks, max_context, q.device, tuning)

    out = q.new_empty(B, H, Dv)
    if splits == 1:
        part, lse = out[:, :, None, :], out.new_empty(0, dtype=torch.float32)
        part_strides, lse_strides = (out.stride(0), out.stride(1), 0, out.stride(2)), (0, 0)
    else:
        part = torch.empty(B, H, splits, Dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        part_strides, lse_strides = part.stride(), lse.stride()[:2]
    tail = k_cache.tail if k_cache.tail is not None else k_cache.scale     # a dummy pointer when there is none
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    k_data, v_data = k_cache.data, v_cache.data
    _decode_quant_kernel[(head_blocks, splits, B)](
        q, k_data, k_cache.scale, k_cache.zero if int4 else k_cache.scale, tail, v_data, v_cache.scale,
        v_cache.zero if int4 else v_cache.scale, part, lse, block_tables, context_lens,
        scale * 1.4426950408889634, group, page_size, dim_a, dim_b, Dv, k_cache.group, v_cache.group,
        *q.stride(), k_data.stride(0), k_data.stride(1), k_cache.scale.stride(0), k_cache.scale.stride(1),
        tail.stride(0), tail.stride(1), v_data.stride(0), v_data.stride(1), v_cache.scale.stride(0),
        v_cache.scale.stride(1), *part_strides, *lse_strides, block_tables.stride(0),
        BLOCK_H=block_h, BLOCK_N=tuning.block_n, BLOCK_A=block_a,
        BLOCK_B=max(16, triton.next_power_of_2(max(dim_b, 1))),
        BLOCK_V=block_a if v_is_k else max(16, triton.next_power_of_2(Dv)),
        HAS_B=dim_b > 0, V_IS_K=v_is_k, STORE_LSE=splits > 1, PRECISION=precision, INT4=int4,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages)
    if splits > 1:
        _combine_kernel[(B * H,)](part, lse, out, lse, H, splits, Dv, *part.stride(), *lse.stride()[:2],
                                  *out.stride(), BLOCK_S=triton.next_power_of_2(splits),
                                  BLOCK_V=triton.next_power_of_2(Dv), HAS_SINKS=False, num_warps=4)
    return out
