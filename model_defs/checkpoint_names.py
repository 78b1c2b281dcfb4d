"""Checkpoint names as data: each family's table of Hugging Face names, expanded here into the loader's map.

A family declares a NameTable: Rules from a Hugging Face name pattern to our parameter name, with `{i}`
for the layer and `{e}` for the routed expert; `rows` stacks several checkpoint tensors into one of our
weights (q/k/v into wqkv, gate/up rows into w13); `when` keeps a rule to the layers or configs it belongs
to. The routed experts come in alternative Layouts (per-expert hub names, or transformers' fused
`gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I]); each MoE layer of a checkpoint uses exactly one.
`expand(model, table, names)` gives {hf name: Target}, the map moe_engine.loader checks and streams.

What a new family needs (see mixtral.py, the smallest):
  1. An Args frozen dataclass with the config.json field names (model_defs.hf_config.args_from_hf_config),
     plus properties for any row sizes its Rows name (e.g. `q_rows`, `kv_rows`).
  2. Its modules where they differ from the shared ones (base.DecoderLayer, layers.SwiGLU, moe.MoEBlock,
     mixtral.GQAttention): parameters named and shaped as in our stacked layout.
  3. A model class (a base.CausalLM) building the layers and its KV-cache layout, with
     `name_table = <its table>`; a line in model_defs/__init__.py REGISTRY per config.json model_type.
  4. A NameTable: COMMON_RULES + its attention and MLP Rules + its expert Layouts (swiglu_rules and
     fused_experts write the usual ones). Nothing else: the loader and its checks read only the table.
"""

from dataclasses import dataclass

import torch.nn as nn

from model_defs.errors import MoeEngineError
from model_defs.moe import MoEBlock

# A checkpoint tensor's destination: our parameter name and an index into it (None: the whole).
Target = tuple[str, tuple | None]


@dataclass(frozen=True)
class Rows:
    """Part `part` of a weight stacked along its rows (after the expert index, if any). `of`: either a
    number of equal parts (gate=0, up=1 of 2 in w13) or the names of Args attributes giving each part's
    row count in order (q, k, v in wqkv)."""
    part: int
    of: int | tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """hf pattern -> our parameter. `when`: conditions that must all hold, each a layer kind ("moe",
    "dense", "shared" (shared experts), "router_bias") or an Args field that must be truthy; "!" negates."""
    hf: str
    ours: str
    rows: Rows | None = None
    when: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layout:
    """One way a checkpoint may name an MoE layer's routed experts (and, where it moves with them, the router)."""
    name: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class NameTable:
    rules: tuple[Rule, ...]        # model-wide (no {i}) and per-layer ({i}) names
    layouts: tuple[Layout, ...]    # routed experts of MoE layers; the first is the default


# Every family's embedding, final norm, LM head and the two norms of each decoder layer.
COMMON_RULES = (
    Rule("model.embed_tokens.weight", "embed"),
    Rule("model.norm.weight", "norm.weight"),
    Rule("lm_head.weight", "lm_head", when=("!tie_word_embeddings",)),
    Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight"),
)


def swiglu_rules(hf: str, ours: str, names=("gate_proj", "up_proj", "down_proj"), when=()) -> tuple[Rule, ...]:
    """The three projections of a SwiGLU MLP (hf and ours prefixes may hold {i} / {e}) into w13 and w2."""
    gate, up, down = names
    return (Rule(f"{hf}.{gate}.weight", f"{ours}.w13", Rows(0, 2), when),
            Rule(f"{hf}.{up}.weight", f"{ours}.w13", Rows(1, 2), when),
            Rule(f"{hf}.{down}.weight", f"{ours}.w2", None, when))


def gqa_rules(hf: str, ours: str, qkv_bias: tuple[str, ...] | None = None, o_bias: tuple[str, ...] | None = None,
              qk_norm: bool = False) -> tuple[Rule, ...]:
    """Grouped-query attention (mixtral.GQAttention): q/k/v projections stacked into wqkv by the Args' q_rows
    and kv_rows, o_proj into wo; their biases (wqkv_bias, wo_bias) under the `when` conditions given (None:
    no bias); q_norm / k_norm weights when qk_norm."""
    qkv = ("q_rows", "kv_rows", "kv_rows")
    rules = tuple(Rule(f"{hf}.{n}_proj.weight", f"{ours}.wqkv", Rows(k, qkv)) for k, n in enumerate("qkv"))
    rules += (Rule(f"{hf}.o_proj.weight", f"{ours}.wo"),)
    if qkv_bias is not None:
        rules += tuple(Rule(f"{hf}.{n}_proj.bias", f"{ours}.wqkv_bias", Rows(k, qkv), qkv_bias)
                       for k, n in enumerate("qkv"))
    if o_bias is not None:
        rules += (Rule(f"{hf}.o_proj.bias", f"{ours}.wo_bias", when=o_bias),)
    if qk_norm:
        rules += (Rule(f"{hf}.q_norm.weight", f"{ours}.q_norm.weight"), Rule(f"{hf}.k_norm.weight", f"{ours}.k_norm.weight"))
    return rules


