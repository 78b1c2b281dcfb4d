"""The routing toolkit on every family added this wave: a trace records each MoE layer with the router logits
transformers computes (output_router_logits, an independent oracle), and overrides reach the family's routing
(its own top-k changes nothing, top-1 changes the logits, replaying a trace reproduces them exactly)."""

import pytest
import torch
import transformers

from moe_engine import LLM
from test_families import prompt, tiny
from test_gpt_oss import random_gpt_oss

NAMES = ["qwen2-step2-bias", "olmoe-clip", "glm-half-bias-qknorm", "gpt-oss"]


def folder(tmp_path, name):
    if name == "gpt-oss":
        random_gpt_oss("window8-yarn").save_pretrained(tmp_path / name)
        return tmp_path / name
    return tiny(tmp_path, name)


def hf_router_logits(path, ids) -> list[torch.Tensor]:
    """transformers' router logits [T, E] per MoE layer, in layer order."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    return [r.reshape(len(ids), -1).float() for r in out.router_logits if r is not None]


@pytest.mark.parametrize("name", NAMES)
def test_trace_and_overrides_on_the_family(tmp_path, name):
    path = folder(tmp_path, name)
    llm = LLM(path, device="cpu", dtype=torch.float32)
    ids = prompt(24) if name != "gpt-oss" else [int(t) % 100 + 3 for t in prompt(24)]
    with llm.trace_routing(scores=True) as trace:
        base = llm.prompt_logits(ids)
    moe_layers = len(llm.model.moe_blocks)
    assert trace.num_layers == moe_layers and len(trace) == len(ids)
    k = trace.top_k
    assert trace.topk_ids.shape == (moe_layers, len(ids), k)
    assert ((trace.topk_ids >= 0) & (trace.topk_ids < trace.num_experts)).all()
    if name.startswith(("qwen2", "olmoe", "gpt-oss")):          # softmax routers: the chosen are the top-k logits
        hf = hf_router_logits(path, ids)
        assert len(hf) == moe_layers
        for layer, ref in enumerate(hf):
            ours = torch.as_tensor(trace.scores[layer])
            assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), layer
            chosen = torch.as_tensor(trace.topk_ids[layer]).sort(-1).values
            assert torch.equal(chosen, ref.topk(k, -1).indices.sort(-1).values), layer
    with llm.override_routing(top_k=k):
        assert torch.equal(llm.prompt_logits(ids), base)
    with llm.override_routing(top_k=1):
        assert not torch.allclose(llm.prompt_logits(ids), base, atol=1e-3)
    with llm.override_routing(replay=trace):
        assert torch.allclose(llm.prompt_logits(ids), base, rtol=1e-5, atol=1e-5)

