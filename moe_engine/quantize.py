"""Quantizing a model's weights at load: which tensors, in which format, swapped in before streaming."""

from dataclasses import dataclass

import torch

from kernels.quant import QuantizedWeight
from moe_engine.errors import MoeEngineError

METHODS = ("int8", "int4", "fp8", "fp8-block")
FP8_BLOCK = (128, 128)


@dataclass(frozen=True)
class QuantSpec:
    """What `quantization=` asks for. method: int8 (symmetric, per output channel), int4 (groups of
    group_size along the input; symmetric or not), fp8 (e4m3, per output channel) or fp8-block (128x128
    blocks). Routed and shared experts always; attention projections, dense-layer MLPs and the LM head (not
    when tied to the embedding) when asked. The LM head is held at 8 bits per channel (int8, or fp8 for the
    fp8 methods) whatever the method: in int4 it cost +0.9% / +2.1% more held-out perplexity on the shipped
    models than int4 experts alone, int8 +0.02% / +0.05% (llama.cpp keeps it at 6-8 bits too).
    clip_search: each group's range shrunk to the least squared error (else round to nearest)."""
    method: str
    group_size: int = 128
    symmetric: bool = True
    quantize_attention: bool = False
    quantize_dense_mlp: bool = False
    clip_search: bool = True
    quantize_lm_head: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoeEngineError(f"quantization={self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 8 or g % 8:
            raise MoeEngineError(f"bad quant_group_size={g!r}: must be a positive multiple of 8 (e.g. 32, 64, 128)")
        for name in ("symmetric", "quantize_attention", "quantize_dense_mlp", "clip_search", "quantize_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise MoeEngineError(f"bad setting {name}={getattr(self, name)!r}: must be True or False")
        if not self.symmetric and self.method != "int4":
            raise MoeEngineError(f"asymmetric quantization is for int4 only, not {self.method}; drop the "
                                 "asymmetric setting or use quantization='int4'")

    @property
    def kinds(self) -> set[str]:
        """The kinds of CausalLM.quantizable_weights() this spec quantizes."""
        return {"experts", "shared"} | ({"attention"} if self.quantize_attention else set()) | (
            {"dense"} if self.quantize_dense_mlp else set()) | ({"head"} if self.quantize_lm_head else set())

    def held(self, kind: str, shape) -> tuple[str, tuple[int, int], bool]:
        """(format, block, asymmetric) a weight of this kind and shape is held in."""
        if kind == "head":
            return ("fp8" if self.format == "fp8" else "int8"), (1, shape[-1]), False
        return self.format, self.block(shape), not self.symmetric

    def block(self, shape) -> tuple[int, int]:
        N, K = shape[-2:]
        return {"int8": (1, K), "int4": (1, self.group_size), "fp8": (1, K), "fp8-block": FP8_BLOCK}[self.method]

    @property
    def format(self) -> str:
        return "fp8" if self.method.startswith("fp8") else self.method


def held_weight(model: torch.nn.Module, name: str):
    """The parameter, or the QuantizedWeight that replaced it, at a dotted name."""
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, attr)


def swap_weight(model: torch.nn.Module, name: str, qw: QuantizedWeight) -> None:
    """Put qw where the weight at a dotted name was (its full-precision tensor is dropped)."""
    module, _, attr = name.rpartition(".")
    owner = model.get_submodule(module)
    delattr(owner, attr)
    setattr(owner, attr, qw)


def keep_quantized(model: torch.nn.Module, targets: dict, choose) -> list[str]:
    """Swap a QuantizedWeight in for each quantizable weight a quantized checkpoint can fill as stored; the
    names swapped. targets maps each checkpoint tensor to (param, index) as the loader will write it;
    choose(p, parts) gets the held parameter and its [(tensor name, index)] and returns the QuantizedWeight
    to put in its place, or None to keep it full precision (the loader then dequantises into it)."""
    sources: dict[str, list] = {}
    for name, (param, index) in targets.items():
        sources.setdefault(param, []).append((name, index))
    swapped = []
    for param in model.quantizable_weights():
        parts = sources.get(param)
        qw = choose(held_weight(model, param), parts) if parts else None
        if qw is not None:
            swap_weight(model, param, qw)
            swapped.append(param)
    return swapped


def quantize_weights(model: torch.nn.Module, spec: QuantSpec, device) -> list[str]:
    """Replace each weight spec selects by an empty QuantizedWeight on device (the full-precision tensor is
    dropped), for the loader to fill one checkpoint tensor at a time; the names replaced. A group size
    that does not divide a tensor's input width is refused, naming the tensor."""
    kinds = {n: kind for n, kind in model.quantizable_weights().items() if kind in spec.kinds}
    names = list(kinds)
    for name in names:
        p = held_weight(model, name)
        K = p.shape[-1]
        if spec.held(kinds[name], p.shape)[0] == "int4" and K % spec.group_size:
            fits = [g for g in range(8, min(K, 128) + 1, 8) if K % g == 0]
            hint = f"pick a group size dividing {K} (e.g. {fits[-1]})" if fits else "use int8 for this model"
            raise MoeEngineError(f"quant_group_size={spec.group_size} does not divide the input width {K} of "
                                 f"{name}; {hint} or leave that tensor out")
    for name in names:
        p = held_weight(model, name)
        fmt, block, asymmetric = spec.held(kinds[name], p.shape)
        qw = QuantizedWeight(fmt, p.shape, block, asymmetric, device=device)
        qw.clip_search = spec.clip_search
        swap_weight(model, name, qw)
    return names


def quantized_weights(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