def fused_experts(hf: str, ours: str) -> tuple[Rule, ...]:
    """transformers 5's in-memory expert tensors: gate_up_proj [E, 2I, D] (gate rows first) and down_proj."""
    return (Rule(f"{hf}.experts.gate_up_proj", f"{ours}.w13"), Rule(f"{hf}.experts.down_proj", f"{ours}.w2"))


def _held(model: nn.Module, name: str):
    """The parameter at a dotted name, or the quantized weight (a module with a shape) that replaced it."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _layer_kinds(layer: nn.Module) -> set[str]:
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, MoEBlock):
        return {"dense"}
    return {"moe"} | ({"shared"} if mlp.shared is not None else set()) | (
        {"router_bias"} if mlp.bias is not None else set())


def _holds(rule: Rule, args, kinds: set[str]) -> bool:
    for cond in rule.when:
        name, want = (cond[1:], False) if cond.startswith("!") else (cond, True)
        have = name in kinds if name in ("moe", "dense", "shared", "router_bias") else bool(getattr(args, name))
        if have != want:
            return False
    return True


def _index(model: nn.Module, rule: Rule, ours: str, expert: int | None) -> tuple | None:
    """The Target index of one expanded rule: (expert?, row slice?) or None for the whole parameter."""
    index = () if expert is None else (expert,)
    if rule.rows is not None:
        of = rule.rows.of
        if isinstance(of, int):
            n = _held(model, ours).shape[len(index)] // of
            sizes = [n] * of
        else:
            sizes = [getattr(model.args, a) for a in of]
        start = sum(sizes[: rule.rows.part])
        index += (slice(start, start + sizes[rule.rows.part]),)
    return index or None


def _expand_rules(model: nn.Module, rules, i: int | None, kinds: set[str]) -> dict[str, Target]:
    out = {}
    for rule in rules:
        if ("{i}" in rule.hf) != (i is not None) or not _holds(rule, model.args, kinds):
            continue
        hf, ours = rule.hf.replace("{i}", str(i)), rule.ours.replace("{i}", str(i))
        if "{e}" in rule.hf:
            for e in range(_held(model, ours).shape[0]):
                out[hf.replace("{e}", str(e))] = (ours, _index(model, rule, ours, e))
        else:
            out[hf] = (ours, _index(model, rule, ours, None))
    return out


def _pick_layout(i: int, expanded: dict[str, dict[str, Target]], names) -> str:
    """The layout layer i's checkpoint names use (the first when it names none); mixing is an error."""
    present = {lay: sorted(n for n in targets if n in names) for lay, targets in expanded.items()}
    used = [lay for lay, found in present.items() if found]
    if len(used) > 1:
        listed = "; ".join(f"{lay}: {', '.join(present[lay][:4])}{' ...' if len(present[lay]) > 4 else ''}"
                           for lay in used)
        raise MoeEngineError(f"layer {i} names its experts in more than one layout ({listed}); a checkpoint "
                             "must use one layout per layer: re-save it from one source")
    return used[0] if used else next(iter(expanded))


def expand(model: nn.Module, table: NameTable, names=None) -> dict[str, Target]:
    """{hf name: Target} for this model. names: the checkpoint's tensor names, which pick each MoE
    layer's expert layout (None: the first layout everywhere)."""
    names = None if names is None else set(names)
    out = _expand_rules(model, table.rules, None, set())
    for i, layer in enumerate(model.layers):
        kinds = _layer_kinds(layer)
        out.update(_expand_rules(model, table.rules, i, kinds))
        if "moe" in kinds and table.layouts:
            expanded = {lay.name: _expand_rules(model, lay.rules, i, kinds) for lay in table.layouts}
            chosen = table.layouts[0].name if names is None else _pick_layout(i, expanded, names)
            out.update(expanded[chosen])
    return out


def expand_extra_layer(model: nn.Module, table: NameTable, i: int, layer: nn.Module, ours: str,
                       names=None) -> dict[str, Target]:
    """{hf name: Target} for a decoder layer kept outside model.layers under the dotted name `ours` whose
    checkpoint tensors are those of layer i (DeepSeek's multi-token-prediction layer, i = num_hidden_layers):
    the table's per-layer rules and its expert layouts, as expand gives them for model.layers[i]."""
    proxy = nn.Module()                      # layers.{i} -> layer, so the rules expand as for a layer i
    proxy.args, proxy.layers = model.args, nn.ModuleDict({str(i): layer})
    kinds = _layer_kinds(layer)
    out = _expand_rules(proxy, table.rules, i, kinds)
    if "moe" in kinds and table.layouts:
        expanded = {lay.name: _expand_rules(proxy, lay.rules, i, kinds) for lay in table.layouts}
        chosen = table.layouts[0].name if names is None else _pick_layout(i, expanded, set(names))
        out.update(expanded[chosen])
    prefix = f"layers.{i}."
    return {hf: (ours + "." + name[len(prefix):], index) for hf, (name, index) in out.items()}
