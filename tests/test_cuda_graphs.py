"""Decode steps from static buffers (the CUDA-graph path): the same tokens as the plain step.

On the CPU the static-buffer step runs eagerly (cuda_graphs=True there means exactly that), which checks
the buffers, the bucket padding and the scratch block, or compiled by torch.compile (compile=True); on a
GPU the graphs are really captured."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from moe_engine.runners import bucket_sizes
from moe_engine.errors import MoeEngineError
from moe_engine.llm import LLM, check_compile
from moe_engine.sampling import SamplingParams
from tests.conftest import WEIGHTS

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


def prompts(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in (5, 17, 33, 1, 40)[:n]]


def run(model: str, graphs: bool, device="cpu", dtype=None, **kw):
    kw = {"max_num_seqs": 8, **kw}
    llm = LLM(WEIGHTS / model, device=device, dtype=dtype, cuda_graphs=graphs, block_size=8, **kw)
    # Different lengths: requests finish at different steps, so the batch shrinks through the buckets.
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (12, 20, 7, 16, 9)]
    calls = []
    static = getattr(llm.engine.runner, "static", None)
    if static is not None:
        real_run = static.run
        static.run = lambda *a: calls.append(len(a[0])) or real_run(*a)
    outs = llm.generate(prompt_token_ids=prompts(5, llm.model.args.vocab_size), sampling_params=params)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    return [o.token_ids for o in outs], calls, llm


@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek"])
def test_static_decode_gives_the_same_tokens(model):
    plain, _, _ = run(model, graphs=False)
    static, calls, llm = run(model, graphs=True)
    assert static == plain
    assert 5 in calls and 3 in calls and 1 in calls           # padded buckets (8, 4) and an exact one (1)
    assert llm.engine.runner.static.sizes == [1, 2, 4, 8]


def test_static_decode_of_an_mla_model_told_never_to_absorb():
    """The static step knows contexts only on the device, so MLA serves it absorbed whatever it was told."""
    plain, _, _ = run("tiny-deepseek", graphs=False, absorb="never")
    static, calls, _ = run("tiny-deepseek", graphs=True, absorb="never")
    assert static == plain and calls


def test_static_decode_under_preemption():
    """A cache too small for all five: requests are preempted and recomputed, tokens unchanged."""
    plain, _, _ = run("tiny-mixtral", graphs=False, num_kv_blocks=9)
    static, calls, llm = run("tiny-mixtral", graphs=True, num_kv_blocks=9)
    assert static == plain and calls
    assert llm.engine.scheduler.num_preemptions > 0


def test_routing_hooks_take_the_plain_step():
    """A trace must see every token, so hooked steps never replay a graph."""
    llm = LLM(WEIGHTS / "tiny-mixtral", cuda_graphs=True, block_size=8)
    llm.engine.runner.static.run = lambda *a: pytest.fail("graph step used under a routing hook")
    with llm.trace_routing():
        llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))


needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                               reason="torch.compile on the CPU needs a C++ compiler (see test_compile_refusals)")


@needs_cxx
@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek"])
def test_compiled_decode_gives_the_same_tokens_and_logits(model):
    """compile=True: the static step compiled by torch.compile (a batch of one on its own, batches of 2 to 4
    by one compile with the batch size dynamic and no padding rows, the table width dynamic in both)
    decodes the tokens the plain step does (from the bf16 checkpoint's experts held in bf16, the plain
    engine's in float32), and its logits match the same step run eagerly to float32 precision."""
    from torch._dynamo.utils import counters
    plain, _, _ = run(model, graphs=False, max_num_seqs=4)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled, calls, llm = run(model, graphs=False, compile=True, max_num_seqs=4)
    assert compiled == plain
    assert llm.model.layers[-1].mlp.w13.dtype == torch.bfloat16    # the checkpoint's bf16 experts, held as such
    assert all(p.dtype == torch.bfloat16 for p in llm.model.layers[0].attn.projections())   # and projections
    assert {4, 3, 1} <= set(calls)                              # the batch shrinks from 4 to 1
    g = llm.engine.runner.static
    assert set(g.graphs) == {1, 3, 4}                           # 1 compiled while loading; 3 runs unpadded
    g._fill([5, 9, 11], [40, 3, 17], [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]], 4)   # contexts of 41, 4, 18
    with torch.inference_mode():
        eager = g._step(g.buffer[:4, :2], g.buffer[:4, 2:], g.kv_caches)
    for bs in (4, 2):                                           # 2's first step: no compile
        fast = g._forward(bs)
        assert fast.shape == (bs, llm.model.args.vocab_size)
        assert ((fast - eager[:bs]).abs().max() / eager[:bs].abs().max()).item() <= 1e-4
        assert torch.equal(g._forward(bs), fast)                    # the same call again: the same logits
        with torch.inference_mode():                                # a caller in inference mode: the same
            assert torch.equal(g._forward(bs), fast)
        logits, greedy = g.replay(bs, 40)                # the step's own argmax, for greedy rows
        assert torch.equal(logits, fast) and torch.equal(greedy, fast.argmax(-1))
    assert counters["stats"]["unique_graphs"] - graphs_before == 2   # bucket 1, then one for 2 and 4; no breaks


