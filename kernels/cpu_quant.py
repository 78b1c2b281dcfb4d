"""Products with quantized weights on the CPU through torch's fused packed-weight ops, which read the int8 or
int4 bytes and dequantise in registers (no dequantised copy of the weight in memory):
  int8 per output channel, symmetric: aten._weight_int8pack_mm on the weight as we hold it;
  int4 in groups (symmetric or not): aten._weight_int4pack_mm_for_cpu, whose weight is held in the op's own
  blocked byte order (see QuantizedWeight.cpu_packed; packed once, on first use, and unpacked again when
  the weight leaves the CPU or is written).
Everything else (fp8, int8 in groups or asymmetric, shapes the ops refuse, activations other than bf16,
prefill-sized batches) returns None here, and the caller runs the reference
(kernels.quant_ops.quantized_linear_ref)."""

import functools

import torch

# Group sizes the int4 op takes.
INT4_GROUPS = (32, 64, 128, 256)
# The ops serve bf16 activations only: with float32 ones they are 10-100x slower than dequantising the
# weight for F.linear (2-core CPU with AMX, torch 2.13: an int4 2048x2048 expert at 1 row 8.0 ms in float32
# against 0.20 ms in bf16). And only up to these row counts, a compromise across the shapes measured: int8
# at 64 rows 6.3 against ~12 ms dequantised at 2048x2048 but 500 against 330 us at 768x256; int4 at 256
# rows still 22 against 36 ms at 2048x2048.
FUSED_MAX_ROWS = {"int8": 64, "int4": 1024}


@functools.cache
def int4_pack_block() -> int:
    """Rows per block of torch's CPU int4 byte order on this machine (0: the op is missing or its order is
    not the one _unpack_blocked reads): a block of B rows is held k-major, byte j of column k packing row j
    (low nibble) and row j + B/2 (high nibble). Found by packing a probe and checking the round trip."""
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return 0
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = op(probe, 1)
    except RuntimeError:
        return 0
    for block in (64, 32, 16, 8):
        if torch.equal(_unpack_blocked(packed, block), probe.to(torch.uint8)):
            return block
    return 0


def _unpack_blocked(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The op's byte order [N, K/2] -> nibble values q + 8 [N, K] (uint8)."""
    N, half = packed.shape
    v = packed.view(N // block, 2 * half, block // 2)                     # [N/B, K, B/2]
    both = torch.cat((v & 0xF, v >> 4), -1)                               # [N/B, K, B]: rows j, then j + B/2
    return both.transpose(1, 2).reshape(N, 2 * half)


def packs_int4(shape: torch.Size, group: int) -> bool:
    """Whether an int4 weight [.., N, K] in groups of `group` can be held in the op's byte order."""
    block = int4_pack_block()
    N, K = shape[-2:]
    return block > 0 and group in INT4_GROUPS and K % group == 0 and N % block == 0


def to_op_order(plain: torch.Tensor) -> torch.Tensor:
    """Our int4 bytes [.., N, K/2] (even k low nibble) -> the op's byte order, same shape."""
    op = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    N, half = plain.shape[-2:]
    flat = plain.reshape(-1, N, half)
    out = torch.empty_like(flat)
    for i in range(flat.shape[0]):                                        # one matrix (expert) at a time
        q = torch.stack((flat[i] & 0xF, flat[i] >> 4), -1).view(N, 2 * half).to(torch.int32)   # [N, K]
        out[i] = op(q, 1)
    return out.view(plain.shape)


def from_op_order(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of to_op_order, on any device."""
    N, half = packed.shape[-2:]
    flat = packed.reshape(-1, N, half)
    out = torch.empty_like(flat)
    for i in range(flat.shape[0]):
        q = _unpack_blocked(flat[i], int4_pack_block())                  # [N, K]
        out[i] = q[:, 0::2] | (q[:, 1::2] << 4)
    return out.view(packed.shape)


def scale_zeros(scale: torch.Tensor, zero: torch.Tensor | None, dtype) -> torch.Tensor:
    """Our scale [.., N, G] and zero points (int8 or None) -> the int4 op's [.., G, N, 2] in dtype: (s, -z s),
    since (q - z) s = (q + 8 - 8) s + (-z s) and the op reads the nibble q + 8."""
    scale = scale.to(dtype)
    offset = torch.zeros_like(scale) if zero is None else -zero.to(dtype) * scale
    return torch.stack((scale.transpose(-1, -2), offset.transpose(-1, -2)), -1).contiguous()


def cpu_quantized_linear(x: torch.Tensor, w, index: tuple = (), bias: torch.Tensor | None = None):
    """x [M, K] @ w[index].T (+ bias) -> [M, N] through a fused op, or None where none serves (see the
    module's docstring). w: a kernels.quant.QuantizedWeight; index: lead ids (an expert), all of them."""
    if (x.device.type != "cpu" or x.dim() != 2 or x.dtype != torch.bfloat16 or len(index) != w.dim() - 2
            or x.shape[0] > FUSED_MAX_ROWS.get(w.format, 0)):
        return None
    N, K = w.shape[-2:]
    if w.format == "int8" and w.block == (1, K) and not w.asymmetric:
        q, scale, _ = w.values(index)                                     # [N, K] int8, [N, 1]
        out = torch.ops.aten._weight_int8pack_mm(x, q, scale.view(N).to(x.dtype))
    elif w.format == "int4" and w.cpu_packed_ok():
        packed, held = w.cpu_packed()
        sz = held[index]                                                  # [K/g, N, 2]
        if sz.dtype != x.dtype:            # scales held in another dtype: the op's form in x's, per call
            sz = scale_zeros(sz[..., 0].transpose(-1, -2), None if w.zero is None else w.zero[index], x.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed[index], w.group_size, sz)
    else:
        return None
    return out if bias is None else out + bias
