"""BatchNorm folding: y = BN(layer(x)) becomes layer'(x), with the BN's affine map in the weights.

In eval mode BN is y = (x - mean) / sqrt(var + eps) * gamma + beta, an affine map per
output channel: y = s * x + t with s = gamma / sqrt(var + eps), t = beta - mean * s.
Scaling the preceding layer's output channels by s and adding t to its bias gives the
same function with one layer fewer. The graph is found with torch.fx, so any family's
network with Linear / Conv2d / ConvTranspose2d -> BatchNorm pairs is folded, on a copy.
"""

from __future__ import annotations

import copy
import statistics

import torch
from torch import fx, nn

from genfast import timing
from genfast.engines.subpixel import SubPixelConv, absorb_pointwise, replace, rewritable

FOLDABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
SHIFT_PREFIX = "folded_shift_"  # the buffers of the shifts left as separate adds (_fold)


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module, into_bias: bool) -> torch.Tensor | None:
    """Scale the layer's output channels by s; put t in its bias, or return t (shaped to
    broadcast over the output) when the layer has no bias and `into_bias` is False.

    By default a bias is not added to a bias-free layer: oneDNN's transposed convolution
    runs ~15% slower with one (measured on the seed generator's 128->64 layer, batch 256),
    more than the separate add costs. An int8 kernel wants it inside (`into_bias`): it adds
    the bias exactly, in int32, and its output, quantised to 8 bits over one range for all
    channels, then holds each channel around its own mean rather than offset by it."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    # Which weight axis holds the output channels: dim 0, except for transposed convolutions.
    axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    shape = [1] * layer.weight.dim()
    shape[axis] = -1
    layer.weight.mul_(scale.view(shape))
    if layer.bias is None and into_bias:
        layer.bias = nn.Parameter(torch.zeros_like(shift))
    if layer.bias is not None:
        layer.bias.mul_(scale).add_(shift)
        return None
    return shift.view(-1, *[1] * (layer.weight.dim() - 2))  # (C,) for Linear, (C, 1, 1) for convolutions


def fold_batchnorm(module: nn.Module, conditional: bool, into_bias: bool = False) -> fx.GraphModule:
    """A copy of `module` (called as module(noise, labels)) with every foldable BN folded away
    (`into_bias`: into the layer's bias even where it had none; see _fold)."""
    model = copy.deepcopy(module).eval()
    graph_module = fx.symbolic_trace(model, concrete_args=None if conditional else {"labels": None})
    modules = dict(graph_module.named_modules())
    for index, node in enumerate(list(graph_module.graph.nodes)):
        if node.op != "call_module" or not isinstance(modules[node.target], NORMS):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], FOLDABLE) and len(source.users) == 1):
            continue
        shift = _fold(modules[source.target], modules[node.target], into_bias)
        result = source
        if shift is not None:
            name = f"{SHIFT_PREFIX}{index}"
            graph_module.register_buffer(name, shift)
            with graph_module.graph.inserting_after(node):
                constant = graph_module.graph.get_attr(name)
            with graph_module.graph.inserting_after(constant):
                result = graph_module.graph.call_function(torch.add, (source, constant))
        node.replace_all_uses_with(result)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def shifts_into_biases(module: fx.GraphModule) -> fx.GraphModule:
    """The shifts fold_batchnorm left as separate adds after bias-free layers, moved into those
    layers' biases (as `into_bias=True` would have folded them). In place.

    For reduced precision (precision.py, after fused): a separate add is its own pass over
    the layer's output in bf16, while a bias is added by the layer's kernel, and compiled,
    inductor fuses a convolution with its bias and activation into one oneDNN call only
    when the bias is the layer's own. Measured on the AMX Xeon (gan-fashion-mnist, batch
    256, 2 threads): fused+bf16+compile 4.9-5.0 -> 4.3-4.6 ms, fused+bf16 eager the same
    within noise; in fp32 the separate add stays (fused 16.6-17.5 ms with it against 20.1
    with the bias inside: oneDNN's fp32 transposed convolution with a bias is the slower
    kernel, on the AMD EPYC as here)."""
    layers = dict(module.named_modules())
    for node in list(module.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.add and len(node.args) == 2):
            continue
        source, shift = node.args
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(layers[source.target], FOLDABLE) and layers[source.target].bias is None
                and isinstance(shift, fx.Node) and shift.op == "get_attr"
                and shift.target.startswith(SHIFT_PREFIX)):
            continue
        layer = layers[source.target]
        layer.bias = nn.Parameter(getattr(module, shift.target).detach().reshape(-1).clone())
        node.replace_all_uses_with(source)
        module.graph.erase_node(node)
        if not shift.users:
            module.graph.erase_node(shift)
            delattr(module, shift.target)
    module.graph.lint()
    module.recompile()
    return module


