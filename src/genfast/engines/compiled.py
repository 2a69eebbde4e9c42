"""torch.compile, with batch sizes bucketed so that a new batch size does not recompile, and
inductor's freezing where it pays.

torch.compile specialises on input shapes: a sampler fed batches of 256 and a last
batch of 17 compiles twice, and one fed many sizes recompiles until dynamo's cache
limit, then silently falls back to eager. Here each batch is padded up to the next
power of two (rows are independent in eval mode, so padding changes no image) and
cut back after the call: at most log2(largest batch) + 1 compilations, each a
one-off cost paid on first use of that bucket (under a raised cache limit: `tracing`).

Freezing (inductor's `freezing=True`) makes the weights constants of the graph: it folds
them, prepacks them once for oneDNN's kernels (instead of a weight reorder at every call)
and fuses a convolution with the element-wise work after it. Whether that pays depends on
the machine and the batch: on the AVX2-only AMD EPYC VM the frozen GAN ran 1.5x faster
than the plain compiled one at batch 1 but 10-15% slower at batch 256 (oneDNN's
prepacked transposed convolution is the slower kernel there), while on an Intel CPU with
AMX it is what lets bf16 convolutions reach the tiles (the issue's prototype: ~5x eager).
So each bucket compiles both on first use, times them on its own batch and keeps the
faster (`Bucketed.frozen` records which); the frozen graph computes the same function, to
fp32 rounding.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from genfast.engines.fusion import fastest

# Compilations allowed per function before dynamo gives up and runs it eagerly (its default
# is 8): dynamo counts every cache entry of a code object, so two variants (plain and
# frozen) of each of up to 17 buckets (1 to 65,536), and the other engines' compilations of
# the same network in one bench run, must fit.
RECOMPILE_LIMIT = 128
TRIAL_CALLS = 3  # timed calls of each variant when a bucket is first used


def bucket(batch: int) -> int:
    """The padded batch size: the next power of two."""
    return 1 << (batch - 1).bit_length()


def padded(inputs: tuple[torch.Tensor | None, ...], size: int) -> tuple[torch.Tensor | None, ...]:
    """Each batch (B, ...) with zero rows up to `size` (None stays None): rows are independent,
    so padding rows change no other row's result. Always new tensors, also with nothing to
    pad: made under inference mode (Bucketed's call), an input is then always an inference
    tensor, and a compiled graph is never traced again, outside freezing's `tracing`, for a
    caller's tensor that is not one (which would leave it unfrozen)."""
    return tuple(None if x is None else torch.cat([x, x.new_zeros(size - len(x), *x.shape[1:])]) for x in inputs)


@contextlib.contextmanager
def tracing(freezing: bool):
    """What the first call of a compiled function (the one that traces and compiles it) runs
    under. Freezing must be switched on in inductor's global config *while dynamo traces*:
    dynamo reads it then to make the parameters attributes of the graph, so
    `torch.compile(options={"freezing": True})` alone, which reaches only the backend,
    freezes nothing (torch 2.13: the weights stay graph inputs, no oneDNN prepacking).
    Inductor's own warnings while it compiles (its int8 lowering warns about a tensor copy
    of its own) are not the user's to read."""
    import torch._dynamo.config
    import torch._inductor.config

    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with (torch._inductor.config.patch(freezing=freezing), torch._dynamo.config.patch(recompile_limit=limit),
          warnings.catch_warnings()):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor")
        yield


class Bucketed(nn.Module):
    """Calls the network compiled for the batch's bucket, the batch padded to it; remembers
    the buckets it has compiled (what `bench` reports as one-off costs, and what the tests
    check) and, for each, whether the frozen variant was the faster one. `freezing`: the
    variants tried (a quantised network runs its int8 kernels only frozen). A module, so
    that a later engine (cudagraph) can wrap it."""

    def __init__(self, module: nn.Module, freezing: tuple[bool, ...] = (False, True)):
        super().__init__()
        self.inner = module.eval()
        self.device = next(module.parameters()).device
        # Two compiled functions, so that each keeps its own graphs (dynamo tells them apart
        # by their backends' settings); both are traced under inference mode, as freezing needs.
        self.runs = {frozen: torch.compile(self.inner, dynamic=False, options={"freezing": frozen})
                     for frozen in freezing}
        self.buckets: set[int] = set()
        self.frozen: dict[int, bool] = {}

    @torch.inference_mode()
    def forward(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """Every input a batch (B, ...) or None: a generator's noise and labels, or a whole
        decode's prefix and uniforms."""
        n = len(inputs[0])
        size = bucket(n)
        inputs = tuple(None if x is None else x.to(self.device) for x in padded(inputs, size))
        if size not in self.buckets:
            self._choose(size, inputs)
        return self.runs[self.frozen[size]](*inputs)[:n]

    def _choose(self, size: int, inputs: tuple[torch.Tensor | None, ...]) -> None:
        """Compile every variant for this bucket and keep the fastest on this very batch."""
        for frozen, run in self.runs.items():
            with tracing(frozen):
                run(*inputs)
        variants = {"frozen" if frozen else "plain": run for frozen, run in self.runs.items()}
        best = fastest(variants, lambda run: run(*inputs), self.device, repeats=TRIAL_CALLS) \
            if len(variants) > 1 else next(iter(variants))
        self.buckets.add(size)
        self.frozen[size] = best == "frozen"
