"""The CPU grouped-matmul MoE path equals the per-expert reference, ragged routings included."""

import os
import shutil

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


@pytest.mark.parametrize("T,E,k", [(2, 4, 2), (8, 8, 2), (32, 16, 4)])
def test_dense_equals_reference_and_serves_decode_batches(T, E, k, monkeypatch):
    """Every expert over every token, weighted 0 where not chosen: the reference's result (float32)."""
    from kernels import moe
    g = torch.Generator().manual_seed(T + E)
    D, I = 64, 48
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5, torch.randn(E, D, I, generator=g) / I ** 0.5
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(moe.fused_moe_dense(x, w13, w2, weights, ids), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe, "DENSE_MIN_WEIGHT", 1)          # these experts count as large
    calls = []
    monkeypatch.setattr(moe, "fused_moe_dense", lambda *a: calls.append(1) or ref)
    fused_moe(x, w13, w2, weights, ids)
    assert calls                                             # the dispatcher chose the dense path


@pytest.mark.parametrize("M", [1, 3, 8, 9])
def test_linear_few_rows_equals_f_linear(M):
    """Few rows on the CPU go through the column-split bmm (up to COLUMN_SPLIT_MAX_ROWS), more through
    F.linear; both give F.linear's result, with and without a bias, and an odd row count is not split."""
    from kernels import linear as lin
    g = torch.Generator().manual_seed(M)
    w, x, bias = torch.randn(96, 64, generator=g), torch.randn(M, 64, generator=g), torch.randn(96, generator=g)
    assert lin.splits_columns(x, w) == (M <= lin.COLUMN_SPLIT_MAX_ROWS)
    assert not lin.splits_columns(x, w[:95])
    for b in (None, bias):
        out = lin.linear(x, w, b)
        assert out.shape == (M, 96) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.linear(x, w[:95]), torch.nn.functional.linear(x, w[:95]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (3, 16, 4)])
def test_gathered_equals_reference(T, E, k):
    """The compiled decode step's MoE (chosen experts gathered into the reductions), run eagerly."""
    from kernels.moe import fused_moe_gathered
    g = torch.Generator().manual_seed(7 * T + E)
    D, I = 32, 24
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5, torch.randn(E, D, I, generator=g) / I ** 0.5
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k)
    torch.testing.assert_close(fused_moe_gathered(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None, reason="torch.compile needs a C++ compiler")
def test_fused_moe_under_torch_compile(monkeypatch):
    """Traced by torch.compile on the CPU, fused_moe takes the gathered formulation, whether the step chooses
    fewer experts than there are or all of them, and still equals the reference."""
    from kernels import moe
    taken = []
    for name in ("fused_moe_gathered", "fused_moe_dense"):
        real = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    g = torch.Generator().manual_seed(11)
    E, D, I, k = 8, 32, 16, 2
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5, torch.randn(E, D, I, generator=g) / I ** 0.5
    compiled = torch.compile(lambda *a: fused_moe(*a), dynamic=False)
    for T in (1, 4):                                           # 2 of 8 experts, then 8 choices of 8
        x = torch.randn(T, D, generator=g)
        weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k)
        torch.testing.assert_close(compiled(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids),
                                   rtol=1e-5, atol=1e-5)
    assert taken == ["fused_moe_gathered", "fused_moe_gathered"]


def test_store_experts_narrows_only_exact_values():
    """Experts whose values are all exact in bfloat16 are held in it, others stay float32; the eager MoE
    paths (one token, a batch) widen them and give the float32 result; widening restores the tensors."""
    from model_defs.moe import MoEBlock, RoutingConfig, store_experts
    g = torch.Generator().manual_seed(5)
    E, D, I, k = 4, 32, 16, 2
    block = MoEBlock(D, I, RoutingConfig(num_experts=E, top_k=k))
    with torch.no_grad():
        block.w13.copy_((torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).bfloat16().float())   # exact in bf16
        block.w2.copy_(torch.randn(E, D, I, generator=g) / I ** 0.5)                               # not
    w13, w2 = block.w13.detach().clone(), block.w2.detach().clone()
    assert store_experts(block, torch.bfloat16) == 1
    assert block.w13.dtype == torch.bfloat16 and block.w2.dtype == torch.float32
    assert torch.equal(block.w13.float(), w13)
    for T in (1, 3):
        x = torch.randn(T, D, generator=g)
        weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k)
        torch.testing.assert_close(fused_moe(x, block.w13, block.w2, weights, ids),
                                   fused_moe_ref(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    assert store_experts(block, torch.float32) == 1
    assert block.w13.dtype == torch.float32 and torch.equal(block.w13, w13)


@pytest.mark.parametrize("model_dir", ["tiny-mixtral", "tiny-deepseek"])
def test_store_weights_narrows_the_projections_and_the_eager_step_widens_them(model_dir):
    """store_weights holds the experts and every module's projections (attention, dense and shared MLPs) in
    bfloat16, exactly the checkpoint's values, and leaves the embedding, LM head, router and norms be; the
    eager forward (which widens each narrowed weight for its product) gives the float32 model's logits."""
    from model_defs.layers import SwiGLU
    from moe_engine.llm import LLM
    from tests.conftest import WEIGHTS
    plain = LLM(WEIGHTS / model_dir, num_kv_blocks=4).model
    narrow = LLM(WEIGHTS / model_dir, num_kv_blocks=4).model
    before = {n: p.detach().clone() for n, p in narrow.named_parameters()}
    assert narrow.store_weights(torch.bfloat16) > 0
    params = dict(narrow.named_parameters())
    projections = {id(p) for m in narrow.modules() if hasattr(m, "projections") for p in m.projections()}
    assert any(isinstance(m, SwiGLU) for m in narrow.modules()) == (model_dir == "tiny-deepseek")
    for name, p in params.items():
        expected = torch.bfloat16 if id(p) in projections or name.endswith(("mlp.w13", "mlp.w2")) else torch.float32
        assert p.dtype == expected, name
        assert torch.equal(p.float(), before[name]), name
    ids = torch.tensor([5, 9, 11, 3])
    torch.testing.assert_close(narrow.compute_logits(_forward(narrow, ids)), plain.compute_logits(_forward(plain, ids)),
                               rtol=1e-5, atol=1e-5)
    assert narrow.store_weights(torch.float32) > 0 and all(p.dtype == torch.float32 for p in narrow.parameters())


def _forward(model, ids):
    """Hidden states of a 4-token prompt through a fresh cache."""
    from kernels.attention import AttentionMetadata
    caches = model.allocate_kv_cache(16, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata.build([[0]], [len(ids)], [len(ids)], 16, torch.device("cpu"), 16)
    with torch.inference_mode():
        return model(ids, torch.arange(len(ids)), caches, meta)
