"""CUDA graphs: a batch's whole sequence of kernels recorded once and replayed with one launch.

At small batch the GPU waits on the CPU: the seed's generator launches a dozen
kernels, each a few microseconds of Python and driver work, for microseconds of
arithmetic. A CUDA graph replays them all from one launch, but on the very buffers
it was recorded with. So each bucket (the batch padded to a power of two, as for
compile) gets static input buffers and one recorded graph; a call copies its noise
and labels into the buffers, replays, and returns a copy of the output: the next
replay overwrites the graph's own output, which callers must never see change.

The bookkeeping (buckets, static buffers, padding, copies) is `GraphReplay`, tested
on the CPU with a stand-in recorder; `record_cuda_graph` is the CUDA part.
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
    """Calls `module(noise, labels)` through one recorded graph per bucket."""

    def __init__(self, module: nn.Module, conditional: bool, recorder: Recorder | None = None):
        self.module = module
        self.conditional = conditional
        self.device = next(module.parameters()).device
        self.recorder = recorder or self._record_in_shared_pool
        self.pool = None
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor | None, Callable[[], None], torch.Tensor]] = {}

    def _record_in_shared_pool(self, run):
        # One memory pool for all buckets: their graphs never run at the same time.
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        return record_cuda_graph(run, self.pool)

    def _graph(self, padded: int, noise: torch.Tensor):
        if padded not in self.graphs:
            static_noise = torch.zeros(padded, *noise.shape[1:], dtype=noise.dtype, device=self.device)
            static_labels = torch.zeros(padded, dtype=torch.long, device=self.device) if self.conditional else None
            replay, output = self.recorder(lambda: self.module(static_noise, static_labels))
            self.graphs[padded] = (static_noise, static_labels, replay, output)
        return self.graphs[padded]

    @torch.inference_mode()
    def __call__(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n = len(noise)
        static_noise, static_labels, replay, output = self._graph(bucket(n), noise)
        static_noise[:n].copy_(noise)
        static_noise[n:].zero_()  # padding rows: any finite value; rows are independent in eval mode
        if static_labels is not None:
            static_labels[:n].copy_(labels)
            static_labels[n:].zero_()
        replay()
        return output[:n].clone()


class GraphedCall:
    """A fixed-shape call of tensors (a looping network's fixed part: the ar static
    decoder's sampled step, (tokens (rows, 1), position (1,), uniforms (B,)) -> next tokens)
    replayed from one recorded graph. Recorded on the first call, with that call's inputs already copied into the
    static buffers, so the recording's warm-up runs write into any state the part keeps
    (its cache) exactly what the call itself writes."""

    def __init__(self, part: Callable[..., torch.Tensor], recorder: Recorder | None = None):
        self.part, self.recorder = part, recorder or record_cuda_graph
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.replay = self.output = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.replay is None:
            self.inputs = tuple(x.clone() for x in inputs)
            self.replay, self.output = self.recorder(lambda: self.part(*self.inputs))
        else:
            if [x.shape for x in inputs] != [x.shape for x in self.inputs]:
                raise ValueError(f"a recorded call takes the shapes it was recorded with, "
                                 f"{[tuple(x.shape) for x in self.inputs]}")
            for static, x in zip(self.inputs, inputs):
                static.copy_(x)
        self.replay()
        return self.output.clone()


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise EngineUnavailable("cudagraph needs a CUDA device (load the model with --device cuda)")

