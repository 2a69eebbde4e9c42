"""torch.compile, with batch sizes bucketed so that a new batch size does not recompile.

torch.compile specialises on input shapes: a sampler fed batches of 256 and a last
batch of 17 compiles twice, and one fed many sizes recompiles until dynamo's cache
limit, then silently falls back to eager. Here each batch is padded up to the next
power of two (rows are independent in eval mode, so padding changes no image) and
cut back after the call: at most log2(largest batch) + 1 compilations, each a
one-off cost paid on first use of that bucket.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from genfast.families.base import Sampler


def bucket(batch: int) -> int:
    """The padded batch size: the next power of two."""
    return 1 << (batch - 1).bit_length()


def compiled(sampler: Sampler) -> tuple[nn.Module, object]:
    module = copy.deepcopy(sampler.module).eval()
    device = next(module.parameters()).device
    run = torch.compile(module, dynamic=False)

    @torch.inference_mode()
    def generate(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, padded = len(noise), bucket(len(noise))
        noise = torch.cat([noise, noise.new_zeros(padded - n, *noise.shape[1:])]).to(device)
        if labels is not None:
            labels = torch.cat([labels, labels.new_zeros(padded - n)]).to(device)
        return run(noise, labels)[:n]

    generate.buckets = set()  # the padded shapes compiled so far: for tests and bench
    return module, _recording(generate)


def _recording(generate):
    def call(noise, labels=None):
        generate.buckets.add(bucket(len(noise)))
        return generate(noise, labels)

    call.buckets = generate.buckets
    return call
