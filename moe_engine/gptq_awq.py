"""GPTQ and AWQ (GEMM) checkpoints, as published on the hub, read into kernels.quant.QuantizedWeight.

For a Linear `X` of logical weight [N, K] (bits b, group size g; g = K per channel; G = K / g):
  GPTQ: `X.qweight` int32 [K * b / 32, N], packed along the input: row i, bits j*b of column n hold input
        k = i * 32/b + j; `X.qzeros` int32 [G, N * b / 32], packed the same way along the output;
        `X.scales` float [G, N]; `X.g_idx` int32 [K] (input k's group). Values and zeros are unsigned;
        weight[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]. checkpoint_format "gptq" (v1) stores
        each zero minus one; "gptq_v2" stores it as it is.
  AWQ GEMM: `X.qweight` int32 [K, N / 8], packed along the output, word w's nibble i holding output
        w * 8 + AWQ_ORDER[i]; `X.qzeros` int32 [G, N / 8] the same; `X.scales` float [G, N]; 4 bits;
        weight[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n].
Ours: signed q = unsigned - 2^(b-1), likewise the zero (symmetric GPTQ: the zero 2^(b-1), i.e. none).
A GPTQ layer whose g_idx groups are contiguous runs of g inputs (any group order) is held quantized
exactly, its scales reordered; activation-ordered layers whose groups interleave along K cannot be, and are
dequantised to the model dtype at load (one warning counts them; moe_engine.group_index, shared with
compressed-tensors' actorder). Tensors with a plain `.weight` (modules_to_not_convert, the head, ...) load as
they are."""

import torch
from safetensors import safe_open

from kernels.quant import QuantizedSlot, QuantizedWeight
from moe_engine.checkpoint import TensorInfo
from moe_engine.compressed_tensors import SCALE_DTYPES, IntScheme, unpack_int32
from moe_engine.errors import MoeEngineError
from moe_engine.group_index import (GroupOrder, check_group_index, dequantize_by_index, read_group_index,
                                    warn_dequantized)
from moe_engine.quantize import keep_quantized

PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # AutoAWQ GEMM: nibble i of a word holds output AWQ_ORDER[i]
AWQ_UNDO = (0, 4, 1, 5, 2, 6, 3, 7)       # output j of a word is in nibble AWQ_UNDO[j]


def _group_size(method: str, value) -> int | None:
    if value in (-1, None) and method == "gptq":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoeEngineError(f"{method.upper()} quantization_config has group_size={value!r}; expected a positive "
                             "integer (or -1, per channel); fix config.json")
    return value


def _scheme(method: str, q: dict) -> tuple[IntScheme, bool]:
    """(the scheme, whether zeros are stored minus one (GPTQ v1)), the config's variant checked."""
    if method == "gptq":
        bits = q.get("bits")
        fmt = q.get("checkpoint_format") or q.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2") or q.get("is_marlin_format"):
            raise MoeEngineError(f"GPTQ checkpoint_format {fmt if not q.get('is_marlin_format') else 'marlin'!r} "
                                 "is not supported (gptq, gptq_v2)")
        if q.get("dynamic"):
            raise MoeEngineError("GPTQ quantization_config has per-module `dynamic` overrides, which are not "
                                 "supported; use a checkpoint with one scheme for every layer")
        if bits not in (4, 8):
            raise MoeEngineError(f"GPTQ bits={bits!r} is not supported (4 or 8)")
        return IntScheme(bits, _group_size(method, q.get("group_size", -1)), bool(q.get("sym", True))), fmt == "gptq"
    bits = q.get("bits", q.get("w_bit"))
    version = str(q.get("version") or "gemm").lower()
    if version != "gemm":
        raise MoeEngineError(f"AWQ version {q.get('version')!r} is not supported (only gemm)")
    if bits != 4:
        raise MoeEngineError(f"AWQ bits={bits!r} is not supported (4)")
    if q.get("zero_point") is False:
        raise MoeEngineError("AWQ zero_point: false is not supported (only AWQ GEMM with zero points)")
    return IntScheme(4, _group_size(method, q.get("group_size", q.get("q_group_size"))), False), False


