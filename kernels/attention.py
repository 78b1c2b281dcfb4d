"""Attention over a paged cache: the metadata that describes a batch, cache writes, and the torch reference."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.backend import form
from kernels.kv_quant import QuantizedCache


@dataclass
class AttentionMetadata:
    """Where each sequence of a flat batch sits in the token axis and in the paged cache.

    Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1]; those are its newest tokens,
    so its context (cached + new) has context_lens[b] tokens, stored at context_slots[b].
    context_lens_tensor holds the same lengths on the device for kernels that read them there.
    max_context bounds every context: kernels that split the context size their launch by it, so a bound
    fixed for the engine's life gives every step the same launch (and a CUDA graph can replay it).

    A static decode metadata (static_decode, for CUDA graphs) knows the lengths only on the device:
    context_lens and context_slots are None there, and everything is derived from the tensors.
    """
    slot_mapping: torch.Tensor          # [T] cache slot each new token is written to
    block_tables: torch.Tensor          # [B, max_blocks] physical block ids (int32)
    context_lens: list[int] | None      # B host ints: tokens in context after this step
    query_start_loc: list[int] | None   # B+1 host ints: prefix sums of query lengths (None: one token each)
    block_size: int
    context_lens_tensor: torch.Tensor | None = None   # [B] int32 on the device; built on demand when None
    max_context: int = 0                # >= every context length (0: the longest of context_lens)
    _all_slots: torch.Tensor | None = field(default=None, repr=False)
    _context_slots: list[torch.Tensor] | None = field(default=None, repr=False)
    _padded: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
              block_size: int, device: torch.device, max_context: int = 0) -> "AttentionMetadata":
        """From host lists. Built every step, so it makes only three small tensors (a decode step on the
        CPU pays microseconds per torch call); the per-sequence context slots follow on first use."""
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        new = [t[p // block_size] * block_size + p % block_size
               for t, ctx, n in zip(block_tables, context_lens, query_lens) for p in range(ctx - n, ctx)]
        return cls(slot_mapping=torch.tensor(new).to(device), block_tables=table.to(device),
                   context_lens=list(context_lens), query_start_loc=starts, block_size=block_size,
                   context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32).to(device),
                   max_context=max(max_context, *context_lens))

    @classmethod
    def static_decode(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                      block_size: int, max_context: int) -> "AttentionMetadata":
        """One new token per sequence, described by device tensors only (slot_mapping [B] int64,
        block_tables [B, >= max_context / block_size] int32, context_lens [B] int32): nothing here
        reads them on the host, so a step built on them can be captured in a CUDA graph."""
        return cls(slot_mapping=slot_mapping, block_tables=block_tables, context_lens=None,
                   query_start_loc=None, block_size=block_size,
                   context_lens_tensor=context_lens, max_context=max_context)

    def _slots(self) -> torch.Tensor:
        """[B, max_blocks * block_size]: the slots of every sequence's blocks, in logical order."""
        if self._all_slots is None:
            offsets = torch.arange(self.block_size, device=self.block_tables.device)
            table = self.block_tables.long()
            self._all_slots = (table[:, :, None] * self.block_size + offsets).view(table.shape[0], -1)
        return self._all_slots

    @property
    def context_slots(self) -> list[torch.Tensor] | None:
        """B tensors [context_lens[b]]: the slots of each sequence's whole context (None when static)."""
        if self.context_lens is not None and self._context_slots is None:
            self._context_slots = [self._slots()[b, :ctx] for b, ctx in enumerate(self.context_lens)]
        return self._context_slots

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0] if self.query_start_loc is None else len(self.query_start_loc) - 1

    def query_len(self, b: int) -> int:
        return 1 if self.query_start_loc is None else self.query_start_loc[b + 1] - self.query_start_loc[b]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token."""
        return self.query_start_loc is None or self.query_start_loc == list(range(self.num_seqs + 1))

    def device_context_lens(self, device: torch.device) -> torch.Tensor:
        """[B] int32 context lengths on device."""
        if self.context_lens_tensor is None or self.context_lens_tensor.device != device:
            self.context_lens_tensor = torch.tensor(self.context_lens, dtype=torch.int32).to(device)
        return self.context_lens_tensor


    def padded_context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slots [B, L] padded with other valid slots, valid [B, L] bool or None when nothing is padded),
        L the longest context: every layer of a step gathers its whole batch's context with one index."""
        if self._padded is None and self.context_lens is None:   # static: from the tensors, L = max_context
            pos = torch.arange(self.max_context, device=self.block_tables.device)             # [L]
            slots = self.block_tables[:, pos // self.block_size].long() * self.block_size + pos % self.block_size
            self._padded = (slots, pos[None, :] < self.context_lens_tensor[:, None])
        elif self._padded is None:
            self._padded = (self._slots()[:, :max(self.context_lens)],
                            _valid_mask(self.context_lens, self.block_tables.device))
        return self._padded


def _valid_mask(context_lens: list[int], device) -> torch.Tensor | None:
    """[B, L] bool, True where position < context_lens[b] (L the longest); None when all are equal."""
    longest = max(context_lens)
    if min(context_lens) == longest:
        return None
    lens = torch.tensor(context_lens, device=device)
    return torch.arange(longest, device=device)[None, :] < lens[:, None]


def write_cache(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache [S, ...] gets values [T, ...] at rows slot_mapping [T] (a QuantizedCache quantizes them)."""
    if isinstance(cache, QuantizedCache):
        cache.write(values, slot_mapping)
        return
    cache.index_copy_(0, slot_mapping, values if values.dtype == cache.dtype else values.to(cache.dtype))


def causal_mask(n: int, ctx: int, device) -> torch.Tensor | None:
    """[n, ctx] bool: query i (position ctx-n+i) sees keys 0..ctx-n+i; None when it sees everything."""
    if n == 1:
        return None
    q_pos = torch.arange(ctx - n, ctx, device=device)[:, None]
    return torch.arange(ctx, device=device)[None, :] <= q_pos


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     enable_gqa: bool = False) -> torch.Tensor:
    """q [H, n, Dk] as the newest n positions of k [Hkv, ctx, Dk] / v [Hkv, ctx, Dv] -> [H, n, Dv].
    Passed 4-D, and as is_causal when there is no cached context, so the fused attention kernels apply."""
    n, ctx = q.shape[-2], k.shape[-2]
    masking = {"is_causal": True} if n == ctx and n > 1 else {"attn_mask": causal_mask(n, ctx, q.device)}
    return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale, enable_gqa=enable_gqa,
                                          **masking)[0]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, sinks: torch.Tensor | None = None,
                        window: int | None = None) -> torch.Tensor:
    """q [T, H, Dk], k_cache [S, Hkv, Dk], v_cache [S, Hkv, Dv] -> [T, H, Dv], causal per sequence.
    sinks [H]: one learned logit per head that joins the softmax and takes probability mass but adds no
    value (gpt-oss). window: each query sees only the newest `window` positions up to and including its
    own (keys j with q - window < j <= q, as transformers' sliding window)."""
    T, H, _ = q.shape
    if meta.is_decode:
        if sinks is None and window is None and form("auto", q, k_cache, v_cache) == "compiled":
            slots, valid = meta.padded_context()               # [B, L], [B, L] or None
            return _decode_attention_reductions(q, k_cache, v_cache, slots, valid, scale)
        return _decode_attention_ref(q, k_cache, v_cache, meta, scale, sinks, window)
    out = q.new_empty(T, H, v_cache.shape[-1])
    for b in range(meta.num_seqs):
        lo, hi = meta.query_start_loc[b], meta.query_start_loc[b + 1]
        if hi == lo:
            continue
        slots = meta.context_slots[b]
        k = k_cache[slots].transpose(0, 1)               # [Hkv, ctx, Dk]
        v = v_cache[slots].transpose(0, 1)               # [Hkv, ctx, Dv]
        if sinks is None and window is None:
            o = causal_attention(q[lo:hi].transpose(0, 1), k.to(q.dtype), v.to(q.dtype), scale,
                                 enable_gqa=k.shape[0] != H)   # [H, n, Dv]
        else:
            o = sink_window_attention(q[lo:hi].transpose(0, 1), k.to(q.dtype), v.to(q.dtype), scale,
                                      sinks, window)
        out[lo:hi] = o.transpose(0, 1)                   # [n, H, Dv]
    return out


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last axis of scores with one extra logit per row (sinks, broadcast to scores[..., :1]),
    whose probability is dropped: the weights then sum to less than one."""
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sink], -1).softmax(-1)[..., :-1]


def sink_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          sinks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """causal_attention with sinks [H] and a sliding window (see paged_attention_ref), written out:
    q [H, n, Dk] as the newest n positions of k [Hkv, ctx, Dk] / v [Hkv, ctx, Dv] -> [H, n, Dv]."""
    H, n, _ = q.shape
    Hkv, ctx = k.shape[0], k.shape[1]
    q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]           # [n, 1]
    k_pos = torch.arange(ctx, device=q.device)[None, :]                    # [1, ctx]
    seen = k_pos <= q_pos if window is None else (k_pos <= q_pos) & (k_pos > q_pos - window)   # [n, ctx]
    qg = q.view(Hkv, H // Hkv, n, -1)                                      # [Hkv, G, n, Dk]
    scores = torch.matmul(qg, k[:, None].transpose(-1, -2)) * scale        # [Hkv, G, n, ctx]
    scores = scores.masked_fill(~seen, float("-inf"))
    weights = softmax_with_sinks(scores, None if sinks is None else sinks.view(Hkv, -1, 1, 1))
    return torch.matmul(weights, v[:, None]).reshape(H, n, -1)             # [H, n, Dv]


def value_inside_key(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """True when v_cache is the leading columns of k_cache itself (MLA: the latent is both key and value).
    Asked eagerly only: torch.compile cannot compare data pointers, and a compiled step's attention is
    _decode_attention_reductions, which reads the values on their own, to the same result."""
    return (v_cache.data_ptr() == k_cache.data_ptr()
            and v_cache.shape[:2] == k_cache.shape[:2] and v_cache.stride() == k_cache.stride()
            and v_cache.shape[2] <= k_cache.shape[2])


def _decode_attention_ref(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, sinks=None,
                          window: int | None = None) -> torch.Tensor:
    """One new token per sequence: the whole batch in one masked attention over padded contexts."""
    slots, valid = meta.padded_context()                       # [B, L], [B, L] or None
    if sinks is not None or window is not None:
        return _decode_sink_window(q, k_cache, v_cache, meta, slots, valid, scale, sinks, window)
    B, L = slots.shape
    flat = slots.reshape(-1)                                   # index_select: 2-3x cheaper than k_cache[slots]
    k = k_cache.index_select(0, flat).view(B, L, *k_cache.shape[1:]).transpose(1, 2)   # [B, Hkv, L, Dk]
    if value_inside_key(k_cache, v_cache):
        v = k[..., :v_cache.shape[-1]]                         # MLA: the values are the keys' first channels
    else:
        v = v_cache.index_select(0, flat).view(B, L, *v_cache.shape[1:]).transpose(1, 2)   # [B, Hkv, L, Dv]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if k.shape[1] == 1 and q.dtype == torch.float32:
        # One key head shared by all (MLA's latent): two batched matmuls, ~3x faster than SDPA's GQA path on
        # the CPU (3-D bmm: a 4-D matmul would copy the transposed keys first).
        scores = torch.bmm(q * scale, k[:, 0].transpose(1, 2))            # [B, H, L]
        if valid is not None:
            scores.masked_fill_(valid[:, None, :].logical_not(), float("-inf"))
        return torch.bmm(scores.softmax(-1), v[:, 0])                    # [B, H, Dv]
    mask = None if valid is None else valid[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])   # [B, H, 1, Dv]
    return out[:, :, 0, :]


def _decode_sink_window(q, k_cache, v_cache, meta: AttentionMetadata, slots, valid, scale: float, sinks,
                        window: int | None) -> torch.Tensor:
    """The decode reference with sinks [H] and/or a sliding window, written out: q [B, H, Dk], slots [B, L],
    valid [B, L] or None -> [B, H, Dv]."""
    B, H, Dk = q.shape
    Hkv = k_cache.shape[1]
    if window is not None:   # positions ctx - window .. ctx - 1 (the newest token is at ctx - 1)
        pos = torch.arange(slots.shape[1], device=q.device)[None, :]                         # [1, L]
        lens = meta.device_context_lens(q.device).long()[:, None]                          # [B, 1]
        valid = (pos < lens) & (pos >= lens - window)
    k = k_cache[slots].to(q.dtype).permute(0, 2, 3, 1)                       # [B, Hkv, Dk, L]
    scores = torch.matmul(q.view(B, Hkv, H // Hkv, Dk), k) * scale           # [B, Hkv, G, L]
    if valid is not None:
        scores = scores.masked_fill(valid.logical_not()[:, None, None, :], float("-inf"))
    weights = softmax_with_sinks(scores, None if sinks is None else sinks.view(1, Hkv, -1, 1))
    v = v_cache[slots].to(q.dtype).transpose(1, 2)                           # [B, Hkv, L, Dv]
    return torch.matmul(weights, v).reshape(B, H, -1)                        # [B, H, Dv]


def _decode_attention_reductions(q, k_cache, v_cache, slots, valid, scale: float) -> torch.Tensor:
    """_decode_attention_ref's result written as gathers, multiplies and sums, for torch.compile on the CPU:
    the compiler reads each sequence's cached keys and values in place inside its reductions, where the
    attention kernels need them copied out first (a compiled tiny-mixtral step at 8 sequences: 3.67 ->
    3.49 ms, medians). q [B, H, Dk], slots [B, L], valid [B, L] or None -> [B, H, Dv]."""
    B, H, Dk = q.shape
    Hkv = k_cache.shape[1]
    k = k_cache[slots].to(q.dtype)                                           # [B, L, Hkv, Dk]
    scores = ((q * scale).view(B, 1, Hkv, H // Hkv, Dk) * k[:, :, :, None, :]).sum(-1)   # [B, L, Hkv, G]
    if valid is not None:
        scores = scores.masked_fill(valid.logical_not()[:, :, None, None], float("-inf"))
    v = v_cache[slots].to(q.dtype)                                           # [B, L, Hkv, Dv]
    out = (scores.softmax(1)[..., None] * v[:, :, :, None, :]).sum(1)        # [B, Hkv, G, Dv]
    return out.reshape(B, H, v.shape[-1])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, backend: str = "auto",
                    sinks: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens over their sequences' paged context (see paged_attention_ref;
    sinks [H] and window as there).

    A decode batch (one token per sequence) runs the Triton kernel on CUDA tensors (backend 'auto') or
    when forced ('triton'), sinks and window included; prefill runs the reference either way. A compressed
    cache (QuantizedCache: its rows come out of every gather dequantised, so the reference reads it as it is)
    has its own decode kernel (no sinks or windows: those layers run the reference)."""
    triton = form(backend, q, k_cache, v_cache) == "triton" and meta.is_decode
    if isinstance(k_cache, QuantizedCache):
        if triton and sinks is None and window is None:
            from kernels.triton_attention_quant import paged_decode_quant_triton
            return paged_decode_quant_triton(q, k_cache, v_cache, meta.block_tables, meta.device_context_lens(q.device),
                                             meta.block_size, scale, meta.max_context or max(meta.context_lens))
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sinks, window)
    if not triton:
        return paged_attention_ref(q, k_cache, v_cache, meta, scale, sinks, window)
    H, Hkv = q.shape[1], k_cache.shape[1]
    if H % Hkv or k_cache.shape[:2] != v_cache.shape[:2] or q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)} want [T, H, Dk], [S, Hkv, Dk], [S, Hkv, Dv] with Hkv dividing H")
    from kernels.triton_attention import paged_decode_triton   # lazily: the package works without triton
    return paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.device_context_lens(q.device),
                               meta.block_size, scale, meta.max_context or max(meta.context_lens), sinks=sinks,
                               window=window)
