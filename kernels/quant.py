"""Quantized weights in memory (int8, int4 in groups, fp8 e4m3, mxfp4 as checkpoints hold it), their quantizers
and torch dequantisation."""

import math

import torch
import torch.nn as nn

from kernels import cpu_quant

FORMATS = ("int8", "int4", "fp8", "mxfp4")
FP8_MAX = 448.0                          # largest finite float8_e4m3fn
# The 16 e2m1 codes of mxfp4: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = (1, 32)                    # one e8m0 exponent per 32 values along the input
# Shrink factors of each group's range tried by the clipping search (1.0 is round-to-nearest).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
# The quantizers work on this many rows at a time, so their temporaries stay a few rows of a tensor.
QUANT_ROWS = 2048


class QuantizedWeight(nn.Module):
    """A weight of logical shape [*lead, N, K] (lead: e.g. the expert index) held quantized.

    Every format shares one scale layout: scale [*lead, ceil(N / bn), ceil(K / bk)] for block (bn, bk), so
    that weight[..., n, k] = (q[..., n, k] - zero[..., n // bn, k // bk]) * scale[..., n // bn, k // bk].
      int8: q int8 [*lead, N, K] (bn = 1; bk = K per output channel, or a group size).
      int4: q in [-8, 7] packed two per byte as q + 8 (even k in the low nibble, odd k in the high one):
            packed uint8 [*lead, N, K / 2]; bn = 1, bk = the group size. The byte order is that of
            compressed-tensors' pack-quantized int32 words, so `packed.view(torch.int32)` is theirs.
      fp8:  q float8_e4m3fn [*lead, N, K]; (1, K) per channel, (128, 128) blocks, (N, K) per tensor.
      mxfp4: q an e2m1 code in [0, 15] (E2M1), packed two per byte, even k in the low nibble: packed uint8
            [*lead, N, K / 2]; block (1, 32), scale uint8 e8m0 exponents (2^(s - 127)) [*lead, N, K / 32]:
            the bytes of an MXFP4 checkpoint's `_blocks` / `_scales` as read. Never quantized here (store
            refuses); weight = E2M1[q] * 2^(scale - 127), computed as moe_engine.mxfp4 does.
    zero: int8 like scale (asymmetric int formats) or None (symmetric). Buffers, so .to() moves them and
    model.buffers() counts the bytes held. On the CPU an int4 weight's bytes may be held in the order of
    torch's fused int4 op instead (cpu_packed); values() reads either."""

    def __init__(self, fmt: str, shape, block: tuple[int, int], asymmetric: bool = False,
                 scale_dtype=torch.bfloat16, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantized format {fmt!r}; choose one of {', '.join(FORMATS)}")
        *lead, N, K = shape
        self.format, self.shape, self.block = fmt, torch.Size(shape), (int(block[0]), int(block[1]))
        self.clip_search = True          # how store() quantizes when not told (see quantize_int)
        self.op_order = False            # int4 bytes in the CPU op's order (see cpu_packed), not ours
        if fmt == "int4" and K % 2:
            raise ValueError(f"int4 needs an even input width, got {K}")
        if fmt == "mxfp4" and (self.block != MXFP4_BLOCK or K % 32 or asymmetric):
            raise ValueError(f"mxfp4 holds symmetric blocks {MXFP4_BLOCK} of an input width that is a multiple "
                             f"of 32, not block {self.block} of width {K}")
        if fmt == "mxfp4":
            scale_dtype = torch.uint8
        q_shape, q_dtype = {"int8": ((*lead, N, K), torch.int8), "int4": ((*lead, N, K // 2), torch.uint8),
                            "fp8": ((*lead, N, K), torch.float8_e4m3fn),
                            "mxfp4": ((*lead, N, K // 2), torch.uint8)}[fmt]
        s_shape = (*lead, math.ceil(N / self.block[0]), math.ceil(K / self.block[1]))
        self.register_buffer("qweight", torch.zeros(q_shape, dtype=q_dtype, device=device))
        one = 127 if fmt == "mxfp4" else 1                  # e8m0's 2^0
        self.register_buffer("scale", torch.full(s_shape, one, dtype=scale_dtype, device=device))
        self.register_buffer("zero", torch.zeros(s_shape, dtype=torch.int8, device=device) if asymmetric else None)

    @property
    def group_size(self) -> int:
        return self.block[1]

    @property
    def asymmetric(self) -> bool:
        return self.zero is not None

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def describe(self) -> str:
        """e.g. 'int4 g128 sym' or 'fp8 block 128x128'."""
        bn, bk = self.block
        if self.format == "fp8":
            kind = "channel" if (bn, bk) == (1, self.shape[-1]) else (
                "tensor" if (bn, bk) == tuple(self.shape[-2:]) else f"block {bn}x{bk}")
            return f"fp8 {kind}"
        if self.format == "mxfp4":
            return "mxfp4 g32 e8m0"
        group = "channel" if self.format == "int8" and bk == self.shape[-1] else f"g{bk}"
        return f"{self.format} {group} {'asym' if self.asymmetric else 'sym'}"

    def extra_repr(self) -> str:
        return f"{self.describe()}, shape={list(self.shape)}"

    def unpacked(self, index=()) -> torch.Tensor:
        """The integer (or fp8) values of weight[index] as stored: int8 [.., N, K] (fp8 as float8; mxfp4: the
        e2m1 codes, uint8)."""
        return self.values(index if isinstance(index, tuple) else (index,))[0]

    def dequantize(self, dtype=torch.float32, index=()) -> torch.Tensor:
        """weight[index] in dtype (index: over the lead dimensions, e.g. an expert id): [.., N, K]."""
        q, scale, zero = self.values(index if isinstance(index, tuple) else (index,))
        if self.format == "mxfp4":
            return dequantize_e2m1(q, scale, dtype)
        return dequantize_values(q, scale, zero, self.block, dtype)

    def __getitem__(self, index) -> "QuantizedSlot":
        return QuantizedSlot(self, index if isinstance(index, tuple) else (index,))

    def _where(self, index: tuple) -> tuple[tuple, tuple]:
        """(the index into qweight, the index into scale and zero) of weight[index]."""
        lead, rows = _split_index(index, self.shape)
        if rows is None:
            return lead, lead
        bn = self.block[0]
        if rows.start % bn or (rows.stop % bn and rows.stop != self.shape[-2]):
            raise ValueError(f"rows {rows.start}:{rows.stop} do not start and end on {bn}-row scale blocks")
        return lead + (rows,), lead + (slice(rows.start // bn, math.ceil(rows.stop / bn)),)

    def store(self, index: tuple, w: torch.Tensor, clip_search: bool | None = None) -> None:
        """Quantize w (the full-precision values of weight[index]) into place. index: lead ids (all of them
        or a prefix), then, after all of them, optionally a row slice, which must start and end on a scale
        block boundary."""
        if self.format == "mxfp4":
            raise ValueError("mxfp4 weights hold a checkpoint's bytes as read (store_packed); they are not "
                             "quantized here")
        self._to_our_order()
        w = w.to(self.qweight.device, torch.float32)
        clip_search = self.clip_search if clip_search is None else clip_search
        zero = None
        if self.format == "fp8":
            q, scale = quantize_fp8(w, self.block, self.scale.dtype)
        else:
            q, scale, zero = quantize_int(w, 4 if self.format == "int4" else 8, self.block[1], self.asymmetric,
                                          clip_search, self.scale.dtype)
        self.store_quantized(index, q, scale, zero)

    def store_quantized(self, index: tuple, q: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor | None = None) -> None:
        """Values already quantized into weight[index]: q int8 (fp8: float8; mxfp4: uint8 codes) [.., n, K]
        unpacked, scale and zero (int8, asymmetric only) in this weight's scale layout."""
        self._to_our_order()
        where, swhere = self._where(index)
        if (zero is not None) != self.asymmetric:
            raise ValueError(f"zero points {'given to a symmetric' if zero is not None else 'missing for an asymmetric'}"
                             " quantized weight")
        q = pack_int4(q) if self.format == "int4" else pack_nibbles(q) if self.format == "mxfp4" else q
        self.qweight[where] = q.to(self.qweight.device)
        self.scale[swhere] = scale.to(self.scale.device, self.scale.dtype)
        if zero is not None:
            self.zero[swhere] = zero.to(self.zero.device, torch.int8)

    def store_packed(self, index: tuple, packed: torch.Tensor, scale: torch.Tensor) -> None:
        """weight[index] from bytes already in this weight's held form (qweight's and scale's layout and
        dtypes, e.g. an MXFP4 checkpoint's blocks and scales), copied as they are."""
        self._to_our_order()
        where, swhere = self._where(index)
        if packed.dtype != self.qweight.dtype or scale.dtype != self.scale.dtype:
            raise ValueError(f"store_packed wants {self.qweight.dtype} values and {self.scale.dtype} scales, "
                             f"got {packed.dtype} and {scale.dtype}")
        self.qweight[where] = packed.to(self.qweight.device)
        self.scale[swhere] = scale.to(self.scale.device)

    def values(self, index: tuple = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q unpacked [.., n, K], scale, zero or None) of weight[index], as store_quantized takes them."""
        where, swhere = self._where(index)
        if self.op_order:                # whole matrices back to our byte order, then the rows asked for
            lead, rows = _split_index(index, self.shape)
            q = cpu_quant.from_op_order(self.qweight[lead])
            q = q if rows is None else q[..., rows, :]
            scale = self.scale_zeros[..., 0].transpose(-1, -2)                 # [*lead, N, K/g], a view
        else:
            q, scale = self.qweight[where], self.scale
        if self.format == "int4":
            q = torch.stack(((q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8), -1).flatten(-2)
        elif self.format == "mxfp4":
            q = torch.stack((q & 0xF, q >> 4), -1).flatten(-2)                  # [.., n, K] codes
        return q, scale[swhere], None if self.zero is None else self.zero[swhere]

    def copy_(self, w: torch.Tensor, clip_search: bool | None = None) -> None:
        """The whole weight from full-precision values w [*lead, N, K] (the loader's destination protocol)."""
        self.store((), w, clip_search)

    def cpu_packed_ok(self) -> bool:
        """Whether this int4 CPU weight can be (or is) held for torch's fused int4 op."""
        return self.op_order or (self.format == "int4" and self.qweight.device.type == "cpu"
                                 and cpu_quant.packs_int4(self.shape, self.group_size))

    def cpu_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the int4 bytes [*lead, N, K/2] in the fused CPU op's order, scale_zeros [*lead, K/g, N, 2]: each
        group's scale and -zero * scale, in the scale dtype), the form torch's int4 op takes; the weight is
        rearranged so in place on first use (check cpu_packed_ok first). The scales are then held only
        there (values() reads them back exactly; the zero points stay as they are)."""
        if not self.op_order:
            self.qweight.copy_(cpu_quant.to_op_order(self.qweight))
            self.register_buffer("scale_zeros", cpu_quant.scale_zeros(self.scale, self.zero, self.scale.dtype))
            self.register_buffer("scale", None)
            self.op_order = True
        return self.qweight, self.scale_zeros

    def _to_our_order(self) -> None:
        if self.op_order:
            self.qweight.copy_(cpu_quant.from_op_order(self.qweight))
            self.register_buffer("scale", self.scale_zeros[..., 0].transpose(-1, -2).contiguous())
            del self.scale_zeros
            self.op_order = False

    def _apply(self, fn, recurse=True):
        """Moving off the CPU (or any .to()) takes the bytes back to our order first."""
        self._to_our_order()
        return super()._apply(fn, recurse)


class QuantizedSlot:
    """weight[index] of a QuantizedWeight, as the loader sees a destination: a shape, and copy_."""

    def __init__(self, weight: QuantizedWeight, index: tuple):
        self.weight, self.index = weight, index
        lead, rows = _split_index(index, weight.shape)
        shape = list(weight.shape[len(lead):])
        if rows is not None:
            shape[-2] = len(range(shape[-2])[rows])
        self.shape = torch.Size(shape)

    def copy_(self, w: torch.Tensor, clip_search: bool | None = None) -> None:
        self.weight.store(self.index, w, clip_search)

    def store_packed(self, packed: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight.store_packed(self.index, packed, scale)

    def store_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        self.weight.store_quantized(self.index, q, scale, zero)

    def values(self):
        return self.weight.values(self.index)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, block: tuple[int, int],
                      dtype=torch.float32) -> torch.Tensor:
    """(q - zero) * scale, each scale (and zero) spread over its (bn, bk) block: [.., N, K] in dtype."""
    N, K = q.shape[-2:]
    bn, bk = block
    if bn == 1 and K % bk == 0:          # groups along the input: broadcast each scale over its group
        g = q.unflatten(-1, (K // bk, bk)).float()                              # [.., N, K/bk, bk]
        if zero is not None:
            g = g - zero.float()[..., None]
        return (g * scale.float()[..., None]).flatten(-2).to(dtype)
    q = q.float()
    if zero is not None:
        q = q - _expand(zero.float(), bn, bk, N, K)
    return (q * _expand(scale.float(), bn, bk, N, K)).to(dtype)


def _split_index(index: tuple, shape: torch.Size) -> tuple[tuple, slice | None]:
    """(the lead-dimension ids, the row slice or None) of an index such as (e,), (e, rows), (rows,) or ()."""
    n_lead = len(shape) - 2
    lead = tuple(int(i) for i in index if not isinstance(i, slice))
    rows = [i for i in index if isinstance(i, slice)]
    if len(lead) > n_lead or len(rows) > 1 or (rows and (len(lead) != n_lead or index[-1] is not rows[0])):
        raise ValueError(f"a quantized weight is written whole or by rows per lead index, not {index}")
    if not rows:
        return lead, None
    start, stop, _ = rows[0].indices(shape[-2])
    return lead, slice(start, stop)


def _expand(s: torch.Tensor, bn: int, bk: int, N: int, K: int) -> torch.Tensor:
    """Per-block values [.., ceil(N/bn), ceil(K/bk)] spread over the weight: [.., N, K]."""
    if bn > 1:
        s = s.repeat_interleave(bn, -2)[..., :N, :]
    return s.repeat_interleave(bk, -1)[..., :K] if bk > 1 else s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7] [.., K] -> uint8 [.., K / 2]: (q + 8) two per byte, even k in the low nibble."""
    return pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15] [.., K] -> uint8 [.., K / 2]: two per byte, even k in the low nibble."""
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def dequantize_e2m1(codes: torch.Tensor, exponents: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """mxfp4: codes uint8 [.., N, K] (E2M1 indices), exponents uint8 [.., N, K / 32] (e8m0: 2^(e - 127)) ->
    [.., N, K] in dtype, E2M1[code] * 2^(e - 127) by the same ops as moe_engine.mxfp4.dequantize_mxfp4 (so
    bit for bit its values, an all-ones exponent included)."""
    lut = torch.tensor(E2M1, dtype=dtype, device=codes.device)
    values = lut[codes.long()].unflatten(-1, (-1, 32))                          # [.., N, K/32, 32]
    e = exponents.to(torch.int32)[..., None] - 127                              # [.., N, K/32, 1]
    return torch.ldexp(values, e).flatten(-2).to(dtype)


def quantize_int(w: torch.Tensor, bits: int, group: int, asymmetric: bool = False, clip_search: bool = True,
                 scale_dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w float [.., N, K] -> (q int8 [.., N, K] in [-2^(b-1), 2^(b-1) - 1], scale [.., N, K / group] in
    scale_dtype, zero int8 like scale or None), with w ~ (q - zero) * scale. Each group's range (its
    largest magnitude, or its min and max) is shrunk by the CLIP_GRID factor that gives the least squared
    error (clip_search; else the full range, round to nearest). The scales are rounded to scale_dtype
    before the values are quantized against them, so the stored scales are the ones searched."""
    *lead, N, K = w.shape
    if K % group:
        raise ValueError(f"group size {group} does not divide the input width {K}")
    rows = w.reshape(-1, K)
    outs = [_quantize_rows(rows[i:i + QUANT_ROWS], bits, group, asymmetric, clip_search, scale_dtype)
            for i in range(0, rows.shape[0], QUANT_ROWS)]
    q = torch.cat([o[0] for o in outs]).view(*lead, N, K)
    scale = torch.cat([o[1] for o in outs]).view(*lead, N, K // group)
    zero = torch.cat([o[2] for o in outs]).view(*lead, N, K // group) if asymmetric else None
    return q, scale, zero


def _quantize_rows(w, bits, group, asymmetric, clip_search, scale_dtype):
    R, K = w.shape
    g = w.view(R, K // group, group)                                          # [R, G, group]
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    best = None
    for alpha in (CLIP_GRID if clip_search else (1.0,)):
        if asymmetric:
            lo = (g.amin(-1) * alpha).clamp(max=0)                              # [R, G]
            hi = (g.amax(-1) * alpha).clamp(min=0)
            scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-10).to(scale_dtype).float()
            zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)          # [R, G]
        else:
            scale = (g.abs().amax(-1) * alpha / qmax).clamp(min=1e-10).to(scale_dtype).float()
            zero = torch.zeros_like(scale)
        q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)   # [R, G, group]
        err = ((q - zero[..., None]) * scale[..., None] - g).square().sum(-1)          # [R, G]
        if best is None:
            best = [err, q, scale, zero]
        else:
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better[..., None], q, best[1])
            best[2] = torch.where(better, scale, best[2])
            best[3] = torch.where(better, zero, best[3])
    _, q, scale, zero = best
    return q.to(torch.int8).view(R, K), scale.to(scale_dtype), zero.to(torch.int8)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int], scale_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [.., N, K] -> (q float8_e4m3fn [.., N, K], scale [.., ceil(N/bn), ceil(K/bk)]): each block's
    largest magnitude maps to the largest finite e4m3 value; w ~ q * scale."""
    N, K = w.shape[-2:]
    bn, bk = block
    pad_n, pad_k = -N % bn, -K % bk
    p = torch.nn.functional.pad(w, (0, pad_k, 0, pad_n))                      # [.., N', K']
    blocks = p.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))                # [.., N'/bn, bn, K'/bk, bk]
    amax = blocks.abs().amax(dim=(-3, -1))                                     # [.., N'/bn, K'/bk]
    scale = (amax / FP8_MAX).clamp(min=1e-12).to(scale_dtype).float()
    q = (w / _expand(scale, bn, bk, N, K)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(scale_dtype)
