"""CUDA graphs: a batch's whole sequence of kernels recorded once and replayed with one launch.

At small batch the GPU waits on the CPU: the seed's generator launches a dozen
kernels, each a few microseconds of Python and driver work, for microseconds of
arithmetic. A CUDA graph replays them all from one launch, but on the very buffers
it was recorded with. So each bucket (the batch padded to a power of two, as for
compile) gets static input buffers and one recorded graph; a call copies its noise
and labels into the buffers, replays, and returns a copy of the output: the next
replay overwrites the graph's own output, which callers must never see change.

The bookkeeping (buckets, static buffers, padding, copies) is `GraphReplay`, tested
on the CPU with a stand-in recorder; `record_cuda_graph` is the CUDA part. A sampler
that decodes token by token (ar's static decoder) is recorded whole: its fixed
length and pre-drawn noise make the 49 steps, the prefill and every draw one fixed
sequence of kernels, so one replay makes a batch of images (gpt-fast and LlamaGen
record one step and launch it per token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from genfast.engines.compiled import bucket
from genfast.errors import EngineUnavailable

Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def record_cuda_graph(run: Callable[[], torch.Tensor], pool=None) -> tuple[Callable[[], None], torch.Tensor]:
    """(replay, output): `run` recorded as a CUDA graph, and the tensor each replay fills.

    Warmed up on a side stream first, as torch.cuda.graphs asks: lazy initialisation
    (cuBLAS handles, autotuning) must not happen during capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph.replay, output


class GraphReplay:
    """Calls `module(*inputs)` through one recorded graph per bucket. Every input is a batch
    (B, ...) or None (a sampler without labels); rows are independent, so padding rows
    change no result. For a looping network (ar) the module is its whole decode, prefill,
    steps and draws: one replay per batch, not one per token."""

    def __init__(self, module: nn.Module, recorder: Recorder | None = None):
        self.module = module
        self.device = next(module.parameters()).device
        self.recorder = recorder or self._record_in_shared_pool
        self.pool = None
        self.graphs: dict[int, tuple[list[torch.Tensor | None], Callable[[], None], torch.Tensor]] = {}

    def _record_in_shared_pool(self, run):
        # One memory pool for all buckets: their graphs never run at the same time.
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        return record_cuda_graph(run, self.pool)

    def _graph(self, padded: int, inputs: tuple[torch.Tensor | None, ...]):
        if padded not in self.graphs:
            static = [None if x is None else torch.zeros(padded, *x.shape[1:], dtype=x.dtype, device=self.device)
                      for x in inputs]
            replay, output = self.recorder(lambda: self.module(*static))
            self.graphs[padded] = (static, replay, output)
        return self.graphs[padded]

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        n = len(inputs[0])
        static, replay, output = self._graph(bucket(n), inputs)
        for buffer, x in zip(static, inputs):
            if buffer is not None:
                buffer[:n].copy_(x)
                buffer[n:].zero_()  # padding rows: any finite value; rows are independent in eval mode
        replay()
        return output[:n].clone()


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise EngineUnavailable("cudagraph needs a CUDA device (load the model with --device cuda)")

