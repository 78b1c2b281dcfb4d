"""Paged attention (any block table) equals plain causal attention over contiguous K/V."""

import math

import pytest
import torch

from kernels.attention import AttentionMetadata, paged_attention, write_cache


def dense_attention(q, k, v, scale):
    """q [n, H, D] as the last n positions of k/v [ctx, Hkv, D*]: textbook masked softmax."""
    n, H, _ = q.shape
    ctx, Hkv, _ = k.shape
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("block_size,H,Hkv", [(4, 4, 2), (16, 6, 1), (3, 2, 2)])
def test_paged_equals_contiguous(block_size, H, Hkv):
    g = torch.Generator().manual_seed(block_size)
    D, Dv, num_blocks = 8, 6, 64
    context_lens, query_lens = [1, 7, 20, 13], [1, 7, 1, 5]     # decode, full prefill, decode, chunk
    k_cache = torch.zeros(num_blocks * block_size, Hkv, D)
    v_cache = torch.zeros(num_blocks * block_size, Hkv, Dv)
    perm = torch.randperm(num_blocks, generator=g).tolist()     # scattered, non-monotonic blocks
    tables, contexts = [], []
    for ctx in context_lens:
        n_blocks = -(-ctx // block_size)
        tables.append([perm.pop() for _ in range(n_blocks)])
        contexts.append((torch.randn(ctx, Hkv, D, generator=g), torch.randn(ctx, Hkv, Dv, generator=g)))
    # Earlier tokens are already cached; the new ones are written through the slot mapping.
    meta = AttentionMetadata.build(tables, context_lens, query_lens, block_size, torch.device("cpu"))
    for b, (k, v) in enumerate(contexts):
        old = meta.context_slots[b][: context_lens[b] - query_lens[b]]
        k_cache[old], v_cache[old] = k[: len(old)], v[: len(old)]
    write_cache(k_cache, torch.cat([k[-n:] for (k, _), n in zip(contexts, query_lens)]), meta.slot_mapping)
    write_cache(v_cache, torch.cat([v[-n:] for (_, v), n in zip(contexts, query_lens)]), meta.slot_mapping)
    q = torch.randn(sum(query_lens), H, D, generator=g)
    out = paged_attention(q, k_cache, v_cache, meta, scale=0.3)
    for b, (k, v) in enumerate(contexts):
        lo, hi = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        torch.testing.assert_close(out[lo:hi], dense_attention(q[lo:hi], k, v, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reductions", [False, True])
@pytest.mark.parametrize("Hkv,shared", [(2, False), (1, False), (1, True)])
def test_decode_batch_equals_contiguous(Hkv, shared, reductions, monkeypatch):
    """A pure decode batch (one masked attention over padded contexts): grouped heads, one shared key head,
    and MLA's layout where the values are the first channels of the cached keys; also as the gathers and
    sums a compiled CPU step runs (taken when torch.compile traces, here run eagerly)."""
    if reductions:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(Hkv + shared)
    H, D, Dv, block_size, num_blocks = 4, 8, 6, 4, 32
    context_lens = [9, 3, 14]
    k_cache = torch.randn(num_blocks * block_size, Hkv, D, generator=g)
    v_cache = k_cache[..., :Dv] if shared else torch.randn(num_blocks * block_size, Hkv, Dv, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-ctx // block_size))] for ctx in context_lens]
    meta = AttentionMetadata.build(tables, context_lens, [1] * len(context_lens), block_size, torch.device("cpu"))
    assert meta.is_decode
    q = torch.randn(len(context_lens), H, D, generator=g)
    out = paged_attention(q, k_cache, v_cache, meta, scale=0.3)
    for b, slots in enumerate(meta.context_slots):
        torch.testing.assert_close(out[b:b + 1], dense_attention(q[b:b + 1], k_cache[slots], v_cache[slots], 0.3),
                                   atol=1e-5, rtol=1e-5)
