"""ONNX: export a sampler's network, and run it with ONNX Runtime in fp32 or int8 (CPU; CUDA provider
when present).

The export goes through torch.export (`torch.onnx.export(dynamo=True)`) with a dynamic
batch dimension, so one file serves every batch size. ONNX Runtime and the exporter's
helpers are optional dependencies (`pip install genfast[onnx]`); without them the engine
says so in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from genfast.engines.fusion import fold_batchnorm
from genfast.engines.subpixel import subpixel
from genfast.errors import EngineUnavailable
from genfast.families.base import Sampler
from genfast.fileio import atomic_path, writing
from genfast.seeding import MAX_SEED


def _require():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(f"the onnx engine needs {e.name}: pip install 'genfast[onnx]'") from None
    return onnxruntime


def export(sampler: Sampler, path: Path) -> Path:
    """Write the sampler's network as ONNX: inputs noise (and labels), output images in [-1, 1]."""
    _require()
    module, device = sampler.module.eval(), sampler.device
    batch = torch.export.Dim("batch", min=1)
    noise = sampler.noise(2, 0).to(device)
    args, names, shapes = (noise,), ["noise"], ({0: batch},)
    if sampler.conditional:
        args, names, shapes = (noise, sampler.labels(2).to(device)), ["noise", "labels"], ({0: batch}, {0: batch})
    with writing(Path(path)), atomic_path(Path(path)) as tmp, _quiet():
        torch.onnx.export(module, args, str(tmp), input_names=names, output_names=["images"],
                          dynamic_shapes=shapes, dynamo=True, external_data=False)
    return Path(path)


@contextlib.contextmanager
def _quiet():
    """The exporter reports progress on stdout and logs/warns about things that do not
    concern us (torchvision's operators, its own deprecations): keep the CLI's output ours."""
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_log.setLevel(level)


def _session(model: bytes, device: torch.device):
    """An ONNX Runtime session of `model` and the call that feeds it noise and labels."""
    ort = _require()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ONNX Runtime's threads spin for a while after each run, waiting for the next: on a
    # small machine they take the cores from whatever runs next (in bench, eager at
    # batch 1 went from 0.6 to 8 ms when timed after an ORT engine).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=providers)

    def generate(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        feed = {"noise": noise.cpu().numpy()}
        if labels is not None:
            feed["labels"] = labels.cpu().numpy()
        return torch.from_numpy(session.run(None, feed)[0])

    return generate


def onnx_runtime(sampler: Sampler):
    """The exported network in an ONNX Runtime session."""
    with tempfile.TemporaryDirectory() as folder:
        model = export(sampler, Path(folder) / "sampler.onnx").read_bytes()
    return _session(model, sampler.device)


CALIBRATION_SEED = MAX_SEED  # noise for calibration: a seed no default run uses
CALIBRATION_BATCHES, CALIBRATION_BATCH = 8, 64


def int8_runtime(sampler: Sampler):
    """Static int8 quantisation with ONNX Runtime, calibrated on the sampler's own noise.

    BatchNorm is folded first and transposed convolutions become convolutions (ONNX
    Runtime has no int8 ConvTranspose; subpixel.py), then every Gemm/Conv gets int8
    weights (per output channel) and uint8 activations whose ranges were observed on
    CALIBRATION_BATCHES batches of noise (with labels cycling through the classes). The
    QDQ graph is fused by ONNX Runtime into QGemm / QLinearConv / QLinearLeakyRelu.

    The first matrix multiply, the one that reads the noise, stays fp32: with it in int8
    the mean pixel error to eager was 0.054 (GAN) and 0.021 (VAE), without 0.047 and
    0.017, at 9% of the generator's arithmetic. Percentile and entropy calibration
    measured no better than min-max."""
    _require()
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    network = subpixel(fold_batchnorm(sampler.module, conditional=sampler.conditional))
    noise = sampler.noise(CALIBRATION_BATCHES * CALIBRATION_BATCH, CALIBRATION_SEED).split(CALIBRATION_BATCH)
    labels = sampler.labels(CALIBRATION_BATCH)

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"noise": z.numpy()} | ({} if labels is None else {"labels": labels.numpy()})
                               for z in noise])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as folder, _quiet():
        folder = Path(folder)
        export(dataclasses.replace(sampler, module=network), folder / "fp32.onnx")
        quant_pre_process(str(folder / "fp32.onnx"), str(folder / "prepared.onnx"))
        first_matmul = next(node.name for node in onnx.load(folder / "prepared.onnx").graph.node
                            if node.op_type in ("Gemm", "MatMul", "Conv"))
        quantize_static(str(folder / "prepared.onnx"), str(folder / "int8.onnx"), Calibration(),
                        quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_exclude=[first_matmul],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = (folder / "int8.onnx").read_bytes()
    return _session(model, sampler.device)