_BOUNDS_SCRIPT = """
import sys, torch
from moe_engine.llm import LLM
from moe_engine.sampling import SamplingParams
seqs, length = int(sys.argv[1]), int(sys.argv[2])
prompts = [[5 + i, 9, 11 + i, 7, 3, 8, 20, 4, 6] for i in range(4)]
params = SamplingParams(max_tokens=3, ignore_eos=True)
outs = [[o.token_ids for o in LLM(sys.argv[3], compile=c, max_num_seqs=seqs, max_model_len=length).generate(
    prompt_token_ids=prompts, sampling_params=params)] for c in (True, False)]
assert outs[0] == outs[1], outs
"""


@needs_cxx
def test_compiled_engines_with_larger_bounds_after_a_smaller_one(tmp_path):
    """Processes sharing torch's on-disk compile cache (a fresh one): an engine with more sequences or a
    longer max_model_len than an earlier one finds the earlier steps there and must build its own rather
    than fail (as declaring each engine's bounds to torch.compile once made it), decoding what its plain
    engine does."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    for seqs, length in ((8, 128), (32, 1024)):   # more sequences and a longer max_model_len: either fails alone
        done = subprocess.run([sys.executable, "-c", _BOUNDS_SCRIPT, str(seqs), str(length),
                               str(WEIGHTS / "tiny-mixtral")], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]


def test_compile_refusals(monkeypatch):
    """compile=True is for the CPU and needs a C++ compiler: either missing, a one-line error says so."""
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(MoeEngineError, match="needs a C\\+\\+ compiler.*no-such-compiler-here"):
        LLM(WEIGHTS / "tiny-mixtral", device="cpu", compile=True)
    with pytest.raises(MoeEngineError, match="compiles CPU decode steps; on meta"):
        check_compile(torch.device("meta"))


def test_a_failed_compile_is_one_line_at_load(monkeypatch):
    """The batch-of-one step compiles while loading; a compiler failure surfaces there as a one-line error."""
    def failing(*args):
        raise RuntimeError("C++ compile failed:\n/tmp/x.cpp:1: fatal error: Python.h: No such file\n...")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: failing)
    with pytest.raises(MoeEngineError, match=r"could not build the CPU decode step for 1 sequences "
                                             r"\(RuntimeError: C\+\+ compile failed:\); check the C\+\+") as err:
        LLM(WEIGHTS / "tiny-mixtral", device="cpu", compile=True)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek"])
def test_cuda_graphs_give_the_same_tokens_on_gpu(model, dtype):
    eager, _, _ = run(model, graphs=False, device="cuda", dtype=dtype)
    graphed, calls, llm = run(model, graphs=True, device="cuda", dtype=dtype)
    assert graphed == eager and calls
    assert all(isinstance(g, torch.cuda.CUDAGraph) for g, _ in llm.engine.runner.static.graphs.values())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("model", ["tiny-mixtral", "tiny-deepseek"])
def test_gpu_float32_matches_cpu(model):
    """The CUDA path (Triton kernels, graphs) against the CPU path, which is checked against transformers."""
    cpu, _, _ = run(model, graphs=False)
    graphed, _, _ = run(model, graphs=True, device="cuda", dtype=torch.float32)
    assert graphed == cpu
