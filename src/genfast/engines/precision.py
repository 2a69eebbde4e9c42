"""Reduced precision: the network's weights and arithmetic in bfloat16 or float16, pixels back in fp32."""

from __future__ import annotations

import copy

import torch
from torch import nn

from genfast.errors import EngineUnavailable
from genfast.families.base import Sampler


class Reduced(nn.Module):
    """`inner` in `dtype`: noise cast in, pixels cast back to fp32. A whole module (not a
    calling convention), so compile, cudagraph and onnx can wrap it in turn."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(noise.to(self.dtype), labels).float()


def reduced(sampler: Sampler, dtype: torch.dtype) -> Reduced:
    """bf16 keeps 8 bits of mantissa (~0.4% relative error per operation) and fp32's range;
    fp16 keeps 11 bits but overflows above 65,504."""
    if dtype == torch.float16 and sampler.device.type != "cuda":
        raise EngineUnavailable("fp16 runs on CUDA only (CPUs have no fast fp16 kernels); use bf16 on CPU")
    return Reduced(copy.deepcopy(sampler.module).eval(), dtype)
