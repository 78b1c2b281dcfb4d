"""The CPU grouped-matmul MoE path equals the per-expert reference, ragged routings included."""

import pytest
import torch

from kernels.moe import fused_moe, fused_moe_grouped, fused_moe_ref, grouped_mm_fits


@pytest.mark.parametrize("T,E,k,D,I", [(2, 4, 1, 16, 8), (8, 8, 2, 32, 24), (33, 6, 3, 64, 40), (5, 16, 4, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_reference(T, E, k, D, I, dtype):
    g = torch.Generator().manual_seed(T * E)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    logits = torch.randn(T, E, generator=g)
    logits[:, 0] = -1e4                                    # expert 0 never chosen: an empty group
    weights, ids = logits.softmax(-1).topk(k)
    assert grouped_mm_fits(x, w13)
    ref = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_moe_grouped(x, w13, w2, weights, ids).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_dispatch_falls_back_when_strides_do_not_fit():
    x, w13, w2 = torch.randn(4, 6), torch.randn(3, 10, 6), torch.randn(3, 6, 5)    # 24-byte rows, I=5
    weights, ids = torch.rand(4, 3).softmax(-1).topk(2)
    assert not grouped_mm_fits(x, w13)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))
