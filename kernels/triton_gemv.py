"""Decode-sized products in Triton: a few rows times a weight (matrix-vector), and greedy top-k routing.

At batch 1 a projection reads its weight once for one row; what it costs is how fast the weight
streams. The GEMV gives each program a band of output columns and reads block_k of each of its rows a
step, so the GPU has enough bytes in flight; whether it beats the vendor library for a given shape is
measured (moe-engine bench tune) and recorded in kernels/tuning_data/. The routing kernel does a token's
softmax or sigmoid, correction bias, group limit, top-k, normalisation and scaling in one program.
"""

import torch
import triton
import triton.language as tl

from kernels.tuning import GemmTile


@triton.jit
def band_dot(a_ptr, w_ptrs, length, col_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BN, BK] partial products of BLOCK_N weight rows (w_ptrs [BN, 1] at each row's first element,
    rows contiguous) with the vector a [length]; sum over axis 1 for the dot products."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        k = k0 + ks
        k_ok = k < length
        a = tl.load(a_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]          # [1, BK]
        acc += tl.load(w_ptrs + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * a
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_xt, stride_wn, stride_ot,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t, band] = x[t] . w[band] (+ bias[band]), accumulated in float32."""
    t = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)   # bands on axis 0: more than 65,535 allowed
    col_ok = cols < N
    acc = band_dot(x_ptr + t * stride_xt, w_ptr + cols.to(tl.int64)[:, None] * stride_wn, K, col_ok,
                   BLOCK_N, BLOCK_K)
    out = tl.sum(acc, axis=1)                                                          # [BN]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def gemv_triton(x: torch.Tensor, w: torch.Tensor, tile: GemmTile, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, K] @ w [N, K].T (+ bias [N]) -> [T, N] in out_dtype (default x's); w's rows contiguous."""
    T, K = x.shape
    N = w.shape[0]
    if w.stride(1) != 1:
        w = w.contiguous()
    x = x.contiguous()
    out = torch.empty(T, N, dtype=out_dtype or x.dtype, device=x.device)
    if T == 0:
        return out
    _gemv_kernel[(triton.cdiv(N, tile.block_n), T)](
        x, w, w if bias is None else bias, out, N, K, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts, top_k, scaling, n_group, topk_group,
                  stride_lt, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  GROUP_RULE: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr):
    """One token: scores = softmax or sigmoid of its logits; choice = scores (+ bias). GROUP_RULE 1 or 2
    keeps only the topk_group best of n_group equal groups of experts, ranked by their best choice (1,
    DeepSeek-V2's group_limited_greedy) or the sum of their best two (2, DeepSeek-V3's noaux_tc). Then
    the k best of choice, best first; their unbiased scores, normalised to sum 1 if asked, times scaling."""
    t = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_PAD)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + t * stride_lt + experts, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        p = tl.exp(logits - tl.max(logits, axis=0))
        scores = p / tl.sum(p, axis=0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))                                    # [E_PAD]
    if GROUP_RULE > 0:
        per_group = num_experts // n_group
        group_of = experts // per_group                                                # [E_PAD]
        groups = tl.arange(0, G_PAD)
        group_score = tl.full([G_PAD], float("-inf"), tl.float32)
        for g in range(0, n_group):
            in_group = tl.where(group_of == g, choice, float("-inf"))
            g_score = tl.max(in_group, axis=0)
            if GROUP_RULE == 2:       # plus the second best (the best again on a tie), in groups of two or more
                first = tl.argmax(in_group, axis=0)
                second = tl.max(tl.where(experts == first, float("-inf"), in_group), axis=0)
                g_score = tl.where(per_group > 1, g_score + second, g_score)
            group_score = tl.where(groups == g, g_score, group_score)
        kept = experts < 0                                                             # all False
        for _ in range(0, topk_group):
            g_best = tl.argmax(group_score, axis=0)
            kept = kept | (group_of == g_best)
            group_score = tl.where(groups == g_best, float("-inf"), group_score)
        choice = tl.where(kept, choice, float("-inf"))
    slots = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], dtype=tl.int64)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    for j in range(0, top_k):
        best = tl.argmax(choice, axis=0)
        chosen = experts == best
        ids = tl.where(slots == j, best.to(tl.int64), ids)
        weights = tl.where(slots == j, tl.sum(tl.where(chosen, scores, 0.0), axis=0), weights)
        choice = tl.where(chosen, float("-inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    keep = slots < top_k
    tl.store(weights_ptr + t * top_k + slots, weights * scaling, mask=keep)
    tl.store(ids_ptr + t * top_k + slots, ids, mask=keep)


# How each routing method ranks groups of experts in _route_kernel (0: no groups).
GROUP_RULES = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def route_triton(logits: torch.Tensor, top_k: int, sigmoid: bool, bias: torch.Tensor | None,
                 normalize: bool, scaling: float, method: str = "greedy", n_group: int = 1,
                 topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, ids [T, k] int64), best first; method one of
    GROUP_RULES, n_group dividing E."""
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        logits = logits.contiguous()
        _route_kernel[(T,)](logits, logits if bias is None else bias, weights, ids, E, top_k, scaling, n_group,
                            topk_group, logits.stride(0), SIGMOID=sigmoid, HAS_BIAS=bias is not None,
                            NORMALIZE=normalize, GROUP_RULE=GROUP_RULES[method], E_PAD=triton.next_power_of_2(E),
                            K_PAD=triton.next_power_of_2(top_k), G_PAD=triton.next_power_of_2(n_group), num_warps=1)
    return weights, ids
