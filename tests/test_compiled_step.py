"""CompiledStep: a compiled function whose later calls with a known key skip torch.compile's guards, on a
tiny step of the decode step's form (per-call inputs, a parameter, a cache written in place)."""

import os
import shutil

import pytest
import torch

from moe_engine.compiled_step import CompiledStep

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler")


class Step(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8), requires_grad=False)
        self.traced = 0

    def forward(self, head: torch.Tensor, cache: torch.Tensor):
        """head [B, 2] int32 (row of the cache to write, a token id) -> ([B, 16] logits, [B] argmax)."""
        x = self.w.float()[head[:, 1].long() % 16][:, :8]                  # [B, 8]
        cache.index_copy_(0, head[:, 0].long(), x)
        logits = x @ self.w.float().t()                                    # [B, 16]
        return logits, logits.argmax(-1)

    def expected(self, head: torch.Tensor) -> torch.Tensor:
        x = self.w.float()[head[:, 1].long() % 16][:, :8]
        return x @ self.w.float().t()


def call(step: CompiledStep, module: Step, head: torch.Tensor, cache: torch.Tensor):
    def mark():
        module.traced += 1
        torch._dynamo.maybe_mark_dynamic(head, 0)
    with torch.no_grad():
        return step(tuple(head.shape), head, cache, before_trace=mark)


def test_known_keys_are_called_directly_and_compute_the_same():
    module = Step()
    step = CompiledStep(module.forward, per_call=("head",), options={})
    cache = torch.zeros(8, 8)
    first = torch.tensor([[0, 3], [1, 5], [2, 7]], dtype=torch.int32)
    logits, ids = call(step, module, first, cache)
    assert module.traced == 1 and (3, 2) in step.direct
    torch.testing.assert_close(logits, module.expected(first))

    step.compiled = lambda *a: pytest.fail("a known key went through torch.compile")
    second = torch.tensor([[4, 11], [5, 2], [6, 9]], dtype=torch.int32)   # same sizes, new values
    logits, ids = call(step, module, second, cache)
    assert module.traced == 1
    torch.testing.assert_close(logits, module.expected(second))
    assert torch.equal(ids, module.expected(second).argmax(-1))
    torch.testing.assert_close(cache[4:7], module.w.float()[[11, 2, 9]][:, :8])   # written in place


def test_a_new_size_or_restored_parameter_goes_back_through_torch():
    module = Step()
    step = CompiledStep(module.forward, per_call=("head",), options={})
    cache = torch.zeros(8, 8)
    call(step, module, torch.tensor([[0, 3], [1, 5]], dtype=torch.int32), cache)
    four = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]], dtype=torch.int32)
    logits, _ = call(step, module, four, cache)                         # a new key: traced
    assert module.traced == 2 and (4, 2) in step.direct
    torch.testing.assert_close(logits, module.expected(four))

    module.w.data = module.w.data.to(torch.bfloat16)                     # other storage, another dtype
    logits, _ = call(step, module, four, cache)
    assert module.traced == 3                                            # dropped and traced again
    torch.testing.assert_close(logits, module.expected(four))
    logits, _ = call(step, module, four, cache)
    assert module.traced == 3                                            # and direct again after that
    torch.testing.assert_close(logits, module.expected(four))
