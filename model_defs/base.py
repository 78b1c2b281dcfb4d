"""The decoder stack shared by every family, and the small protocol the runtime talks to."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import AttentionMetadata
from kernels.linear import linear
from model_defs.checkpoint_names import NameTable, Target, expand
from model_defs.layers import RMSNorm, weight
from model_defs.moe import MoEBlock, store_experts, store_lossless

class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h)). Each residual add is left to the
    norm after it (fused with it on CUDA): a layer takes the previous MLP's output and the residual stream
    before it, and hands on its own pair."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, dim: int, eps: float, dtype):
        super().__init__()
        self.input_norm = RMSNorm(dim, eps, dtype)
        self.attn = attn
        self.post_attn_norm = RMSNorm(dim, eps, dtype)
        self.mlp = mlp

    def forward(self, x, residual, angles, kv_cache, meta, routing_hook=None):
        """x [T, D] (the first layer: the embeddings, residual None) -> (mlp output, residual) [T, D] each."""
        normed, residual = self.input_norm.add_and_norm(x, residual)
        h, residual = self.post_attn_norm.add_and_norm(self.attn(normed, angles, kv_cache, meta), residual)
        return (self.mlp(h, routing_hook) if isinstance(self.mlp, MoEBlock) else self.mlp(h)), residual


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head. Families supply layers and their weight names.

    Runtime protocol: forward(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, D];
    compute_logits(hidden [N, D]) -> float32 [N, V]; allocate_kv_cache(num_slots, dtype, device);
    kv_cache_bytes_per_token(dtype); checkpoint_targets() -> {hf name: Target}; post_load().
    Families set name_table (model_defs.checkpoint_names.NameTable).
    """

    name_table: NameTable
    # The KV-cache scales the checkpoint carries, set by the runtime's loader (opaque here; None: none). The
    # runtime picks which apply and hands them to allocate_kv_cache.
    checkpoint_kv_scales = None

    def __init__(self, args, layers: list[DecoderLayer], rotary: nn.Module, dtype):
        super().__init__()
        self.args = args
        self.embed = weight(args.vocab_size, args.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        # Tied checkpoints read the embedding as the LM head: one tensor, no copy.
        self.lm_head = self.embed if args.tie_word_embeddings else weight(args.vocab_size, args.hidden_size,
                                                                          dtype=dtype)
        self.rotary = rotary
        for i, block in enumerate(self.moe_blocks):
            block.moe_index = i

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, routing_hook=None) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)                 # [T, D]
        angles = self.rotary.angles(positions, x.dtype)         # RotaryAngles
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, angles, cache, meta, routing_hook)
        return self.norm.add_and_norm(x, residual)[0]

    def cache_parts(self, kv_caches: list[torch.Tensor]) -> list:
        """The caches as the layers may be handed them, split outside any compiled step: a compiled step
        that indexed a stacked cache itself would write the whole stack back each step instead of the new
        slots in place. Families with stacked caches split them."""
        return kv_caches

    def store_weights(self, dtype: torch.dtype) -> int:
        """Hold the routed experts (model_defs.moe.store_experts) and the projections every module lists in
        projections() (the attention's, the dense and shared SwiGLU MLPs': weights used only through
        kernels.linear.linear) in dtype where lossless; how many changed. The embedding, LM head, router
        and norms keep theirs."""
        projections = [p for m in self.modules() if hasattr(m, "projections") for p in m.projections()]
        return store_experts(self, dtype) + store_lossless(projections, dtype)

    def quantizable_weights(self) -> dict[str, str]:
        """{parameter name: kind} of the weights that may be held quantized (moe_engine.quantize): "experts"
        (routed), "shared" (shared experts), "attention" (the projections attention modules list in
        projections()), "dense" (dense layers' MLPs) and "head" (the LM head, unless it is the embedding's
        tensor). Never the embedding, router or norms."""
        out = {}
        for i, layer in enumerate(self.layers):
            mlp = layer.mlp
            if isinstance(mlp, MoEBlock):
                out.update({f"layers.{i}.mlp.{n}": "experts" for n in ("w13", "w2")})
                if mlp.shared is not None:
                    out.update({f"layers.{i}.mlp.shared.{n}": "shared" for n in ("w13", "w2")})
            else:
                out.update({f"layers.{i}.mlp.{n}": "dense" for n in ("w13", "w2")})
            listed = {id(p) for p in layer.attn.projections()}
            held = [*layer.attn.named_parameters(), *layer.attn.named_children()]   # children: held quantized
            out.update({f"layers.{i}.attn.{n}": "attention" for n, p in held if id(p) in listed})
        if not self.args.tie_word_embeddings:
            out["lm_head"] = "head"
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.lm_head)                   # [N, V]
        return logits if logits.dtype == torch.float32 else logits.float()

    def checkpoint_targets(self, names=None) -> dict[str, Target]:
        """{hf name: Target} from the family's name table; names (the checkpoint's tensor names) pick each
        MoE layer's expert layout (model_defs.checkpoint_names.expand)."""
        return expand(self, self.name_table, names)

    def arrange_checkpoint_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Checkpoint tensor `name` in the layout of its Target (families whose checkpoints store a tensor
        transposed or with rows permuted override this; a view where it can be). Applied to meta tensors
        too, to check shapes before loading."""
        return t

    def ignored_checkpoint_name(self, name: str) -> bool:
        """Tensors a checkpoint may carry that inference does not use (e.g. multi-token-prediction layers)."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        if name == "lm_head.weight" and self.args.tie_word_embeddings:
            return True       # some tied checkpoints store the head anyway; the embedding is used
        parts = name.split(".")
        return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= len(self.layers))

    def post_load(self) -> None:
        """Derived weights, computed once after loading (families override)."""

