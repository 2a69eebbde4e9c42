"""ONNX: export a sampler's network, and run it with ONNX Runtime (CPU; CUDA provider when present).

The export goes through torch.export (`torch.onnx.export(dynamo=True)`) with a dynamic
batch dimension, so one file serves every batch size. ONNX Runtime and the exporter's
helpers are optional dependencies (`pip install genfast[onnx]`); without them the engine
says so in one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from genfast.families.base import Sampler
from genfast.fileio import atomic_path


def _require():
    from genfast.engines import EngineUnavailable

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
    module = sampler.module.eval()
    device = next(module.parameters()).device
    batch = torch.export.Dim("batch", min=1)
    noise = sampler.noise(2, 0).to(device)
    args, names, shapes = (noise,), ["noise"], ({0: batch},)
    if sampler.conditional:
        args, names, shapes = (noise, sampler.labels(2).to(device)), ["noise", "labels"], ({0: batch}, {0: batch})
    with atomic_path(Path(path)) as tmp, _quiet():
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


def onnx_runtime(sampler: Sampler):
    """(module, fn): fn runs an ONNX Runtime session of the exported network."""
    ort = _require()
    device = next(sampler.module.parameters()).device
    with tempfile.TemporaryDirectory() as folder:
        model = export(sampler, Path(folder) / "sampler.onnx").read_bytes()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(model, providers=providers)

    def generate(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        feed = {"noise": noise.cpu().numpy()}
        if labels is not None:
            feed["labels"] = labels.cpu().numpy()
        return torch.from_numpy(session.run(None, feed)[0])

    return sampler.module, generate
