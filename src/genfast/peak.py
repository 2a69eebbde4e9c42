"""The machine's peak, measured: how many FLOP/s this device reaches in each precision, on
the two kinds of work genfast's models are made of (matrix products and convolutions).

A figure like "9,000 images/s" says little until it is set against what the machine can
do: bench gives every row its achieved GFLOP/s and its fraction of the peak measured here,
in the precision that row computes in. The probe is short (about a second on 2 CPU cores,
less on a GPU) and measures rather than assumes (DESIGN.md, principle 7): on the AVX2-only
AMD EPYC VM bf16 matrix products run at ~1 GFLOP/s, 1% of fp32's ~90, which is what
bench's bf16 rows then show; with AVX-512 bf16 or AMX they run faster than fp32.

Each probe grows its problem (doubling) until one call takes PROBE_CALL_S and the rate
stops growing, so that a slow path (bf16 here) costs no more than a fast one, then keeps
the fastest of a few calls:
sharing the machine can only slow a call down, so the fastest is the closest to its peak.

What is measured, by device:
- CPU: fp32 and bf16 matrix products (torch.mm and a linear layer's, the faster) and 3x3
  convolutions (oneDNN, the faster layout); int8
  matrix products through ONNX Runtime's MatMulInteger (MLAS, the kernels behind the int8
  engine's QLinearConv and QGemm, with VNNI/AMX where the CPU has them), when it is installed.
- CUDA: fp32, bf16 and fp16 matrix products and convolutions (the same forms), and int8
  matrix products (torch._int_mm).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from genfast import timing

PROBE_CALL_S = 0.02      # a probe grows until one call takes this long (and its rate stops growing)...
PROBE_MAX_CALL_S = 0.12  # ...or the next would take longer than this
PROBE_BUDGET_S = 0.05    # ...then repeats for about this long, keeping the fastest call
KINDS = ("matmul", "conv")


@dataclass(frozen=True)
class Peak:
    device: str                # "cpu", or the CUDA device's name
    gflops: dict[str, float]   # "<dtype> <kind>" ("bf16 conv") -> the fastest rate measured, GFLOP/s (int8: GOP/s)
    seconds: float             # what the whole probe took

    def of(self, dtype: str, kind: str) -> tuple[str, float] | None:
        """(name, GFLOP/s) of the peak a computation in `dtype` mostly of `kind` is held to: that
        kind's, else the other kind's in the same dtype (int8 has matrix products only), else None."""
        for name in (f"{dtype} {kind}", *(f"{dtype} {other}" for other in KINDS if other != kind)):
            if name in self.gflops:
                return name, self.gflops[name]
        return None

    def line(self) -> str:
        """"measured peak GFLOP/s: fp32 matmul 91, ..., int8 matmul 95 (probe 0.9 s)"."""
        rates = ", ".join(f"{name} {value:,.3g}" for name, value in self.gflops.items())
        return f"measured peak GFLOP/s (int8: GOP/s): {rates} (probe {self.seconds:.1f} s)"


def measure(device: torch.device | str = "cpu") -> Peak:
    """This device's peak, probed now (module docstring); every rate is positive."""
    device = torch.device(device)
    start = time.perf_counter()
    cuda = device.type == "cuda"
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if cuda else [])
    gflops = {}
    for dtype in dtypes:
        for kind, problem in (("matmul", _matmul), ("conv", _conv)):
            gflops[f"{_name(dtype)} {kind}"] = max(
                _probe(lambda size, dtype=dtype, form=form, problem=problem: problem(size, dtype, device, form), device)
                for form in (False, True))
    int8 = _cuda_int8_matmul if cuda else _ort_int8_matmul
    if (rate := _probe(lambda size: int8(size, device), device, optional=True)) is not None:
        gflops["int8 matmul"] = rate
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Peak(name, gflops, time.perf_counter() - start)


@functools.cache
def _measured(device: str, threads: int) -> Peak:
    return measure(device)


def measured(device: torch.device | str = "cpu") -> Peak:
    """This device's peak at the current thread count, probed once per process (bench and
    auto in one process share the probe)."""
    return _measured(str(torch.device(device)), torch.get_num_threads())


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


