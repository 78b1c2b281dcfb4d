"""Activation-ordered groups: a layer's `g_idx` [K] (GPTQ desc_act `X.g_idx`, compressed-tensors actorder
`X.weight_g_idx`) names each input column's group, read into what our contiguous groups can hold.

weight[n, k] = (q[n, k] - zero[n, g_idx[k]]) * scale[n, g_idx[k]]. When every run of `group` inputs along K
belongs to one group (the groups permuted whole), the layer is held quantized exactly: our group j takes the
checkpoint's group order[j]. When groups interleave along K (GPTQ's usual activation order: a permutation of
the columns) no contiguous grouping holds it, and the layer is dequantised at load."""

import warnings
from dataclasses import dataclass

import torch

from moe_engine.checkpoint import TensorInfo

INDEX_DTYPES = ("I32", "I64")


@dataclass(frozen=True)
class GroupOrder:
    """A layer's checkpoint groups against our contiguous ones."""
    order: torch.Tensor | None = None     # [G] int64: the checkpoint group our group j holds; None: group j
    interleaved: bool = False             # a group's inputs scattered along K: no contiguous form, dequantise

    def reorder(self, scale: torch.Tensor, zero: torch.Tensor | None):
        """(scale, zero) [N, G] with the groups in our order."""
        if self.order is None:
            return scale, zero
        return scale[:, self.order], None if zero is None else zero[:, self.order]


IN_ORDER = GroupOrder()


def read_group_index(name: str, info: TensorInfo, handles) -> torch.Tensor:
    """The g_idx tensor `name` as int64 [K]."""
    return handles[info.file].get_tensor(name).long()


def check_group_index(name: str, info: TensorInfo | None, handles, K: int, group: int,
                      unset_in_order: bool = False) -> GroupOrder | str:
    """The layer's GroupOrder from its g_idx tensor `name` (info None: there is none, groups in order), or one
    line naming what is wrong with it. unset_in_order: a g_idx of all -1 (compressed-tensors' value until GPTQ
    sets it, which its decompressor reads as column order) means the groups are in order."""
    if info is None:
        return IN_ORDER
    G = K // group
    if info.shape != (K,) or info.dtype not in INDEX_DTYPES:
        return f"{name} is {info.dtype} {list(info.shape)}, expected I32 {[K]}"
    g_idx = read_group_index(name, info, handles)                        # [K]
    if unset_in_order and bool((g_idx == -1).all()):
        return IN_ORDER
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
        return f"{name} holds groups outside 0..{G - 1} (min {int(g_idx.min())}, max {int(g_idx.max())})"
    runs = g_idx.view(G, group)                                          # [G, g]: our groups, contiguous along K
    if not bool((runs == runs[:, :1]).all()):
        return GroupOrder(interleaved=True)
    order = runs[:, 0]                                                   # [G]
    return IN_ORDER if torch.equal(order, torch.arange(G)) else GroupOrder(order)


def dequantize_by_index(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        g_idx: torch.Tensor) -> torch.Tensor:
    """(q - zero) * scale with input k in group g_idx[k]: q [N, K], scale and zero [N, G] -> float32 [N, K]."""
    w = q.float() if zero is None else q.float() - zero.float()[:, g_idx]
    return w * scale.float()[:, g_idx]


def warn_dequantized(what: str, part: str, dequantized: set[str], total: int) -> None:
    """One warning for all the layers whose interleaved groups are dequantised at load."""
    if dequantized:
        warnings.warn(f"{what}: {len(dequantized)} of {total} quantized layers have activation-ordered groups that "
                      f"interleave along the input ({part}), which our contiguous groups cannot hold exactly; those "
                      "layers are dequantised to the model dtype at load (full-precision memory), e.g. "
                      f"{min(dequantized)}", stacklevel=5)
