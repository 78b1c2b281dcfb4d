"""Paged decode attention in Triton: one query token per sequence against its paged K/V, split along the
context (flash-decoding); covers grouped-query attention and MLA's latent cache (one KV head, V inside K),
and gpt-oss's attention sinks and sliding windows."""

import torch
import triton
import triton.language as tl

from kernels.attention import value_inside_key
from kernels.tuning import DecodeTuning, decode_splits, decode_tuning


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, block_tables_ptr, context_lens_ptr, sinks_ptr,
                   qk_scale, group, page_size, dim_a, dim_b, dim_v, window,
                   stride_qb, stride_qh, stride_qd, stride_ks, stride_kh, stride_kd,
                   stride_vs, stride_vh, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                   stride_lb, stride_lh, stride_table,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_V: tl.constexpr, HAS_B: tl.constexpr, V_IS_K: tl.constexpr, STORE_LSE: tl.constexpr,
                   PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Program (head block, split, sequence): BLOCK_H query heads of one KV head over one context split.

    The key is read as columns [0, dim_a) and [dim_a, dim_a + dim_b), so MLA's 512 + 64 needs no padding
    to 1024; with V_IS_K the value is the first part of the key (MLA's latent) and is not read twice.
    Only the newest `window` positions are read; HAS_SINKS adds each head's sink logit to the softmax here
    when there is one split (else the combine adds it)."""
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

    # Each sequence's own context is cut into the launch's splits (whole BLOCK_N steps each), so the
    # launch can be sized once for the longest possible context and still spread a short one evenly.
    context = tl.load(context_lens_ptr + seq)
    first = tl.maximum(context - window, 0)
    split_len = tl.cdiv(tl.cdiv(context - first, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, context)
    if start >= end:   # a split past this sequence's context: contributes nothing to the combine
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
        k_row = k_ptr + slots[:, None] * stride_ks + kv * stride_kh                     # [BN, 1]
        k_a = tl.load(k_row + da[None, :] * stride_kd, mask=pos_ok[:, None] & (da < dim_a)[None, :], other=0.0)
        k_a = k_a.to(q_a.dtype)
        scores = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)                  # [BH, BN]
        if HAS_B:
            k_b = tl.load(k_row + (dim_a + db[None, :]) * stride_kd, mask=pos_ok[:, None] & (db < dim_b)[None, :],
                          other=0.0)
            scores = tl.dot(q_b, tl.trans(k_b.to(q_b.dtype)), scores, input_precision=PRECISION)
        scores = tl.where(pos_ok[None, :], scores * qk_scale, float("-inf"))            # log2 domain
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])                                            # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_IS_K:
            v = k_a
        else:
            v = tl.load(v_ptr + slots[:, None] * stride_vs + kv * stride_vh + dv[None, :] * stride_vd,
                        mask=pos_ok[:, None] & (dv < dim_v)[None, :], other=0.0).to(q_a.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # [BH, BV]
        m_i = m_new
    if HAS_SINKS and not STORE_LSE:   # the sink joins the denominator (log2 domain, like the scores)
        sink = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_i, sink)
        shrink = tl.exp2(m_i - m_all)
        out = acc * shrink[:, None] / (l_i * shrink + tl.exp2(sink - m_all))[:, None]
    else:
        out = acc / l_i[:, None]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (dv < dim_v)[None, :])
    if STORE_LSE:
        tl.store(l_ptrs, m_i + tl.log2(l_i), mask=head_ok)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, sinks_ptr, num_heads, num_splits, dim_v,
                    stride_pb, stride_ph, stride_ps, stride_pd, stride_lb, stride_lh,
                    stride_ob, stride_oh, stride_od, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
                    HAS_SINKS: tl.constexpr):
    """out[b, h] = sum_s softmax_s(lse[b, h, s]) * part[b, h, s]: merge the context splits of one head
    (HAS_SINKS: the head's sink joins the softmax as one more split whose part is zero)."""
    pid = tl.program_id(0)
    seq, head = pid // num_heads, pid % num_heads
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_V)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + s, mask=s_ok, other=float("-inf"))  # [BS]
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(tl.max(lse, axis=0), sink)
        w = tl.exp2(lse - m)
        w = w / (tl.sum(w, axis=0) + tl.exp2(sink - m))
    else:
        w = tl.exp2(lse - tl.max(lse, axis=0))
        w = w / tl.sum(w, axis=0)
    parts = tl.load(part_ptr + seq.to(tl.int64) * stride_pb + head * stride_ph + s[:, None] * stride_ps
                    + dv[None, :] * stride_pd, mask=s_ok[:, None] & (dv < dim_v)[None, :], other=0.0)  # [BS, BV]
    out = tl.sum(parts * w[:, None], axis=0)                                            # [BV]
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + dv * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dv < dim_v)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int,
                        scale: float, max_context: int, tuning: DecodeTuning | None = None,
                        num_splits: int | None = None, sinks: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """q [B, H, Dk] (one token per sequence), k_cache [S, Hkv, Dk], v_cache [S, Hkv, Dv],
    block_tables [B, max_blocks] int32, context_lens [B] int32 (>= 1) -> [B, H, Dv]; sinks [H] and
    window as kernels.attention.paged_attention_ref's."""
    B, H, Dk = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[2]
    group = H // Hkv
    v_is_k = value_inside_key(k_cache, v_cache)
    dim_a = Dv if v_is_k else Dk
    dim_b = Dk - dim_a
    tuning = tuning or decode_tuning(q.device, Dk, group, k_cache.dtype)
    block_h = max(16, min(tuning.block_h, triton.next_power_of_2(group)))
    block_a = max(16, triton.next_power_of_2(dim_a))
    head_blocks = Hkv * triton.cdiv(group, block_h)
    splits = num_splits or decode_splits(B * head_blocks, min(max_context, window or max_context), q.device, tuning)

    out = q.new_empty(B, H, Dv)
    if splits == 1:   # write the answer directly; no log-sum-exp needed
        part, lse = out[:, :, None, :], out.new_empty(0, dtype=torch.float32)
        part_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        lse_strides = (0, 0)
    else:
        part = torch.empty(B, H, splits, Dv, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        part_strides, lse_strides = part.stride(), lse.stride()[:2]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_kernel[(head_blocks, splits, B)](
        q, k_cache, v_cache, part, lse, block_tables, context_lens, q if sinks is None else sinks,
        scale * 1.4426950408889634, group, page_size, dim_a, dim_b, Dv, window or 1 << 30,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *part_strides, *lse_strides, block_tables.stride(0),
        BLOCK_H=block_h, BLOCK_N=tuning.block_n, BLOCK_A=block_a,
        BLOCK_B=max(16, triton.next_power_of_2(max(dim_b, 1))),
        BLOCK_V=block_a if v_is_k else max(16, triton.next_power_of_2(Dv)),
        HAS_B=dim_b > 0, V_IS_K=v_is_k, STORE_LSE=splits > 1, PRECISION=precision, HAS_SINKS=sinks is not None,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages)
    if splits > 1:
        _combine_kernel[(B * H,)](part, lse, out, lse if sinks is None else sinks, H, splits, Dv, *part.stride(),
                                  *lse.stride()[:2], *out.stride(), BLOCK_S=triton.next_power_of_2(splits),
                                  BLOCK_V=triton.next_power_of_2(Dv), HAS_SINKS=sinks is not None, num_warps=4)
    return out
