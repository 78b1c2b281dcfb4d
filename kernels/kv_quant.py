"""Compressed KV cache: the layout a model declares, and fp8 e4m3 / int8 parts with float32 scales (int4: two
values a byte, float16 scale and zero point per group) set at write, or fixed per head at load (fp8 / int8)."""

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "int8", "int4")
# Storage dtype and the largest magnitude a scaled value may take in it (int4: the largest code, 0..15).
_STORAGE = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0), "int4": (torch.uint8, 15.0)}
SCALE_DTYPE = torch.float32
# int4: asymmetric (scale and minimum per group, KIVI's form) in groups of INT4_GROUP along each token's row
# (the whole row where it is not a multiple), both in float16: 64 + 2 * 2 * 2 bytes per 128 values.
INT4_GROUP = 64
INT4_SCALE_DTYPE = torch.float16


def int4_group(width: int) -> int:
    """Values per int4 scale in a row of width values."""
    return INT4_GROUP if width % INT4_GROUP == 0 else width


@dataclass(frozen=True)
class CachePart:
    """What one layer caches per token: `heads` rows of `width` values. A compressed part is held in the cache
    dtype with one float32 scale per `group` values along the width; the others in the model dtype."""
    name: str
    heads: int
    width: int
    compressed: bool = True
    group: int = 0                  # values per scale; 0: the whole width (one scale per token and head)

    @property
    def scales(self) -> int:
        """Scales per token and head."""
        return self.width // (self.group or self.width)


