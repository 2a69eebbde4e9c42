"""Transposed convolutions rewritten as ordinary convolutions followed by a pixel shuffle.

A stride-s transposed convolution computes each of the s x s output phases (output
pixel (s*m + a, s*n + b)) from a small window of input pixels with its own subset of
the kernel taps: s*s ordinary convolutions of kernel K/s on the input grid. They are
stacked here as the output channels of one convolution (one padding serving all
phases), each phase cropped at its own offset, then interleaved. The arithmetic is
that of the transposed convolution, exact to fp32 rounding.

Why: ONNX Runtime's int8 quantisation has no int8 ConvTranspose kernel (it keeps
the layer in fp32 and dequantises its weights on every call), but it does have
QLinearConv. The seed's generator spends 90% of its FLOPs in its first transposed
convolution, so int8 inference of it needs this rewrite.

Only layers whose output is exactly s times the input (K - 2p + output_padding = s,
K divisible by s, no groups or dilation) are rewritten; others are left as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _phase_plan(kernel: int, stride: int, padding: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(taps, conv padding, [(crop offset, first kernel index) per phase]) along one axis.

    Output pixel s*m + a gets input i with kernel index k = s*m + a + p - s*i. Writing
    a + p = s*c + r, the taps are i = m + c - j, k = s*j + r for j < K/s."""
    taps = kernel // stride
    carries = [(a + padding) // stride for a in range(stride)]
    conv_padding = max(taps - 1 - min(carries), max(carries))
    return taps, conv_padding, [(c - taps + 1 + conv_padding, (a + padding) % stride)
                                for a, c in enumerate(carries)]


class SubPixelConv(nn.Module):
    def __init__(self, layer: nn.ConvTranspose2d):
        super().__init__()
        kernel, stride, padding = layer.kernel_size[0], layer.stride[0], layer.padding[0]
        taps, conv_padding, phases = _phase_plan(kernel, stride, padding)
        weight = layer.weight.detach()  # (in, out, K, K)
        kernels = []
        for _, row_first in phases:
            for _, col_first in phases:
                # Input offset u inside the window pairs with kernel index s*(taps-1-u) + first.
                rows = [stride * (taps - 1 - u) + row_first for u in range(taps)]
                cols = [stride * (taps - 1 - u) + col_first for u in range(taps)]
                kernels.append(weight[:, :, rows][:, :, :, cols].transpose(0, 1))  # (out, in, taps, taps)
        # The bias goes into the convolution, once per phase: an int8 kernel then adds it
        # exactly (in int32) before its output is quantised, rather than after, in 8 bits.
        self.conv = nn.Conv2d(weight.shape[0], stride * stride * weight.shape[1], taps, padding=conv_padding,
                              bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
        self.conv.weight.data.copy_(torch.cat(kernels))
        if layer.bias is not None:
            self.conv.bias.data.copy_(layer.bias.detach().repeat(stride * stride))
        self.stride, self.out_channels = stride, weight.shape[1]
        self.offsets = [offset for offset, _ in phases]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        s, c = self.stride, self.out_channels
        y = self.conv(x)
        crops = [y[:, (a * s + b) * c:(a * s + b + 1) * c, top:top + height, left:left + width]
                 for a, top in enumerate(self.offsets) for b, left in enumerate(self.offsets)]
        y = torch.stack(crops, 2).unflatten(2, (s, s))         # (B, C, a, b, H, W)
        return y.permute(0, 1, 4, 2, 5, 3).reshape(x.shape[0], c, s * height, s * width)  # pixel (s*m + a, s*n + b)


def rewritable(layer: nn.Module) -> bool:
    if not isinstance(layer, nn.ConvTranspose2d):
        return False
    (k, k2), (s, s2), (p, p2), (op, op2) = layer.kernel_size, layer.stride, layer.padding, layer.output_padding
    square = k == k2 and s == s2 and p == p2 and op == op2
    return (square and k % s == 0 and k - 2 * p + op == s and layer.groups == 1 and layer.dilation == (1, 1)
            and layer.padding_mode == "zeros")


def subpixel(module: nn.Module) -> nn.Module:
    """A copy of `module` with every rewritable transposed convolution replaced."""
    module = copy.deepcopy(module)
    for name, layer in list(module.named_modules()):
        if rewritable(layer):
            parent, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent), attribute, SubPixelConv(layer))
    return module