def fastest_forms(module: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None,
                  repeats: int = 5) -> tuple[nn.Module, list[str]]:
    """`module` with each transposed convolution in whichever of its two forms runs faster here
    on the input it gets from the probe batch: as it is, or as a sub-pixel convolution (an
    ordinary convolution and a pixel shuffle, subpixel.py; the same arithmetic, reordered).
    Returns the module and the names of the layers rewritten.

    Why per layer: on the Intel Xeon with AMX the seed generator's last layer (64 -> 1
    channel) ran 2.1x faster as a sub-pixel convolution in fp32 (6.0 -> 2.9 ms at batch 256)
    and 2.5x in bf16 (1.8 -> 0.73 ms): oneDNN's transposed convolution with one output
    channel cannot fill a vector register, let alone an AMX tile, while the rewrite gives it
    four. Its first layer (128 -> 64) ran 1.5-2x *slower* rewritten (2.7 against 5.3 ms
    in bf16): there the transposed kernel is the efficient one (BENCHMARKS.md, issue 17)."""
    layers = {name: layer for name, layer in module.named_modules() if rewritable(layer)}
    if not layers:
        return module, []
    device = next(module.parameters()).device
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(_, args) -> None:
            inputs[name] = args[0]
        return hook

    hooks = [layer.register_forward_pre_hook(keep_input(name)) for name, layer in layers.items()]
    with torch.inference_mode():
        module(noise.to(device), None if labels is None else labels.to(device))
    for hook in hooks:
        hook.remove()
    rewritten = []
    for name, layer in layers.items():
        forms = {"transposed": layer, "sub-pixel": SubPixelConv(layer)}
        with torch.inference_mode():
            best = fastest(forms, lambda form, x=inputs[name]: form(x), device, repeats)
        if best == "sub-pixel":
            replace(module, name, forms[best])
            rewritten.append(name)
    if rewritten and isinstance(module, fx.GraphModule):
        absorb_pointwise(module)
    return module, rewritten


def fastest_layout(module: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None,
                   repeats: int = 5) -> tuple[nn.Module, str]:
    """`module` in whichever memory layout runs the probe batch faster here: "contiguous"
    (NCHW) or "channels_last" (NHWC weights, which convolutions then propagate).

    Measured on the 2-core VM, channels_last made the VAE decoder ~10% faster and the
    DCGAN generator ~6% slower; on GPUs it is what tensor cores want; on the Intel Xeon
    with AMX, bf16 convolutions ran 1.5x faster in it while fp32's were a few % slower,
    which is why bf16 after fused chooses again (precision.py). Timing both, as cuDNN's
    benchmark mode does for its algorithms, beats a fixed rule; the layouts give the same
    numbers to fp32 rounding, so the choice changes speed only. The module is converted,
    not copied: the caller passes its own copy."""
    if not any(p.dim() == 4 for p in module.parameters()):
        return module, "contiguous"
    candidates = {"contiguous": copy.deepcopy(module).to(memory_format=torch.contiguous_format),
                  "channels_last": module.to(memory_format=torch.channels_last)}
    device = next(module.parameters()).device
    noise, labels = noise.to(device), None if labels is None else labels.to(device)
    with torch.inference_mode():
        best = fastest(candidates, lambda candidate: candidate(noise, labels), device, repeats)
    return candidates[best], best


def fastest(candidates: dict, call, device: torch.device, repeats: int = 5, margin: float = 0.97) -> str:
    """The name of the candidate that `call(candidate)` runs fastest, by the median of `repeats`
    timed calls interleaved round robin (so a machine that slows down mid-way skews none)
    after one warm-up round. The first candidate is the default: another must beat it by
    `margin` (3%) to be chosen, so that timing noise does not flip a choice for nothing."""
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, candidate in candidates.items():
            seconds[name].append(timing.seconds(lambda candidate=candidate: call(candidate), device))
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    default, *others = candidates
    best = min(others, key=median.__getitem__, default=default)
    return best if median[best] < margin * median[default] else default
