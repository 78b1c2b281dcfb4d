"""The one seam for a model step: the engine hands a scheduled batch to a runner and gets logits back.

Implementations side by side: eager.py (any batch: prefill chunks, decode tokens, several tokens a
sequence), static.py (the static-buffer decode step the next two share, and the runner that picks it or
the eager one per batch), cuda_graphs.py (that step captured and replayed per batch-size bucket on CUDA),
compiled.py (that step through torch.compile on the CPU). The engine knows nothing of capture or compile.
"""

from moe_engine.runners.base import StepOutput, StepRunner
from moe_engine.runners.eager import EagerRunner
from moe_engine.runners.static import DecodeRunner, StaticStep, bucket_sizes


def build_runner(model, kv_caches, block_size: int, max_model_len: int, max_num_seqs: int, pad_block: int,
                 device, cuda_graphs: bool, compile: bool) -> StepRunner:
    """The eager runner, or, with CUDA graphs or compile on, a DecodeRunner that serves pure decode steps
    from the static step (captured or compiled) and every other batch eagerly."""
    eager = EagerRunner(model, kv_caches, block_size, device, max_model_len)
    if not (cuda_graphs or compile):
        return eager
    if compile:
        from moe_engine.runners.compiled import CompiledStep
        static = CompiledStep(model, kv_caches, block_size, max_model_len, max_num_seqs, pad_block, device)
    elif device.type == "cuda":
        from moe_engine.runners.cuda_graphs import CudaGraphStep
        static = CudaGraphStep(model, kv_caches, block_size, max_model_len, max_num_seqs, pad_block, device)
    else:      # cuda_graphs=True off CUDA: the same static step run eagerly (how the CPU tests check it)
        static = StaticStep(model, kv_caches, block_size, max_model_len, max_num_seqs, pad_block, device)
    return DecodeRunner(eager, static)


__all__ = ["StepOutput", "StepRunner", "EagerRunner", "StaticStep", "DecodeRunner", "bucket_sizes", "build_runner"]