Probe = Callable[[int], tuple[Callable[[], object], float] | None]


def _probe(make: Probe, device: torch.device, optional: bool = False) -> float | None:
    """GFLOP/s of the fastest call of `make(size)` (a call and its FLOPs; None past the
    largest size), the size doubling from 1 while a call takes under PROBE_CALL_S, or while
    the rate still grows by a tenth and the next call should stay under PROBE_MAX_CALL_S.
    (On a shared machine a tiny product can wait a scheduler's time slice, ~16 ms, for its
    second thread: then the rate, not the time alone, says the problem is large enough.)
    `optional`: a path that may be missing (make's first call None)."""
    size, best, rate = 1, None, 0.0
    while (made := make(size)) is not None:
        call, flops = made
        call()  # warm-up: first-call costs (weight packing, kernel selection) are not the peak
        seconds = timing.seconds(call, device)
        grew = flops / seconds > 1.1 * rate  # always at the first size: nothing to compare yet
        if best is None or flops / seconds > rate:
            best, rate = (call, flops, seconds), flops / seconds
        if seconds >= PROBE_CALL_S and not (grew and 2 * seconds < PROBE_MAX_CALL_S):
            break
        size *= 2
    if best is None:
        if optional:
            return None
        raise RuntimeError("a peak probe made no problem to time")
    call, flops, fastest = best
    deadline = time.perf_counter() + PROBE_BUDGET_S
    while time.perf_counter() < deadline:
        fastest = min(fastest, timing.seconds(call, device))
    return flops / fastest / 1e9


def _largest(device: torch.device) -> int:
    """The size multiplier past which a probe stops growing: enough to fill an H200 (a
    16,384-square product); on a CPU a 1,024-square product (2 AMD EPYC cores reached 86
    GFLOP/s at 512 and 91 at 1,024)."""
    return 128 if device.type == "cuda" else 8


def _matmul(size: int, dtype: torch.dtype, device: torch.device, as_linear: bool):
    """An n x n product, n = 128 * size: torch.mm, or (`as_linear`) a linear layer's product with
    its weight, which runs through other kernels (on the AMD EPYC VM in bf16: oneDNN's
    matmul at ~10 GFLOP/s where torch.mm took ~1.4)."""
    if size > _largest(device):
        return None
    n = 128 * size
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    if as_linear:
        return (lambda: torch.nn.functional.linear(a, b)), 2.0 * n ** 3
    return (lambda: torch.mm(a, b)), 2.0 * n ** 3


def _conv(size: int, dtype: torch.dtype, device: torch.device, channels_last: bool):
    """A 3x3 convolution of 64 channels over 32x32 (the shape of a generator's middle layer),
    `size` images at a time (at most 16 on a CPU, 151 MFLOP each; 1,024 on a GPU), in either
    layout: which is the fast one differs by precision (bf16 on the AMD EPYC VM: 15 GFLOP/s
    channels_last, 2 contiguous)."""
    if size > (1024 if device.type == "cuda" else 16):
        return None
    layout = torch.channels_last if channels_last else torch.contiguous_format
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False, device=device, dtype=dtype).eval()
    conv = conv.to(memory_format=layout)
    x = torch.randn(size, 64, 32, 32, device=device).to(dtype).contiguous(memory_format=layout)

    def call():
        with torch.inference_mode():
            return conv(x)

    return call, 2.0 * size * 64 * 64 * 9 * 32 * 32


def _cuda_int8_matmul(size: int, device: torch.device):
    if size > _largest(device):
        return None
    n = 128 * size
    a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
    return (lambda: torch._int_mm(a, b)), 2.0 * n ** 3


def _ort_int8_matmul(size: int, device: torch.device):
    """uint8 x int8 -> int32 products in an ONNX Runtime session (the int8 engine's kernels),
    the weight a constant as the engine's are; None without ONNX Runtime."""
    if size > _largest(device):
        return None
    try:
        import numpy as np
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    n = 128 * size
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-128, 128, (n, n), dtype=np.int8), "weight")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "weight"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return (lambda: session.run(None, {"x": x})), 2.0 * n ** 3
