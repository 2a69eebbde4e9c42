"""int8 in PyTorch itself: export-based quantisation (PT2E) with the x86 inductor quantiser,
compiled by inductor into oneDNN's int8 convolutions and matrix products, which use VNNI
(AVX-512 VNNI, AVX-VNNI) or AMX int8 tiles where the CPU has them.

Beside the `int8` engine (ONNX Runtime's QDQ kernels, engines/onnx.py) this is the other
int8 path the issue asked to measure. What differs:

- Error. ONNX Runtime's QLinearConv re-quantises every convolution's output to 8 bits;
  the x86 quantiser quantises only the inputs of convolutions and linear layers (int8
  weights per output channel, uint8 activations per tensor), and oneDNN hands out fp32.
  On gan-fashion-mnist (256 images of seed 0) that measured mean 0.016 to eager, against
  0.043 for ONNX Runtime's (0.066 before its bias fix); max 1.35 against 0.68 (a few pixels).
- Speed needs the instructions. Without VNNI, oneDNN's int8 runs through `vpmaddubsw` +
  `vpmaddwd` at about the fp32 rate: on the AVX2-only AMD EPYC VM it measured 1.03x eager
  at batch 256 (ONNX Runtime's int8: 1.86x in the same run, a moment when the shared
  cores ran eager at a third of its usual speed), after a 20 s compilation. So the engine
  says it is unavailable on such a CPU rather than run slower than `int8`.
- torch 2.13 no longer ships PT2E (`torch.ao.quantization.quantize_pt2e` is gone): it
  lives in torchao (`pip install torchao`; 0.18 checked with torch 2.13.0).

The network is prepared as for `int8`: BatchNorm folded into the layers' biases, and
transposed convolutions rewritten as sub-pixel convolutions (subpixel.py), which the
quantiser annotates; then exported with a dynamic batch, calibrated on the same noise
as `int8`, converted, and compiled with freezing (which is what lowers the quantised
pattern to oneDNN's int8 kernels), batch sizes bucketed as for `compile`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from genfast import machine
from genfast.engines.compiled import Bucketed
from genfast.engines.fusion import fold_batchnorm
from genfast.engines.onnx import CALIBRATION_BATCH, CALIBRATION_BATCHES, CALIBRATION_SEED
from genfast.engines.subpixel import subpixel
from genfast.errors import EngineUnavailable
from genfast.families.base import Sampler

# The instruction sets with which oneDNN's int8 kernels beat its fp32 ones (one is enough).
INT8_INSTRUCTIONS = ("avx512_vnni", "avx_vnni", "amx_int8")


def require_int8_instructions(engine: str) -> None:
    """EngineUnavailable, in one line, on a CPU without VNNI or AMX int8."""
    if not any(machine.has(flag) for flag in INT8_INSTRUCTIONS):
        here = machine.current()
        raise EngineUnavailable(f"'{engine}' needs VNNI or AMX int8 instructions, which this CPU ({here.cpu}: "
                                f"{', '.join(here.flags) or 'no AVX2'}) lacks; 'int8' runs ONNX Runtime's int8 "
                                f"kernels instead")


class _Called(nn.Module):
    """The sampler's calling convention, (noise, labels), around the exported network, which
    takes noise alone when the model is unconditional."""

    def __init__(self, network: nn.Module, conditional: bool):
        super().__init__()
        self.network, self.conditional = network, conditional

    def forward(self, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(noise, labels) if self.conditional else self.network(noise)


@contextlib.contextmanager
def _quiet_torchao():
    """torchao warns, on import, of each of its CUDA kernel libraries that a CPU build of torch
    cannot load (none is used here), and torch of a deprecated call torchao makes."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def inductor_int8(sampler: Sampler) -> Bucketed:
    """The sampler's network quantised by PT2E's x86 inductor quantiser (module docstring)."""
    require_int8_instructions("int8-inductor")
    if sampler.device.type != "cpu":
        raise EngineUnavailable("'int8-inductor' runs on the CPU (its kernels are oneDNN's); on CUDA use bf16 or fp16")
    try:
        with _quiet_torchao():
            import torchao  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise EngineUnavailable("'int8-inductor' needs torchao, where PyTorch's export-based quantisation now "
                                "lives: pip install torchao") from None

    network = subpixel(fold_batchnorm(sampler.module, conditional=sampler.conditional, into_bias=True)).eval()
    labels = sampler.labels(CALIBRATION_BATCH)
    batch = torch.export.Dim("batch", min=1)
    example = (sampler.noise(CALIBRATION_BATCH, 0),) + ((labels,) if sampler.conditional else ())
    # strict (dynamo-traced) export: it records each node's source layer (`source_fn_stack`),
    # by which the x86 quantiser finds convolutions. torch 2.13's default non-strict export
    # records none, and the quantiser then annotated the linear layer only: the convolutions,
    # 95% of the work, ran in fp32 (1.03x eager at batch 256 on the AMX Xeon).
    exported = torch.export.export(network, example, dynamic_shapes=tuple({0: batch} for _ in example),
                                   strict=True).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():  # the observers record each input's range
        for noise in sampler.noise(CALIBRATION_BATCHES * CALIBRATION_BATCH, CALIBRATION_SEED).split(CALIBRATION_BATCH):
            prepared(noise, *example[1:])
    converted = allow_exported_model_train_eval(convert_pt2e(prepared))  # eval() is then a no-op, not an error
    # Frozen only: freezing is what turns the quantised pattern into oneDNN's int8 kernels.
    return Bucketed(_Called(converted, sampler.conditional), freezing=(True,))
