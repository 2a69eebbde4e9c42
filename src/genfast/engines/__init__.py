"""Engines: each takes a sampler and returns a faster one; models are never edited for speed.

The eager fp32 sampler is the reference every engine is compared with, on the same
noise. An engine works on a copy of the sampler's network (`Sampler.module`) and
returns a new Sampler with the same noise and label interface:

    sampler = genfast.load("gan-fashion-mnist")
    fast = genfast.engines.apply(sampler, "fused+bf16+compile")

Engines compose with "+", applied left to right: each PyTorch engine returns a whole
module (precision casts included) that the next one wraps. onnx and int8 hand the
network to ONNX Runtime, so they come last.

ENGINES is the one registry; an engine that cannot run here raises
EngineUnavailable with one line saying why. An engine is a function Sampler ->
Sampler: a new one is a function and one registry entry.

A sampler that decodes in a loop (`Sampler.loops`: ar) is not one call: engines that
trace or export one call (ONE_CALL) refuse it, and compile and cudagraph wrap the
fixed-shape part its network offers (families/base.py, LoopNetwork), never knowing
which decoding strategy that part belongs to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from genfast.engines import auto
from genfast.engines.auto import TOLERANCES, Tolerance, tolerance  # noqa: F401 (each engine's, for its tests)
from genfast.engines.compiled import Bucketed
from genfast.engines.cudagraph import GraphReplay, require_cuda
from genfast.engines.fusion import fastest_forms, fastest_layout, fold_batchnorm, shifts_into_biases
from genfast.engines.onnx import LoopRuntime, PartRuntime, WholeRuntime, int8_runtime, onnx_runtime
from genfast.engines.precision import reduced
from genfast.engines.quantized import inductor_int8
from genfast.errors import EngineUnavailable, GenfastError
from genfast.families.base import LoopNetwork, Sampler


def rewrap(sampler: Sampler, module: nn.Module | None, fn: Callable | None = None, **info) -> Sampler:
    """A copy of `sampler` running `module` (through `fn` when the engine needs its own call;
    module None when the network no longer runs in PyTorch)."""
    wrapped = sampler if module is None else Sampler.from_module(module, sampler.noise_shape, sampler.image_shape,
                                                                  sampler.class_names)
    return dataclasses.replace(sampler, fn=fn or wrapped.fn, module=module, info=sampler.info | info)


def fused(sampler: Sampler) -> Sampler:
    """Inference-optimised eager: BatchNorm folded into the layer before it (exact up to
    fp32 rounding), each transposed convolution in its faster form here (fastest_forms)
    and the faster memory layout for this machine (fastest_layout)."""
    noise, labels = sampler.noise(64, 0), sampler.labels(64)
    module, rewritten = fastest_forms(fold_batchnorm(sampler.module, conditional=sampler.conditional), noise, labels)
    module, layout = fastest_layout(module, noise, labels)
    return rewrap(sampler, module, layout=layout, sub_pixel=rewritten)


def lowered(sampler: Sampler, dtype: torch.dtype) -> Sampler:
    """bf16 / fp16 (precision.py). After fused, which chose for fp32, two choices are made
    again for the new precision: BatchNorm's shifts go into the layers' biases
    (shifts_into_biases says why), and the memory layout is timed again (on the Intel Xeon
    with AMX the seed generator's bf16 convolutions ran 1.5x faster channels_last, its fp32
    ones a few % slower)."""
    module = reduced(sampler, dtype)
    if "layout" not in sampler.info:
        return rewrap(sampler, module)
    shifts_into_biases(module.inner)
    module, layout = fastest_layout(module, sampler.noise(64, 0), sampler.labels(64))
    return rewrap(sampler, module, layout=layout)


def _loop_network(sampler: Sampler, engine: str) -> LoopNetwork:
    """The looping network an engine wraps the fixed part of; after bf16 (whose module casts
    around it) there is none to reach, hence the order."""
    if not isinstance(sampler.module, LoopNetwork):
        raise EngineUnavailable(f"for a model that decodes token by token, put {engine} first ({engine}+bf16)")
    return sampler.module


def compiled(sampler: Sampler) -> Sampler:
    """torch.compile with batch sizes bucketed, each bucket frozen or not, whichever runs it
    faster here (compiled.py); a later engine (cudagraph) wraps the compiled module. A
    looping sampler's fixed-shape part is compiled instead (the parts whose inputs grow
    every step would recompile at every one)."""
    if sampler.loops:
        network = _loop_network(sampler, "compile")
        if network.fixed_part() is None:
            raise EngineUnavailable(f"'compile' needs fixed shapes: {network.fixed_part_advice(recorded=False)}")
        # Not frozen (compiled.py, `tracing`): frozen, the static decode of ar-mnist measured
        # no faster on the AMD EPYC VM (batch 1: 180 against 172 ms; batch 16: 403 against 370),
        # nor next-scale's whole decode on the Zen 5 (batch 1: 13.1 against 12-13 ms).
        if network.fixed_part().whole:  # a whole decode takes batches: bucketed like a one-call network's
            return rewrap(sampler, network.with_fixed_part(lambda part: Bucketed(part, freezing=(False,))))
        return rewrap(sampler, network.with_fixed_part(lambda part: torch.compile(part, dynamic=False)))
    bucketed = Bucketed(sampler.module)
    return rewrap(sampler, bucketed, bucketed)


def int8_inductor(sampler: Sampler) -> Sampler:
    """PyTorch's own int8 (PT2E, x86 inductor quantiser) compiled to oneDNN's VNNI/AMX kernels;
    unavailable on a CPU without them (quantized.py). Its network is compiled: nothing wraps it."""
    bucketed = inductor_int8(sampler)
    return rewrap(sampler, bucketed, bucketed)


def cudagraph(sampler: Sampler) -> Sampler:
    """Replays recorded graphs, not the module: nothing can wrap it after this. A looping
    sampler's whole decode is what is recorded, where its strategy has one of fixed length
    that never waits on a tensor's value (static, scales); a compiled step inside it stays compiled."""
    if sampler.loops:
        network = _loop_network(sampler, "cudagraph")
        if network.recorded_part() is None:
            raise EngineUnavailable(f"'cudagraph' records a whole decode of fixed length: "
                                    f"{network.fixed_part_advice(recorded=True)}")
        require_cuda(sampler.device)
        return rewrap(sampler, network.with_recorded_part(GraphReplay))
    require_cuda(sampler.device)
    return rewrap(sampler, None, GraphReplay(sampler.module.eval()))


