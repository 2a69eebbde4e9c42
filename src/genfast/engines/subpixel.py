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

The layer applies the element-wise functions that followed it in the network (`absorb_pointwise`)
before its pixel shuffle rather than after: the same numbers (an element-wise function commutes
with a permutation of its elements), but compiled, inductor otherwise fuses the shuffle's
gather into the function's loop, whose strided, divided indices then do not vectorise (the
seed generator's final tanh: a 1.5 ms scalar loop of 5.9 ms at batch 256 on the AMX Xeon;
applied before the shuffle, the whole graph ran 5.6 -> 4.5 ms).

Only layers whose output is exactly s times the input (K - 2p + output_padding = s,
K divisible by s, no groups or dilation) are rewritten; others are left as they are.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

# Element-wise functions a sub-pixel layer can apply before its shuffle: applied to one tensor,
# their other arguments numbers (a tensor argument, e.g. a per-channel shift, would not
# follow the permutation).
POINTWISE = (torch.tanh, torch.sigmoid, torch.relu, F.relu, F.leaky_relu, F.silu, F.gelu,
             operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul)


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
        self.pointwise: list[Callable[[torch.Tensor], torch.Tensor]] = []  # absorb_pointwise fills it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        s, c = self.stride, self.out_channels
        y = self.conv(x)
        for function in self.pointwise:
            y = function(y)
        # The shuffle in channels-last order: an output pixel's c channels are one contiguous
        # run in its phase's slice of the convolution's output as well, so the shuffle copies
        # runs (vectorised, compiled or not) instead of gathering single values from
        # c-strided planes. Measured on the AMX Xeon (batch 256, 64 channels, 7x7 -> 14x14, one
        # thread): 15.3 -> 2.6 ms compiled, 10.1 -> 5.2 ms eager. The result is NCHW, stored
        # channels last, which the next convolution takes as it is.
        y = y.permute(0, 2, 3, 1)  # (B, H', W', s*s*c)
        crops = [y[:, top:top + height, left:left + width, (a * s + b) * c:(a * s + b + 1) * c]
                 for a, top in enumerate(self.offsets) for b, left in enumerate(self.offsets)]
        y = torch.stack(crops, 3).unflatten(3, (s, s))            # (B, H, W, a, b, C)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(x.shape[0], s * height, s * width, c)  # pixel (s*m + a, s*n + b)
        return y.permute(0, 3, 1, 2)


def rewritable(layer: nn.Module) -> bool:
    if not isinstance(layer, nn.ConvTranspose2d):
        return False
    (k, k2), (s, s2), (p, p2), (op, op2) = layer.kernel_size, layer.stride, layer.padding, layer.output_padding
    square = k == k2 and s == s2 and p == p2 and op == op2
    return (square and k % s == 0 and k - 2 * p + op == s and layer.groups == 1 and layer.dilation == (1, 1)
            and layer.padding_mode == "zeros")


def replace(module: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` where `module`'s submodule `name` (dotted) was."""
    parent, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent), attribute, layer)


def subpixel(module: nn.Module) -> nn.Module:
    """A copy of `module` with every rewritable transposed convolution replaced."""
    module = copy.deepcopy(module)
    for name, layer in list(module.named_modules()):
        if rewritable(layer):
            replace(module, name, SubPixelConv(layer))
    return module


class Applied:
    """One absorbed element-wise call: `target(*args, **kwargs)` with the layer's output where
    the graph had the layer's node. A class, not a closure, so that the module deep-copies."""

    def __init__(self, node: fx.Node, source: fx.Node):
        self.target, self.kwargs = node.target, dict(node.kwargs)
        self.position = node.args.index(source)
        self.args = [None if a is source else a for a in node.args]  # numbers only: no graph node kept

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.position] = y
        return self.target(*args, **self.kwargs)


def _absorbable(node: fx.Node, source: fx.Node) -> bool:
    others = [a for a in node.args if a is not source] + list(node.kwargs.values())
    return (node.op == "call_function" and node.target in POINTWISE and node.args.count(source) == 1
            and all(isinstance(a, (int, float, bool)) for a in others))


def absorb_pointwise(module: fx.GraphModule) -> fx.GraphModule:
    """Move the element-wise calls that follow each SubPixelConv (and only it reads) into the
    layer, which applies them before its shuffle (see the module's docstring). In place."""
    layers = dict(module.named_modules())
    for node in list(module.graph.nodes):
        if node.op != "call_module" or not isinstance(layers[node.target], SubPixelConv):
            continue
        last, absorbed = node, []
        while len(last.users) == 1 and _absorbable(user := next(iter(last.users)), last):
            layers[node.target].pointwise.append(Applied(user, last))
            absorbed.append(user)
            last = user
        if absorbed:
            last.replace_all_uses_with(node)
            for dead in reversed(absorbed):  # last first: each has no users left once the one after it is gone
                module.graph.erase_node(dead)
    module.graph.lint()
    module.recompile()
    return module
