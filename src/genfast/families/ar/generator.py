"""What an `ar` sampler runs: noise and a condition -> tokens through a decoding strategy ->
pixels through the tokenizer's decoder, and the acceleration surface engines use.

The generator is a LoopNetwork (families/base.py): compile, onnx and cudagraph never
learn which strategy it runs. They ask for its fixed-shape part, which the strategy's
registry entry names (decoders.py): the static decoder's token step (one wrapped step
is kept per batch size, so compiling happens once per size, and its cache
buffers are reused), the full-sequence pass of jacobi, parallel and scales-naive, or
next-scale's whole decode (five passes whose shapes follow from the batch size: one
compiled program or one ONNX graph for all of them).
A recorder asks for the whole decode instead, which the static and scales decoders
offer: fixed length, no wait on a tensor's value, so one CUDA graph holds all of it;
ONNX Runtime replays static's as the chained calls of one exported function
(decoders.static_loop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from genfast.errors import GenfastError
from genfast.families.ar import decoders
from genfast.families.ar.model import ARNet
from genfast.families.ar.tokenizer import VQVAENet
from genfast.families.base import Exported, ExportedLoop, FixedPart, LoopNetwork, Wrap

PARTS = {"step": FixedPart("the static decoder's token step, its draw included"),
         "forward": FixedPart("the full-sequence pass"),
         "decode": FixedPart("the whole decode of static or scales: every pass and draw", whole=True)}


class ARGenerator(LoopNetwork):
    """noise (B, 3, T) and a condition -> pixels. `passes` is the last call's count of
    forward passes (per image: every row of the batch takes them together)."""

    def __init__(self, tokenizer: VQVAENet, net: ARNet, decode: str, options: decoders.Options,
                 wrap: Wrap | None = None, record: Wrap | None = None):
        super().__init__()
        check_decode(net.objective, decode)
        self.tokenizer, self.net = tokenizer, net
        self.decode, self.options, self.passes = decode, options, 0
        self.wrap, self.steps = wrap, {}
        strategy = decoders.DECODERS[decode]
        self.fixed = strategy.fixed  # which of its passes the wrapper wraps
        self.forward_pass = wrap(net) if wrap and self.fixed == "forward" else None
        # The recorder, and once made the whole decode as the engines run it (wrapped, where
        # the strategy's fixed part is the whole decode; recorded, where there is a recorder).
        self.record, self.whole = record, None

    def __getstate__(self):
        # The per-batch steps and the whole decode are caches (of compiled code, cache
        # buffers, graphs): a copy (bf16's deepcopy) starts without them and builds its own.
        return self.__dict__ | {"steps": {}, "whole": None}

    # --- the acceleration surface (LoopNetwork) ------------------------------------------

    def fixed_part(self) -> FixedPart | None:
        return None if self.fixed is None else PARTS[self.fixed]

    def recorded_part(self) -> FixedPart | None:
        return PARTS["decode"] if decoders.DECODERS[self.decode].recorded_passes else None

    def fixed_part_advice(self, recorded: bool) -> str:
        def offers(name: str) -> bool:
            strategy = decoders.DECODERS[name]
            return strategy.recorded_passes is not None if recorded else strategy.fixed is not None

        fitting = [name for name in decoders.fitting(self.net.objective) if offers(name)]
        why = (f"{self.decode} reads its tokens' values between passes" if recorded and self.fixed else
               f"{self.decode} has none")
        advice = f"use --decode {' or '.join(fitting)}" if fitting else \
            f"no strategy of this {self.net.objective} model has one"
        return f"{advice} ({why})"

    def with_fixed_part(self, wrap: Wrap) -> ARGenerator:
        inner = self.wrap
        return ARGenerator(self.tokenizer, self.net, self.decode, self.options,
                           wrap if inner is None else lambda part: wrap(inner(part)), self.record)

    def with_recorded_part(self, record: Wrap) -> ARGenerator:
        return ARGenerator(self.tokenizer, self.net, self.decode, self.options, self.wrap, record)

    def with_decoding(self, decode: str | None = None, **options) -> ARGenerator:
        changes = {key: value for key, value in options.items() if value is not None}
        return ARGenerator(self.tokenizer, self.net, decode or self.decode,
                           dataclasses.replace(self.options, **changes))

    # --- sampling ------------------------------------------------------------------------

    def static_step(self, rows: int, options: decoders.Options):
        """The sampled step for `rows` (options: this generator's own), wrapped by the
        engines' wrapper: built once per batch size, its cache buffers then reused."""
        if rows not in self.steps:
            step = decoders.SampledStep(self.net.static_step(rows, self.net.null.device), options)
            self.steps[rows] = _Wrapped(step, self.wrap(step)) if self.wrap and self.fixed == "step" else step
        return self.steps[rows]

    def tokens(self, noise: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        uniforms = torch.special.ndtr(noise.float())  # Gaussian noise -> uniforms, one set per position
        prefix = self.net.prefix(condition) if condition is not None else self.net.null_prefix(len(noise))
        whole = self.whole_decode()
        if whole is None:
            tokens, self.passes = self.run_strategy(prefix, uniforms)
            return tokens
        self.passes = decoders.DECODERS[self.decode].recorded_passes(self.tokenizer, self.net)  # fixed, as run
        return whole(prefix, uniforms)

    def whole_decode(self) -> Callable | None:
        """The whole decode as the engines made it, (prefix, uniforms) -> tokens, built on first
        use: wrapped when it is the strategy's fixed part, then recorded when there is a
        recorder. None when the strategy's own loop runs (around any wrapped part)."""
        wrapped = self.wrap is not None and self.fixed == "decode"
        if not wrapped and self.record is None:
            return None
        if self.whole is None:
            whole = _WholeDecode(self)
            whole = self.wrap(whole) if wrapped else whole
            self.whole = self.record(whole) if self.record else whole
        return self.whole

    def run_strategy(self, prefix: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, int]:
        network = decoders.Network(self.net, self.forward_pass, self.static_step, self.tokenizer)
        return decoders.DECODERS[self.decode].run(network, prefix, uniforms, self.options)

    def forward(self, noise: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokenizer.decode(self.tokens(noise, condition))


class _WholeDecode(nn.Module):
    """A generator's whole decode as one module, (prefix, uniforms) -> tokens: for a recorder
    (cudagraph's GraphReplay, which pads a batch to its bucket), the strategy over the
    generator's own (possibly compiled) steps, so their cache buffers are what it records;
    and for engines that wrap it whole (compile, onnx) where it is the strategy's fixed part."""

    def __init__(self, generator: ARGenerator):
        super().__init__()
        # Both networks as submodules: the recorder finds the device from their parameters, and
        # an export reads the tokenizer's weights (next-scale decoding runs its codebook) as
        # parameters, not as constants it cannot name.
        self.net, self.tokenizer = generator.net, generator.tokenizer
        self.run_strategy = generator.run_strategy
        self.decode, self.options = generator.decode, generator.options
        self.strategy = decoders.DECODERS[generator.decode]

    def forward(self, prefix: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return self.run_strategy(prefix, uniforms)[0]

    def exported(self) -> Exported:
        """This decode as one pure function for an exporting engine (onnx), the batch dynamic:
        it has no state between calls (a next-scale decode builds its cache inside)."""
        net, batch = self.net, torch.export.Dim("batch", min=1)
        example = (net.null_prefix(2).detach().clone(),  # torch.export specialises on a batch of 1
                   torch.full((2, 3, net.sequence_length), 0.5, device=net.null.device))
        return Exported(self, example, ({0: batch}, {0: batch}), ("decode", self.decode, dataclasses.astuple(
            self.options)), code=(self.strategy.run,))

    def exported_loop(self) -> ExportedLoop:
        """The same decode as chained calls of one exported function, for a runtime that
        replays them (onnx) instead of recording this module."""
        return self.strategy.exported_loop(self.net, self.options)


class _Wrapped:
    """A sampled step whose token steps run through an engine's wrapper; the prefill (one
    pass of another shape) runs as it is, on the same cache."""

    def __init__(self, step: decoders.SampledStep, run: Callable):
        self.step, self.run = step, run

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.step.prefill(prefix)

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return self.run(tokens, position, uniforms)


def check_decode(objective: str, decode: str) -> None:
    allowed = decoders.fitting(objective)
    if decode not in allowed:
        raise GenfastError(f"decode '{decode}' does not fit this {objective} model; choose one of: "
                           f"{', '.join(allowed)}")