def onnx(sampler: Sampler) -> Sampler:
    """The network in ONNX Runtime (onnx.py says why it pays), on the CPU in fp32; for a
    looping sampler, its whole decode where the strategy has one of fixed length (scales:
    one graph for all its passes; static: replayed as chained calls, the sampling included
    in both), else its fixed pass (jacobi, parallel: the rest of their loop stays in PyTorch)."""
    if not sampler.loops:
        return rewrap(sampler, None, onnx_runtime(sampler))
    if not isinstance(sampler.module, LoopNetwork):
        raise EngineUnavailable("'onnx' runs a token-by-token model's step in fp32: use it alone, without bf16")
    network = sampler.module
    if network.fixed_part() is None:
        raise EngineUnavailable(f"'onnx' runs a fixed-shape part: {network.fixed_part_advice(recorded=False)}")
    if sampler.device.type != "cpu":
        raise EngineUnavailable("'onnx' runs a token-by-token model's step on the CPU; on CUDA use cudagraph")
    if network.fixed_part().whole:
        return rewrap(sampler, network.with_fixed_part(WholeRuntime()))
    if network.recorded_part() is not None:
        return rewrap(sampler, network.with_recorded_part(LoopRuntime()))
    return rewrap(sampler, network.with_fixed_part(PartRuntime()))


ENGINES: dict[str, Callable[[Sampler], Sampler]] = {
    "eager": lambda sampler: sampler,
    "fused": fused,
    "bf16": lambda sampler: lowered(sampler, torch.bfloat16),
    "fp16": lambda sampler: lowered(sampler, torch.float16),
    "compile": compiled,
    "cudagraph": cudagraph,
    "onnx": onnx,
    "int8": lambda sampler: rewrap(sampler, None, int8_runtime(sampler)),
    "int8-inductor": int8_inductor,
    # The fastest stack of these that keeps the images, measured here and cached (auto.py).
    "auto": lambda sampler: auto.per_bucket(sampler, apply),
}


# Engines that trace or export the network as one call; a sampler that decodes in a loop
# of data-dependent length (ar) takes its speed-ups from its decoding strategy.
ONE_CALL = ("fused", "int8", "int8-inductor")

# Engines whose result runs in another runtime or replays a recording: nothing wraps them.
LAST = ("cudagraph", "onnx", "int8", "int8-inductor", "auto")


def apply(sampler: Sampler, engine: str) -> Sampler:
    """`sampler` through `engine`: a name from ENGINES, or names joined by "+"."""
    steps = engine.split("+")
    for name in steps:
        if name not in ENGINES:
            raise GenfastError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)} (or join them with +)")
        if name in ONE_CALL and sampler.loops:
            raise EngineUnavailable(f"'{name}' needs a network run in one call; this model decodes token by token "
                                    "(its speed-ups: --decode kv, static, jacobi, parallel; compile or onnx the "
                                    "static step)")
    for previous, name in zip([None, *steps], steps):
        if (previous in LAST or sampler.module is None) and name != "eager":
            if previous is None:
                raise GenfastError(f"engine '{name}' needs the sampler's network; load it with genfast.load")
            raise GenfastError(f"'{previous}' must come last in '{engine}': it no longer runs a PyTorch module "
                               "that the next engine could wrap")
        sampler = ENGINES[name](sampler)
    return dataclasses.replace(sampler, info=sampler.info | {"engine": engine})
