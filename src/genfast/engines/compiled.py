"""torch.compile, with batch sizes bucketed so that a new batch size does not recompile.

torch.compile specialises on input shapes: a sampler fed batches of 256 and a last
batch of 17 compiles twice, and one fed many sizes recompiles until dynamo's cache
limit, then silently falls back to eager. Here each batch is padded up to the next
power of two (rows are independent in eval mode, so padding changes no image) and
cut back after the call: at most log2(largest batch) + 1 compilations, each a
one-off cost paid on first use of that bucket.
"""

from __future__ import annotations

import torch
from torch import nn


def bucket(batch: int) -> int:
    """The padded batch size: the next power of two."""
    return 1 << (batch - 1).bit_length()


class Bucketed:
    """Calls a compiled network with the batch padded to its bucket; remembers the buckets
    it has compiled (what `bench` reports as one-off costs, and what the tests check)."""

    def __init__(self, module: nn.Module):
        self.device = next(module.parameters()).device
        self.run = torch.compile(module, dynamic=False)
        self.buckets: set[int] = set()

    @torch.inference_mode()
    def __call__(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, padded = len(noise), bucket(len(noise))
        self.buckets.add(padded)
        noise = torch.cat([noise, noise.new_zeros(padded - n, *noise.shape[1:])]).to(self.device)
        if labels is not None:
            labels = torch.cat([labels, labels.new_zeros(padded - n)]).to(self.device)
        return self.run(noise, labels)[:n]