@dataclass(frozen=True)
class KVCacheLayout:
    """A model's KV cache, per token: its parts, how many layers hold them, the model dtype and the cache dtype
    ("auto": every part in the model dtype). The bytes it counts are those allocated, scales included."""
    parts: tuple[CachePart, ...]
    num_layers: int
    dtype: torch.dtype
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")

    @property
    def compressed(self) -> bool:
        return self.kv_cache_dtype != "auto"

    def group(self, part: CachePart) -> int:
        """Values per scale of a compressed part in this cache dtype."""
        return int4_group(part.width) if self.kv_cache_dtype == "int4" else part.group or part.width

    def part_bytes(self, part: CachePart) -> int:
        """Bytes of one part per token and layer."""
        if not (self.compressed and part.compressed):
            return part.heads * part.width * self.dtype.itemsize
        if self.kv_cache_dtype == "int4":            # two values a byte; a scale and a zero point per group
            return part.heads * (part.width // 2 + 2 * (part.width // self.group(part)) * INT4_SCALE_DTYPE.itemsize)
        storage = _STORAGE[self.kv_cache_dtype][0]
        return part.heads * (part.width * storage.itemsize + part.scales * SCALE_DTYPE.itemsize)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * sum(self.part_bytes(p) for p in self.parts)


def quantize(x: torch.Tensor, kv_cache_dtype: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q [..., D] in the storage dtype, scale [..., D // group] float32): each group of values
    scaled by its absolute maximum over the storage's largest value (int8 rounded to nearest)."""
    storage, qmax = _STORAGE[kv_cache_dtype]
    xs = x.float().unflatten(-1, (-1, group))                                # [..., G, group]
    scale = xs.abs().amax(-1) / qmax                                         # [..., G]
    y = xs / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    y = (y.round() if storage == torch.int8 else y).clamp(-qmax, qmax)
    return y.to(storage).flatten(-2), scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, kv_cache_dtype: str, group: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H, D] with a given scale per head, scale [H] (a checkpoint's k_scale / v_scale) -> (q [..., H, D] in
    the storage dtype, that scale in every group's slot [..., H, D // group]): values beyond the storage's range
    saturate (e4m3 at +-448, int8 at +-127 after rounding)."""
    storage, qmax = _STORAGE[kv_cache_dtype]
    y = x.float() / scale[:, None]                                           # [..., H, D]
    y = (y.round() if storage == torch.int8 else y).clamp(-qmax, qmax)
    slots = scale[:, None].expand(*x.shape[:-1], x.shape[-1] // group)       # [..., H, G]
    return y.to(storage), slots


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., D], scale [..., G] -> [..., D] in dtype (computed in float32, rounded once)."""
    group = q.shape[-1] // scale.shape[-1]
    x = (q.float().unflatten(-1, (-1, group)) * scale[..., None]).flatten(-2)
    return x if dtype == torch.float32 else x.to(dtype)


def quantize_int4(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] (D even) -> (packed [..., D // 2] uint8, scale [..., G], zero [..., G] float16): each group's
    values v coded round((v - zero) / scale) in 0..15 with zero its minimum and scale its range / 15 (both
    rounded to float16 first, so the codes are those of the stored scale); value 2i in byte i's low nibble."""
    big = torch.finfo(INT4_SCALE_DTYPE).max                                  # beyond it float16 zeros overflow
    xs = x.float().unflatten(-1, (-1, group)).clamp(-big, big)               # [..., G, group]
    lo, hi = xs.amin(-1), xs.amax(-1)                                        # [..., G]
    zero = _to_half(lo, -torch.inf)                                          # at most the minimum
    scale = _to_half((hi - zero.float()) / 15, torch.inf)                    # 15 steps reach the maximum
    inv = torch.where(scale > 0, 1 / scale.float(), 0)                       # a constant group: codes 0
    codes = ((xs - zero.float()[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8).flatten(-2)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale, zero


def _to_half(x: torch.Tensor, toward: float) -> torch.Tensor:
    """x float32 -> float16, rounded toward -inf or +inf (so no value falls outside the stored range)."""
    h = x.to(INT4_SCALE_DTYPE)
    off = h.float() > x if toward < 0 else h.float() < x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, toward)), h)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed [..., D // 2], scale / zero [..., G] -> [..., D] in dtype: code * scale + zero (float32)."""
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)          # [..., D]
    group = codes.shape[-1] // scale.shape[-1]
    x = (codes.float().unflatten(-1, (-1, group)) * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)
    return x if dtype == torch.float32 else x.to(dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as bytes where it is fp8: the CPU has no index_copy_ for float8."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@dataclass
class QuantizedCache:
    """One cache part held compressed: data [S, Hkv, D] (fp8 or int8) with scale [S, Hkv, D // group] float32
    (int4: data [S, Hkv, D // 2] uint8, two values a byte, with scale and zero [S, Hkv, D // group] float16),
    and optionally tail [S, Hkv, R] in the model dtype: key columns after the data kept as they are (MLA's rope
    key). It reads like the [S, Hkv, D + R] tensor it stands for: cache[slots] and cache.index_select(0, slots)
    give those rows dequantised into `dtype`, so the torch references read it unchanged; values() is the
    view of the data columns alone (MLA's value inside the key)."""
    data: torch.Tensor
    scale: torch.Tensor
    kv_cache_dtype: str
    dtype: torch.dtype                  # what reads dequantise into: the model's
    tail: torch.Tensor | None = None
    zero: torch.Tensor | None = None    # int4's per-group minimum
    # [Hkv] float32: a scale per head fixed at load (a checkpoint's k_scale / v_scale), written into every
    # token's scale slots instead of one computed from the token, so every reader works unchanged. fp8 / int8.
    fixed_scale: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_slots: int, heads: int, width: int, group: int, kv_cache_dtype: str, dtype: torch.dtype,
              device, tail_width: int = 0, fixed_scale: torch.Tensor | None = None) -> "QuantizedCache":
        storage = _STORAGE[kv_cache_dtype][0]
        int4 = kv_cache_dtype == "int4"
        if int4 and width % 2:
            raise ValueError(f"an int4 cache packs two values a byte: width {width} must be even")
        if fixed_scale is not None:
            if int4 or tuple(fixed_scale.shape) != (heads,):
                raise ValueError(f"a fixed scale is one per head ([{heads}]) of an fp8 / int8 cache, got "
                                 f"{list(fixed_scale.shape)} for {kv_cache_dtype}")
            fixed_scale = fixed_scale.to(device=device, dtype=SCALE_DTYPE)
        data = torch.zeros(num_slots, heads, width // 2 if int4 else width, dtype=storage, device=device)
        scale_dtype = INT4_SCALE_DTYPE if int4 else SCALE_DTYPE
        scale = torch.zeros(num_slots, heads, width // group, dtype=scale_dtype, device=device)
        zero = torch.zeros_like(scale) if int4 else None
        tail = torch.zeros(num_slots, heads, tail_width, dtype=dtype, device=device) if tail_width else None
        return cls(data, scale, kv_cache_dtype, dtype, tail, zero, fixed_scale)

    @property
    def width(self) -> int:
        """Compressed columns per head (MLA: the latent, which is also the value)."""
        return self.data.shape[-1] * (2 if self.kv_cache_dtype == "int4" else 1)

    @property
    def group(self) -> int:
        return self.width // self.scale.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """As the keys read: [S, Hkv, D + R]."""
        S, H, D = *self.data.shape[:2], self.width
        return torch.Size((S, H, D + (0 if self.tail is None else self.tail.shape[-1])))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    def data_ptr(self) -> int:
        return self.data.data_ptr()

    def stride(self, dim: int | None = None):
        return self.data.stride() if dim is None else self.data.stride(dim)

    def index_copy_(self, dim: int, slot_mapping: torch.Tensor, values: torch.Tensor) -> "QuantizedCache":
        """As a tensor's: values [T, ...] (the head axis may be left out when there is one head) at slots."""
        if dim != 0:
            raise ValueError("a QuantizedCache is written along its slots (dim 0) only")
        self.write(values.reshape(values.shape[0], *self.shape[1:]), slot_mapping)
        return self

    def values(self) -> "QuantizedCache":
        """The same storage read as values: the data columns only [S, Hkv, D] (no tail)."""
        return QuantizedCache(self.data, self.scale, self.kv_cache_dtype, self.dtype, zero=self.zero,
                              fixed_scale=self.fixed_scale)

    def write(self, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Rows slot_mapping [T] get values [T, Hkv, D + R]: the first D quantized (scales computed here, or the
        fixed scale), the rest stored in the tail as they are."""
        D = self.width
        if self.zero is not None:
            q, scale, zero = quantize_int4(values[..., :D], self.group)
            self.zero.index_copy_(0, slot_mapping, zero)
        elif self.fixed_scale is not None:
            q, scale = quantize_with_scale(values[..., :D], self.fixed_scale, self.kv_cache_dtype, self.group)
        else:
            q, scale = quantize(values[..., :D], self.kv_cache_dtype, self.group)
        _rows(self.data).index_copy_(0, slot_mapping, _rows(q))
        self.scale.index_copy_(0, slot_mapping, scale)
        if self.tail is not None:
            self.tail.index_copy_(0, slot_mapping, values[..., D:].to(self.tail.dtype))

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """slots [...] -> the dequantised rows [..., Hkv, D + R] in self.dtype."""
        flat = slots.reshape(-1)
        q = _rows(self.data).index_select(0, flat).view(self.data.dtype)       # [N, Hkv, D] (int4: D / 2)
        if self.zero is not None:
            x = dequantize_int4(q, self.scale.index_select(0, flat), self.zero.index_select(0, flat), self.dtype)
        else:
            x = dequantize(q, self.scale.index_select(0, flat), self.dtype)    # [N, Hkv, D]
        if self.tail is not None:
            x = torch.cat([x, self.tail.index_select(0, flat)], -1)            # [N, Hkv, D + R]
        return x.view(*slots.shape, *x.shape[1:])

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("a QuantizedCache is gathered along its slots (dim 0) only")
        return self.gather(index)

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        if not isinstance(slots, torch.Tensor):
            raise TypeError("a QuantizedCache is read at a tensor of slots; its storage is .data/.scale/.tail")
        return self.gather(slots)

    def dequantized(self) -> torch.Tensor:
        """The whole cache dequantised [S, Hkv, D + R] (for tests and references, never a kernel's path)."""
        return self.gather(torch.arange(self.data.shape[0], device=self.device))
