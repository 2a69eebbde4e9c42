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
EngineUnavailable with one line saying why.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from genfast.engines.compiled import Bucketed
from genfast.engines.cudagraph import GraphedStep, GraphReplay, require_cuda
from genfast.engines.fusion import fold_batchnorm, fastest_layout
from genfast.engines.onnx import int8_runtime, onnx_runtime
from genfast.engines.precision import reduced
from genfast.errors import GenfastError
from genfast.families.base import Sampler


class EngineUnavailable(GenfastError):
    """This engine cannot run on this machine (no CUDA, a runtime not installed, ...)."""


def rewrap(sampler: Sampler, module: nn.Module | None, fn: Callable | None = None, **info) -> Sampler:
    """A copy of `sampler` running `module` (through `fn` when the engine needs its own call;
    module None when the network no longer runs in PyTorch)."""
    wrapped = sampler if module is None else Sampler.from_module(module, sampler.noise_shape, sampler.image_shape,
                                                                  sampler.class_names)
    return dataclasses.replace(sampler, fn=fn or wrapped.fn, module=module, info=sampler.info | info)


def fused(sampler: Sampler) -> Sampler:
    """Inference-optimised eager: BatchNorm folded into the layer before it (exact up to
    fp32 rounding), and the faster memory layout for this machine (see fastest_layout)."""
    module, layout = fastest_layout(fold_batchnorm(sampler.module, conditional=sampler.conditional),
                                    sampler.noise(64, 0), sampler.labels(64))
    return rewrap(sampler, module, layout=layout)


def compiled(sampler: Sampler) -> Sampler:
    """torch.compile with batch sizes bucketed (compiled.py); a later engine (cudagraph)
    wraps the compiled module. For ar, what has fixed shapes is compiled: the static
    decoder's step, or the full-sequence pass of jacobi and parallel (naive and kv grow
    their inputs every step, and would recompile at every one)."""
    generator = sampler.module
    if hasattr(generator, "with_step_wrap"):
        if generator.decode == "static":
            return rewrap(sampler, generator.with_step_wrap(lambda step: torch.compile(step, dynamic=False)))
        if generator.decode in ("jacobi", "parallel"):
            return rewrap(sampler, generator.with_compiled_net(torch.compile(generator.net, dynamic=False)))
        raise EngineUnavailable(f"'compile' needs fixed shapes: --decode static, jacobi or parallel "
                                f"({generator.decode} grows its inputs every step)")
    if not getattr(generator, "one_call", True):
        raise EngineUnavailable("for a model that decodes token by token, put compile first (compile+bf16)")
    bucketed = Bucketed(generator)
    return rewrap(sampler, bucketed.run, bucketed)


def cudagraph(sampler: Sampler) -> Sampler:
    """Replays recorded graphs, not the module: nothing can wrap it after this. For ar, the
    static decoder's step is what is recorded."""
    require_cuda(sampler.device)
    generator = sampler.module
    if hasattr(generator, "with_step_wrap"):
        if generator.decode != "static":
            raise EngineUnavailable("'cudagraph' records the static decoder's fixed-shape step: use --decode static")
        return rewrap(sampler, generator.with_step_wrap(
            lambda step: GraphedStep(step, step.cache.keys.shape[1], sampler.device)))
    if not getattr(generator, "one_call", True):
        raise EngineUnavailable("for a model that decodes token by token, put cudagraph first")
    return rewrap(sampler, None, GraphReplay(generator.eval(), sampler.conditional))


ENGINES: dict[str, Callable[[Sampler], Sampler]] = {
    "eager": lambda sampler: sampler,
    "fused": fused,
    "bf16": lambda sampler: rewrap(sampler, reduced(sampler, torch.bfloat16)),
    "fp16": lambda sampler: rewrap(sampler, reduced(sampler, torch.float16)),
    "compile": compiled,
    "cudagraph": cudagraph,
    "onnx": lambda sampler: rewrap(sampler, None, onnx_runtime(sampler)),
    "int8": lambda sampler: rewrap(sampler, None, int8_runtime(sampler)),
}


# Engines that trace, export or record the network as one call; a sampler that decodes in
# a loop of data-dependent length (ar) takes its speed-ups from its decoding strategy.
ONE_CALL = ("fused", "onnx", "int8")


def apply(sampler: Sampler, engine: str) -> Sampler:
    """`sampler` through `engine`: a name from ENGINES, or names joined by "+"."""
    steps = engine.split("+")
    for name in steps:
        if name not in ENGINES:
            raise GenfastError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)} (or join them with +)")
        if name in ONE_CALL and not getattr(sampler.module, "one_call", True):
            raise EngineUnavailable(f"'{name}' needs a network run in one call; this model decodes token by token "
                                    "(its speed-ups: --decode kv, static, jacobi, parallel; compile the static step)")
    for previous, name in zip([None, *steps], steps):
        if sampler.module is None and name != "eager":
            if previous is None:
                raise GenfastError(f"engine '{name}' needs the sampler's network; load it with genfast.load")
            raise GenfastError(f"'{previous}' must come last in '{engine}': it no longer runs a PyTorch module "
                               "that the next engine could wrap")
        sampler = ENGINES[name](sampler)
    return dataclasses.replace(sampler, info=sampler.info | {"engine": engine})