class GptqAwqCheckpoint:
    """A GPTQ or AWQ checkpoint's tensors as the loader sees them: `X.weight` for every packed Linear X, with
    its logical shape [N, K]; the packed parts are read together when X.weight is."""

    def __init__(self, method: str, q: dict, tensors: dict[str, TensorInfo], handles):
        self.method, self.label = method, method.upper()
        self.scheme, self.zeros_minus_one = _scheme(method, q)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.group_order: dict[str, GroupOrder] = {}
        self.dequantized: set[str] = set()                      # activation-ordered: held in full precision
        self.scale_dtypes: dict[str, torch.dtype] = {}
        self.tensors = {n: t for n, t in tensors.items() if not n.endswith(tuple("." + p for p in PARTS))}
        problems = []
        for name in sorted(tensors):
            if not name.endswith(".qweight"):
                continue
            module = name.removesuffix(".qweight")
            problem = self._check(module, tensors, handles)
            if problem:
                problems.append(problem)
                continue
            N, K = self.shapes[module]
            self.scale_dtypes[module] = SCALE_DTYPES[tensors[module + ".scales"].dtype]
            self.tensors[module + ".weight"] = TensorInfo(tensors[name].file, (N, K), f"I{self.scheme.bits}")
        orphans = sorted(n for n in tensors if n.endswith(tuple("." + p for p in PARTS))
                         and n.rsplit(".", 1)[0] + ".qweight" not in tensors)
        problems += [f"{n} has no {n.rsplit('.', 1)[0]}.qweight" for n in orphans[:3]]
        if problems:
            raise MoeEngineError(f"{self.label} checkpoint is inconsistent: {'; '.join(problems[:6])}"
                                 f"{' ...' if len(problems) > 6 else ''}; re-download or re-quantize it")
        warn_dequantized("GPTQ desc_act", "g_idx", self.dequantized, len(self.shapes))

    def _check(self, module: str, tensors, handles) -> str | None:
        """One line naming the tensor and what is wrong with it, or None (the layer's shape and group order
        recorded)."""
        s = self.scheme
        per_word = 32 // s.bits
        packed = tensors[module + ".qweight"]
        if packed.dtype != "I32" or len(packed.shape) != 2:
            return f"{module}.qweight is {packed.dtype} {list(packed.shape)}, expected a 2-d I32"
        rows, cols = packed.shape
        N, K = (cols, rows * per_word) if self.method == "gptq" else (cols * per_word, rows)
        if s.group is not None and K % s.group:
            return f"{module}.qweight: group size {s.group} does not divide the input width {K}"
        G = K // s.group if s.group else 1
        scale = tensors.get(module + ".scales")
        if scale is None:
            return f"{module}.scales is missing"
        if scale.shape != (G, N) or scale.dtype not in SCALE_DTYPES:
            return f"{module}.scales is {scale.dtype} {list(scale.shape)}, expected a float {[G, N]}"
        zero = tensors.get(module + ".qzeros")
        want = (G, N // per_word)
        if zero is None:
            return f"{module}.qzeros is missing"
        if zero.dtype != "I32" or zero.shape != want or N % per_word:
            return f"{module}.qzeros is {zero.dtype} {list(zero.shape)}, expected I32 {list(want)}"
        g_info = tensors.get(module + ".g_idx") if self.method == "gptq" else None
        order = check_group_index(module + ".g_idx", g_info, handles, K, s.group or K)
        if isinstance(order, str):
            return order
        self.shapes[module], self.group_order[module] = (N, K), order
        if order.interleaved:
            self.dequantized.add(module)
        return None

    def holds(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.shapes

    def logical_name(self, name: str) -> str | None:
        """A stored tensor's name as the loader's targets know it: X.qweight -> X.weight; the other packed
        parts -> None (read with their weight)."""
        if name.endswith(".qweight"):
            return name.removesuffix(".qweight") + ".weight"
        return None if name.endswith(tuple("." + p for p in PARTS)) else name

    def prepare(self, model, targets: dict, device) -> list[str]:
        """Replace each quantizable weight whose checkpoint tensors are all packed (and not activation-ordered)
        by a QuantizedWeight of the scheme; the rest stay full precision and get dequantised values."""
        s = self.scheme

        def choose(p, parts):
            modules = [n.removesuffix(".weight") for n, _ in parts]
            if any(m not in self.shapes or m in self.dequantized for m in modules):
                return None
            return QuantizedWeight(s.format, p.shape, s.block(p.shape[-1]), not s.symmetric,
                                   self.scale_dtypes[modules[0]], device)

        return keep_quantized(model, targets, choose)

    def values(self, module: str, handles, tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(signed q int8 [N, K], scale [N, G], signed zero int8 [N, G] or None if symmetric), the groups in
        the checkpoint's order (see group_order)."""
        s = self.scheme
        N, K = self.shapes[module]

        def get(part):
            return handles[tensors[f"{module}.{part}"].file].get_tensor(f"{module}.{part}")

        if self.method == "gptq":
            q = unpack_int32(get("qweight").t(), s.bits, K)                         # [N, K]
            zero = unpack_int32(get("qzeros"), s.bits, N).to(torch.int16)           # [G, N]
        else:
            undo = (torch.arange(N) // 8) * 8 + torch.tensor(AWQ_UNDO).repeat(N // 8)
            q = unpack_int32(get("qweight"), 4, N)[:, undo].t()                     # [K, N] -> [N, K]
            zero = unpack_int32(get("qzeros"), 4, N)[:, undo].to(torch.int16)       # [G, N]
        zero = zero + 1 if self.zeros_minus_one else zero
        scale = get("scales").t()                                                   # [N, G]
        if s.symmetric:
            if bool((zero != 0).any()):
                raise MoeEngineError(f"{module}.qzeros: sym is true but the zero points are not "
                                     f"{1 << (s.bits - 1)}; fix `sym` (or checkpoint_format) in config.json")
            return q, scale, None
        if int(zero.max()) > 127:
            raise MoeEngineError(f"{module}.qzeros holds a zero point of {int(zero.max()) + 128} (8-bit v1 zeros "
                                 "stored minus one overflowed); re-quantize as gptq_v2")
        return q, scale, zero.to(torch.int8).t()

    def write(self, name: str, handles, tensors: dict[str, TensorInfo], dest) -> None:
        """Read X.weight's packed parts and store them in dest: a QuantizedWeight (slot) takes the values with
        the groups in our order; a full-precision destination gets them dequantised (per input's group)."""
        module = name.removesuffix(".weight")
        q, scale, zero = self.values(module, handles, tensors)
        if isinstance(dest, QuantizedWeight):
            dest = dest[()]                      # the whole weight, as a slot
        if isinstance(dest, QuantizedSlot):
            dest.store_quantized(q, *self.group_order[module].reorder(scale, zero))
            return
        N, K = self.shapes[module]
        g_info = tensors.get(module + ".g_idx") if self.method == "gptq" else None
        if g_info is not None:
            g_idx = read_group_index(module + ".g_idx", g_info, handles)                # [K]
        else:
            g_idx = torch.arange(K) // (self.scheme.group or K)
        dest.copy_(dequantize_by_index(q, scale, zero, g_idx))


def read_gptq_awq(cfg: dict, tensors: dict[str, TensorInfo], files) -> GptqAwqCheckpoint | None:
    """The checkpoint's packed view when config.json's quantization_config says gptq or awq, else None."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") not in ("gptq", "awq"):
        return None
    return GptqAwqCheckpoint(q["quant_method"], q, tensors, {f: safe_open(f, framework="pt") for f in files})
