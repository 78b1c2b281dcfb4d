"""Speculative method "mtp" (DeepSeek-V3's multi-token-prediction layer) on a tiny random V3 checkpoint with
MTP tensors in the published layout: the main model still matches transformers; our MTP layer's logits
and chained drafts match an independent reference (transformers' decoder layer inside plain torch over
the state dict); greedy output is the plain output alone, in a mixed batch and under preemption, with
the MTP's state exact after accepted drafts; bad inputs are one line. The module is untrained, so its
acceptance here means nothing."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from conftest import WEIGHTS
from hf_models import assert_matches_transformers, max_rel_error, save_random
from kernels.attention import AttentionMetadata
from moe_engine import LLM, MoeEngineError, SamplingParams
from moe_engine.block_manager import blocks_for
from moe_engine.speculative.config import parse_speculative
from test_speculative import GREEDY, assert_no_leak, run_mixed

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}
CFG = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, max_position_embeddings=256,
           rope_theta=10000.0, initializer_range=0.25, q_lora_rank=24, first_k_dense_replace=1,
           n_shared_experts=1, n_group=4, topk_group=2, rope_scaling=YARN)
N = CFG["num_hidden_layers"]
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight")


def mtp(k: int, adaptive: bool = False) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, "adaptive": adaptive}


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, CFG["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(plain checkpoint, the same with MTP tensors): layer N of a random (N + 1)-layer model of the same
    config as the MTP's decoder layer, random enorm / hnorm / eh_proj / shared_head, the embedding copied
    as the published checkpoints hold it; config.json num_nextn_predict_layers = 1."""
    root = tmp_path_factory.mktemp("mtp")
    V3 = transformers.DeepseekV3ForCausalLM
    plain = save_random(V3, transformers.DeepseekV3Config(**CFG), root / "plain")
    longer = save_random(V3, transformers.DeepseekV3Config(**{**CFG, "num_hidden_layers": N + 1}), root / "longer",
                         seed=1)
    with_mtp = root / "with-mtp"
    shutil.copytree(plain, with_mtp)
    tensors = load_file(with_mtp / "model.safetensors")
    prefix = f"model.layers.{N}."
    tensors.update({k: v for k, v in load_file(longer / "model.safetensors").items() if k.startswith(prefix)})
    g = torch.Generator().manual_seed(4)
    D, V = CFG["hidden_size"], CFG["vocab_size"]
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{prefix}{name}.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
    tensors[f"{prefix}eh_proj.weight"] = 0.15 * torch.randn(D, 2 * D, generator=g)
    tensors[f"{prefix}shared_head.head.weight"] = 0.25 * torch.randn(V, D, generator=g)
    tensors[f"{prefix}embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, with_mtp / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((with_mtp / "config.json").read_text())
    (with_mtp / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    return plain, with_mtp


class Reference:
    """The MTP layer from the published layout, independently of our code: the target's hidden states and
    the MTP's decoder layer from transformers (its DeepseekV3DecoderLayer loaded with layer N's tensors),
    enorm / hnorm / eh_proj / shared_head in plain torch. Position p: eh_proj([enorm(E t_{p+1}); hnorm(h_p)])
    with h_p after the main model's final norm; a chained step takes the layer's output before
    shared_head.norm as its h."""

    def __init__(self, path):
        sd = load_file(path / "model.safetensors")
        self.main = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                      experts_implementation="eager").eval()
        prefix = f"model.layers.{N}."
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        self.w = {k: own.pop(k) for k in MTP_OWN}
        own.pop("embed_tokens.weight")
        E = CFG["n_routed_experts"]          # the hub's per-expert tensors -> transformers' fused ones
        expert = [{n: own.pop(f"mlp.experts.{e}.{n}_proj.weight") for n in ("gate", "up", "down")} for e in range(E)]
        own["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in expert])
        own["mlp.experts.down_proj"] = torch.stack([x["down"] for x in expert])
        self.layer = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(self.main.config, N)
        self.layer.load_state_dict(own, strict=True)
        self.layer.eval()
        self.embed, self.eps = sd["model.embed_tokens.weight"], CFG.get("rms_norm_eps", 1e-6)

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def inputs(self, tokens: list[int], prev: torch.Tensor) -> torch.Tensor:
        e = self.rms(self.embed[torch.tensor(tokens)], self.w["enorm.weight"])
        return F.linear(torch.cat([e, self.rms(prev, self.w["hnorm.weight"])], -1), self.w["eh_proj.weight"])

    def layer_out(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[0]
        pos = torch.arange(L)[None]
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        return self.layer(x[None], attention_mask=mask, position_ids=pos,
                          position_embeddings=self.main.model.rotary_emb(x[None], pos))[0]

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        return F.linear(self.rms(y, self.w["shared_head.norm.weight"]), self.w["shared_head.head.weight"])

    @torch.no_grad()
    def run(self, ids: list[int], chain: int = 1) -> tuple[torch.Tensor, list[int]]:
        """(logits [len(ids) - 1, V] at positions 0.., the greedy drafts after ids: the last row's, then
        chain - 1 chained ones)."""
        h = self.main.model(torch.tensor([ids])).last_hidden_state[0]                 # [T, D], final norm
        x = self.inputs(ids[1:], h[:-1])
        y = self.layer_out(x)
        logits = self.logits(y)
        drafts = [int(logits[-1].argmax())]
        for _ in range(chain - 1):
            x = torch.cat([x, self.inputs(drafts[-1:], y[-1:])])
            y = self.layer_out(x)
            drafts.append(int(self.logits(y[-1:]).argmax()))
        return logits, drafts


@pytest.fixture(scope="module")
def ref(ckpt):
    return Reference(ckpt[1])


@pytest.fixture(scope="module")
def plain_outputs(ckpt):
    llm = LLM(ckpt[0])
    prompts = [prompt(n, s) for s, n in enumerate([3, 17, 40, 32, 9, 25])]
    return prompts, [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]


def test_main_model_unchanged_and_mtp_weights_ignored_unless_asked(ckpt):
    """(a) The checkpoint with MTP tensors loads as before (they are ignored) and still matches transformers;
    asked for, the MTP layer is built and loaded too."""
    ids = prompt(40, 9)
    plain = LLM(ckpt[1])
    assert plain.model.mtp is None
    assert_matches_transformers(plain, ckpt[1], ids, greedy_tokens=12)
    spec = LLM(ckpt[1], speculative_config=mtp(1))
    assert max_rel_error(spec.prompt_logits(ids), plain.prompt_logits(ids)) == 0.0
    assert spec.model.mtp is not None and spec.model.mtp.head is not spec.model.lm_head


@pytest.mark.parametrize("absorb", ["never", "always"])
def test_mtp_logits_match_the_reference(ckpt, ref, absorb):
    """(b) Our MTP layer over every position of a prompt, against the reference, in float32."""
    llm = LLM(ckpt[1], speculative_config=mtp(1), absorb=absorb)
    model, ids = llm.model, prompt(40, 9)
    T, B = len(ids), llm.block_size
    blocks = list(range(blocks_for(T, B)))
    with torch.inference_mode():
        x, pos = torch.tensor(ids), torch.arange(T)
        caches = model.allocate_kv_cache(len(blocks) * B, torch.float32, "cpu")
        hidden = model(x, pos, caches, AttentionMetadata.build([blocks], [T], [T], B, "cpu"))
        cache = torch.zeros_like(caches[0])
        out = model.mtp(F.embedding(x[1:], model.embed), hidden[:-1], pos[:-1], cache,
                        AttentionMetadata.build([blocks], [T - 1], [T - 1], B, "cpu"))
        ours = model.mtp.compute_logits(out)
    expected, _ = ref.run(ids)
    assert max_rel_error(ours, expected) <= 1e-4


@pytest.mark.parametrize("n", [32, 21])
def test_chained_drafts_match_the_reference(ckpt, ref, n):
    """(b) After a prefill (32 tokens: the chained positions fall past the sequence's blocks, into scratch
    blocks), the proposer's k = 3 drafts are the reference's chained greedy drafts."""
    llm = LLM(ckpt[1], speculative_config=mtp(3))
    seq = llm._new_sequence(prompt(n, 11), SamplingParams(max_tokens=4, ignore_eos=True))
    llm.engine.step()
    assert llm.engine.spec.proposer.propose([(seq, 3)]) == [ref.run(seq.all_ids, chain=3)[1]]
    llm._run_until_done([seq])
    assert_no_leak(llm)


class OracleDrafts:
    """The MTP proposer with its drafts replaced by the target's own next tokens but the last (the MTP's),
    so verify steps accept k - 1 and reject one; after every step the MTP's first draft for each request,
    computed from its cache, is checked against the reference over the tokens so far."""

    def __init__(self, proposer, oracle: dict, ref: Reference):
        self.proposer, self.oracle, self.ref, self.checked = proposer, oracle, ref, 0

    def propose(self, wanted):
        theirs = self.proposer.propose(wanted)
        out = []
        for (seq, k), d in zip(wanted, theirs):
            right = self.oracle[seq.request_id][len(seq.output_ids):len(seq.output_ids) + k - 1]
            out.append(right + d[len(right):len(right) + 1] if d else [])
        return out

    def observe(self, engine, batch):
        self.proposer.observe(engine, batch)
        for seq in batch.seqs:
            got = self.proposer.first.get(seq.request_id)
            if got is not None and got[0] == seq.num_cached - 1:
                logits, drafts = self.ref.run(seq.all_ids[:seq.num_cached + 1])
                ours = self.proposer.mtp.compute_logits(got[1][None])[0]
                assert max_rel_error(ours, logits[-1]) <= 1e-4 and got[2] == drafts[0]
                self.checked += 1


def test_mtp_cache_exact_after_accepted_drafts(ckpt, ref, plain_outputs):
    prompts, reference = plain_outputs
    llm = LLM(ckpt[1], speculative_config=mtp(3))
    seqs = [llm._new_sequence(p, GREEDY) for p in prompts[2:4]]
    llm.engine.spec.proposer = OracleDrafts(llm.engine.spec.proposer,
                                            {s.request_id: r for s, r in zip(seqs, reference[2:4])}, ref)
    llm._run_until_done(seqs)
    assert [s.output_ids for s in seqs] == reference[2:4]
    assert sum(s.num_accepted_tokens for s in seqs) >= sum(s.num_draft_tokens for s in seqs) // 2 > 0
    assert llm.engine.spec.proposer.checked > 10
    assert_no_leak(llm)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_alone_mixed_and_preempted(ckpt, plain_outputs, k):
    """(c) The plain greedy tokens: one request alone, a mixed batch (odd ones speculate, half join late),
    and with a cache too small for all at once; every block free afterwards."""
    prompts, reference = plain_outputs
    alone = LLM(ckpt[1], speculative_config=mtp(k))
    out = alone.generate(prompt_token_ids=[prompts[2]], sampling_params=GREEDY)[0]
    assert out.token_ids == reference[2] and out.num_draft_tokens > 0
    assert_no_leak(alone)

    llm = LLM.from_model(alone.model, alone.tokenizer, speculative_config=mtp(k), max_num_batched_tokens=24)
    which = [i % 2 == 1 for i in range(len(prompts))]
    seqs, mixed_prefill = run_mixed(llm, prompts, which)
    assert [s.output_ids for s in seqs] == reference and mixed_prefill
    assert all(s.num_draft_tokens == 0 for s, w in zip(seqs, which) if not w)
    assert sum(s.num_draft_tokens for s in seqs) > 0
    assert_no_leak(llm)

    longest = max(len(p) for p in prompts) + GREEDY.max_tokens
    small = LLM.from_model(alone.model, alone.tokenizer, speculative_config=mtp(k), block_size=16,
                           num_kv_blocks=longest // 16 + 3)
    outs = small.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert small.engine.scheduler.num_preemptions > 0 and sum(o.num_draft_tokens for o in outs) > 0
    assert_no_leak(small)


def test_mtp_bad_inputs(ckpt, tmp_path):
    """(d) One line each: a checkpoint without MTP layers (config.json says none; it says one, as
    transformers writes by default, but holds none); an MTP tensor missing; a model built without it."""
    with pytest.raises(MoeEngineError, match="num_nextn_predict_layers >= 1") as e:
        LLM(WEIGHTS / "tiny-deepseek", speculative_config=mtp(3))
    with pytest.raises(MoeEngineError, match=f"holds no model.layers.{N}.. tensors") as e:
        LLM(ckpt[0], speculative_config=mtp(3))
    assert "\n" not in str(e.value)
    with pytest.raises(MoeEngineError, match="num_nextn_predict_layers >= 1"):
        LLM(WEIGHTS / "tiny-mixtral", speculative_config=mtp(1))
    broken = tmp_path / "broken"
    shutil.copytree(ckpt[1], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors[f"model.layers.{N}.eh_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeEngineError, match=f"missing 1: model.layers.{N}.eh_proj.weight") as e:
        LLM(broken, speculative_config=mtp(3))
    assert "\n" not in str(e.value)
    LLM(broken)                                  # without method mtp its MTP tensors are ignored, as before
    plain = LLM(ckpt[0])
    with pytest.raises(MoeEngineError, match="multi-token-prediction layer"):
        LLM.from_model(plain.model, speculative_config=mtp(1))
    assert parse_speculative("mtp:2") == {"method": "mtp", "num_speculative_tokens": 2}


def test_seeded_sampling_with_mtp_reproduces(ckpt):
    """Sampled requests verify the MTP's greedy drafts as one-hot drafts, with the request's seed."""
    llm = LLM(ckpt[1], speculative_config=mtp(3))
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
    a, b = (llm.generate(prompt_token_ids=[prompt(12, 3)], sampling_params=params)[0] for _ in range(2))
    assert a.token_ids == b.token_ids and a.num_draft_tokens > 0
    assert_no_leak(llm)
