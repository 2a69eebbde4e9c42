"""Engines: each takes a sampler and returns a faster one; models are never edited for speed.

The eager fp32 sampler is the reference every engine is compared with, on the same
noise. An engine works on a copy of the sampler's network (`Sampler.module`) and
returns a new Sampler with the same noise and label interface:

    sampler = genfast.load("gan-fashion-mnist")
    fast = genfast.engines.apply(sampler, "fused")

ENGINES is the one registry; an engine that cannot run here raises
EngineUnavailable with one line saying why.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from genfast.engines.fusion import fold_batchnorm
from genfast.engines.precision import bf16
from genfast.engines.compiled import compiled
from genfast.engines.onnx import onnx_runtime
from genfast.errors import GenfastError
from genfast.families.base import Sampler


class EngineUnavailable(GenfastError):
    """This engine cannot run on this machine (no CUDA, a runtime not installed, ...)."""


def eager(sampler: Sampler) -> Sampler:
    """The reference: the model as trained, fp32, no changes."""
    return sampler


def fused(sampler: Sampler) -> Sampler:
    """Inference-optimised eager: BatchNorm folded into the layer before it (exact up to
    fp32 rounding), so each BN costs nothing at sampling time."""
    return rewrap(sampler, "fused", fold_batchnorm(sampler.module, conditional=sampler.conditional))


def rewrap(sampler: Sampler, engine: str, module, fn: Callable | None = None) -> Sampler:
    """A copy of `sampler` running `module` (through `fn` when the engine needs its own call)."""
    wrapped = Sampler.from_module(module, sampler.noise_shape, sampler.image_shape, sampler.class_names)
    return dataclasses.replace(wrapped, fn=fn or wrapped.fn, info=sampler.info | {"engine": engine})


ENGINES: dict[str, Callable[[Sampler], Sampler]] = {
    "eager": eager,
    "fused": fused,
    "bf16": lambda sampler: rewrap(sampler, "bf16", *bf16(sampler)),
    "compile": lambda sampler: rewrap(sampler, "compile", *compiled(sampler)),
    "onnx": lambda sampler: rewrap(sampler, "onnx", *onnx_runtime(sampler)),
}


def apply(sampler: Sampler, engine: str) -> Sampler:
    if engine not in ENGINES:
        raise GenfastError(f"unknown engine '{engine}'; choose one of: {', '.join(ENGINES)}")
    if sampler.module is None and engine != "eager":
        raise GenfastError(f"engine '{engine}' needs the sampler's network; load it with genfast.load")
    return ENGINES[engine](sampler)
