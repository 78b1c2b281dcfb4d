"""Engine settings in one dataclass: what LLM(...), LLM.from_model and the command line share."""

import dataclasses
from dataclasses import dataclass

from kernels.kv_quant import KV_CACHE_DTYPES
from moe_engine.errors import MoeEngineError
from moe_engine.quantize import QuantSpec
from moe_engine.speculative.config import SpeculativeConfig


@dataclass(frozen=True)
class EngineConfig:
    """How an LLM runs its requests (not what model it runs).

    num_kv_blocks: cache blocks; None sizes them from kv_cache_bytes (default 1 GiB on CPU/MPS) or, on a GPU,
      gpu_memory_utilization of the memory left free once the weights are in.
    max_num_seqs / max_num_batched_tokens: requests and tokens in one step (longer prompts prefill in chunks).
    max_model_len: the longest prompt + output (default and upper bound: the model's own).
    cuda_graphs: replay decode steps from CUDA graphs (None: on CUDA where Triton is installed; True off
      CUDA runs the same static-buffer step eagerly, which is how the CPU tests check it).
    compile: on the CPU, decode steps through torch.compile (moe_engine.runners.compiled); a float32 model's
      routed experts and projections are then held in bfloat16 where every value is exact in it.
    quantization: hold weights quantized, quantized as they load (moe_engine.quantize.QuantSpec): "int8"
      (per output channel), "int4" (groups of quant_group_size along the input, symmetric unless
      quant_symmetric=False), "fp8" (e4m3 per channel) or "fp8-block" (128x128). Routed and shared experts;
      attention projections with quantize_attention, dense layers' MLPs with quantize_dense_mlp, the LM head
      with quantize_lm_head.
      quant_clip_search=False rounds to nearest instead of searching each group's range.
    kv_cache_dtype: "auto" (the model dtype), "fp8" (e4m3) or "int8": keys and values (MLA: the latent) held
      compressed with float32 scales computed as each token is written (kernels.kv_quant); "int4": two values
      a byte with a float16 scale and zero point per 64 values of each token's row. A checkpoint's own
      k_scale / v_scale are used by the cache they were calibrated for (fp8, or int8 where its kv_cache_scheme
      says so), never under "auto" (moe_engine.kv_scales, docs/kv_cache.md).
    speculative_config: speculative decoding, vLLM's names: {"method": "ngram", "num_speculative_tokens": k,
      "prompt_lookup_min": 1, "prompt_lookup_max": 4, "adaptive": True} (moe_engine.speculative.config);
      stored as a SpeculativeConfig.
    """
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.8
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    cuda_graphs: bool | None = None
    compile: bool = False
    quantization: str | None = None
    quant_group_size: int = 128
    quant_symmetric: bool = True
    quantize_attention: bool = False
    quantize_dense_mlp: bool = False
    quant_clip_search: bool = True
    quantize_lm_head: bool = False
    kv_cache_dtype: str = "auto"
    speculative_config: "SpeculativeConfig | dict | None" = None

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", SpeculativeConfig.of(self.speculative_config))
        limits = {"block_size": 1, "max_num_seqs": 1, "max_num_batched_tokens": 1, "max_model_len": 2,
                  "num_kv_blocks": 1, "kv_cache_bytes": 1}
        for name, low in limits.items():
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise MoeEngineError(f"bad engine setting {name}={v!r}: must be an integer >= {low}")
        g = self.gpu_memory_utilization
        if isinstance(g, bool) or not (isinstance(g, (int, float)) and 0 < g <= 1):
            raise MoeEngineError(f"bad engine setting gpu_memory_utilization={g!r}: must be in (0, 1]")
        for name in ("enable_prefix_caching", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise MoeEngineError(f"bad engine setting {name}={getattr(self, name)!r}: must be True or False")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise MoeEngineError(f"bad engine setting cuda_graphs={self.cuda_graphs!r}: must be True, False or None")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise MoeEngineError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: choose one of "
                                 f"{', '.join(KV_CACHE_DTYPES)}")
        self.quant_spec()          # checks the quantization settings

    def quant_spec(self) -> QuantSpec | None:
        if self.quantization is None:
            return None
        return QuantSpec(self.quantization, self.quant_group_size, self.quant_symmetric, self.quantize_attention,
                         self.quantize_dense_mlp, self.quant_clip_search, self.quantize_lm_head)

    @classmethod
    def split(cls, kwargs: dict) -> tuple["EngineConfig", dict]:
        """(the engine settings among keyword arguments, the rest: the model's own, e.g. absorb)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items()
                                                                        if k not in names}
