"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is bound by launch overhead, not by the GPU: hundreds of kernels, each
launched from Python. Captured once per batch-size bucket (1, 2, 4, 8, 16, 32, ... up to max_num_seqs),
the static step (static.py) becomes one replay: each step overwrites its input buffer with one
host-to-device copy of the rows in use, and the logits come back in a static tensor.
"""

import torch

from moe_engine.runners.static import StaticStep


class CudaGraphStep(StaticStep):
    """The static step, captured on first use of each bucket and replayed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = None

    def prepare(self, bs: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """(graph, its static logits [bs, V]) for bucket bs, captured over padding rows."""
        self._fill([], [], [], bs)                     # all padding while capturing
        side = torch.cuda.Stream(self.device)          # warm up (compiles the Triton kernels) off-stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(bs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bs)
        torch.cuda.synchronize(self.device)
        return graph, logits

    def replay(self, bs: int, top_position: int) -> tuple[torch.Tensor, None]:
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits, None
