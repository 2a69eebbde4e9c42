"""ONNX: export a sampler's network, and run it with ONNX Runtime in fp32 or int8 (CPU; CUDA provider
when present); or, for a sampler that decodes in a loop (ar), its fixed part in fp32 on the CPU.

The export goes through torch.export (`torch.onnx.export(dynamo=True)`) with a dynamic
batch dimension, so one file serves every batch size. ONNX Runtime and the exporter's
helpers are optional dependencies (`pip install genfast[onnx]`); without them the engine
says so in one line.

Why a loop's part goes to ONNX Runtime: a token step of the ar transformer is ~100
small operators. On the 2-core AMD EPYC genfast is built on, PyTorch spends ~4 ms on
one (eager; torch.compile 2.2-3.6 ms): MKL takes ~100 us per
1x192 by 192x576 product (its small-matrix path, with the weights not yet in cache),
and a compiled call pays ~0.3 ms of guard checks. ONNX Runtime runs the same step in
~0.6 ms: its MLAS kernels read prepacked weights, and a node costs ~1-2 us. The part
keeps its state in its own buffers, bound to the session once (IO binding, no copy),
so a call costs its inputs' copies, the run, and the part's commit of its writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from genfast import machine
from genfast.checkpoint import weights_digest
from genfast.engines.fusion import fastest, fold_batchnorm
from genfast.engines.subpixel import subpixel
from genfast.errors import EngineUnavailable, GenfastError, GenfastWarning
from genfast.families.base import Exported, Sampler
from genfast.fileio import atomic_path, ensure_dir, user_cache, write_bytes, writing
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
    session = ort.InferenceSession(model, _session_options(ort), providers=providers)

    def generate(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        feed = {"noise": noise.cpu().numpy()}
        if labels is not None:
            feed["labels"] = labels.cpu().numpy()
        return torch.from_numpy(session.run(None, feed)[0])

    return generate


def _session_options(ort):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ONNX Runtime's threads spin for a while after each run, waiting for the next: on a
    # small machine they take the cores from whatever runs next (in bench, eager at
    # batch 1 went from 0.6 to 8 ms when timed after an ORT engine).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


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
    measured no better than min-max.

    BatchNorm's shift goes into the layer's bias, and a sub-pixel convolution adds its bias
    inside (not after the pixel shuffle), so QLinearConv adds it in int32 before quantising
    its output: each convolution's output, which ONNX Runtime re-quantises to 8 bits over
    one range for all its channels, then no longer carries every channel's offset. On
    gan-fashion-mnist (500 images of seed 3) that cut the error to eager from max 0.88 /
    mean 0.066 to 0.68 / 0.043. Most of what remains is that re-quantisation of every
    output (PyTorch's x86 inductor int8, which quantises only the inputs of its
    convolutions, measured mean 0.016 on the same images, max 1.35)."""
    _require()
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    network = subpixel(fold_batchnorm(sampler.module, conditional=sampler.conditional, into_bias=True))
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


class PartRuntime:
    """The onnx engine's wrapper of a looping network's fixed parts (families/base.py,
    `Exported`): each distinct part (its `key`) is exported once, with dynamic batch axes,
    into sessions that the parts of every batch size share; a part runs as an
    ExportedCall on its own state."""

    def __init__(self):
        self.sessions: dict[tuple, dict[int, object]] = {}

    def __call__(self, part) -> ExportedCall:
        exported = part.exported()
        if exported.key not in self.sessions:
            self.sessions[exported.key] = _part_sessions(exported)
        return ExportedCall(exported, self.sessions[exported.key])


def _part_sessions(exported: Exported) -> dict[int, object]:
    """Sessions of the exported part, one per thread count worth trying (1 and torch's):
    which is faster depends on the batch and the machine (see _Bound)."""
    ort = _require()
    path = exports_folder() / f"{_export_digest(exported)}.onnx"
    model = _read_export(path)
    if model is None:
        model = _export_part(exported)
        with contextlib.suppress(GenfastError):  # a cache that cannot be written only costs the next export
            ensure_dir(path.parent)
            write_bytes(path, model)
    sessions = {}
    for threads in sorted({1, torch.get_num_threads()}):
        options = _session_options(ort)
        options.intra_op_num_threads = threads
        sessions[threads] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    # The exporter falls back to fixed shapes when it cannot keep an axis dynamic: say so here,
    # not as a shape error at the first call of another batch size.
    for node, dynamic in zip(sessions[1].get_inputs(), _flat(exported.dynamic_shapes)):
        fixed = [axis for axis in dynamic if not isinstance(node.shape[axis], str)]
        if fixed:
            raise GenfastError(f"exporting {type(exported.module).__name__} fixed axis {fixed[0]} of its input "
                               f"{node.name}: the part's code specialises on a batch size")
    return sessions


def _export_part(exported: Exported) -> bytes:
    count = len(exported.example)
    with tempfile.TemporaryDirectory() as folder, _quiet():
        path = Path(folder) / "part.onnx"
        torch.onnx.export(exported.module.eval(), exported.example, str(path),
                          input_names=[f"input{i}" for i in range(count)],
                          dynamic_shapes=exported.dynamic_shapes, dynamo=True, external_data=False)
        return path.read_bytes()


# --- exports kept between processes ---------------------------------------------------------
# Exporting the ar step takes 5-10 s, which every `genfast sample`, serve start and bench run
# paid again. An export is kept in the user's cache under a digest of everything it is made
# from: the weights, the part's key (its sampling options), the example's shapes, the source
# of the genfast code it runs, and the exporter's versions. Anything else changed is another file.

def exports_folder() -> Path:
    """$GENFAST_EXPORTS, else onnx/ in genfast's cache folder."""
    return Path(os.environ["GENFAST_EXPORTS"]).expanduser() if os.environ.get("GENFAST_EXPORTS") else \
        user_cache() / "onnx"


def _export_digest(exported: Exported) -> str:
    digest = hashlib.sha256(repr((exported.key, _versions(),
                                  [(tuple(x.shape), str(x.dtype)) for x in exported.example])).encode())
    digest.update(weights_digest(exported.module).encode())
    sources = {inspect.getsourcefile(type(m)) for m in exported.module.modules()}
    for source in sorted(path for path in sources if path and Path(path).is_relative_to(_PACKAGE)):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:32]


_PACKAGE = Path(__file__).resolve().parents[1]  # genfast's own code: a change of it is a new export


def _versions() -> tuple[str | None, ...]:
    return tuple(machine.version(name) for name in ("torch", "onnx", "onnxscript", "onnxruntime"))


def _read_export(path: Path) -> bytes | None:
    """A kept export, or None when there is none or it does not parse as ONNX (a damaged file
    is exported again, with a one-line warning)."""
    try:
        model = path.read_bytes()
    except OSError:
        return None
    import onnx

    try:
        onnx.load_from_string(model)
    except Exception:  # protobuf's DecodeError, or anything a truncated file makes it raise
        warnings.warn(GenfastWarning(f"{path} is not a readable ONNX model; exporting again"), stacklevel=3)
        return None
    return model


def _flat(shapes) -> list[dict]:
    """torch.export's nested dynamic_shapes (a *args parameter is one tuple) as one entry per tensor."""
    return [axes for entry in shapes for axes in (_flat(entry) if isinstance(entry, (tuple, list)) else [entry])]


class ExportedCall:
    """Calls an exported part (inputs -> output) in ONNX Runtime through IO bindings, one
    per shape of the inputs, made on the first call of that shape: the call's inputs are
    copied into buffers of its own (as a CUDA graph's are), the part's state and the
    outputs are bound where they live, so a call makes no other copy. After each run the
    part commits its writes to its state; the output is returned as a copy, since the
    next run overwrites it."""

    def __init__(self, exported: Exported, sessions: dict[int, object]):
        self.exported, self.sessions = exported, sessions
        self.bound: dict[tuple, _Bound] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = tuple(tuple(x.shape) for x in inputs)
        if shapes not in self.bound:
            self.bound[shapes] = _Bound(self.sessions, inputs, self.exported.state)
        else:
            self.bound[shapes].run(inputs)
        bound = self.bound[shapes]
        self.exported.commit(bound.inputs, tuple(bound.outputs[1:]))
        return bound.outputs[0].clone()


TRIAL_RUNS = 5  # timed runs per thread count when a shape is first bound


class _Bound:
    """IO bindings of one input shape, one per session: the first run lets ONNX Runtime
    allocate the outputs (their shapes follow from the inputs'), and every binding then
    writes into those tensors. The session kept is the faster (fusion.fastest) over timed runs of
    this very call: on the 2-core AMD EPYC VM one thread ran the batch-1 ar step in
    ~0.6 ms and two in ~0.9 ms (a node is too small to split, and waking the second
    thread costs more than it saves), while larger batches gain from both. A run is pure
    (the commit comes after), so the trials change nothing."""

    def __init__(self, sessions: dict[int, object], inputs: tuple[torch.Tensor, ...],
                 state: tuple[torch.Tensor, ...]):
        self.inputs = tuple(x.detach().contiguous().clone() for x in inputs)
        first_threads, first = next(iter(sessions.items()))
        names = [node.name for node in first.get_outputs()]
        bindings = {}
        for threads, session in sessions.items():
            binding = session.io_binding()
            for node, tensor in zip(session.get_inputs(), (*self.inputs, *state)):
                _bind_tensor(binding.bind_input, node.name, tensor)
            bindings[threads] = binding
        allocating = bindings[first_threads]
        for name in names:
            allocating.bind_output(name, "cpu")
        first.run_with_iobinding(allocating)
        self.outputs = [torch.from_numpy(value.numpy()).clone() for value in allocating.get_outputs()]
        allocating.clear_binding_outputs()
        for binding in bindings.values():
            for name, tensor in zip(names, self.outputs):
                _bind_tensor(binding.bind_output, name, tensor)
        runs = {threads: (session, bindings[threads]) for threads, session in sessions.items()}
        self.threads = fastest(runs, lambda run: run[0].run_with_iobinding(run[1]), torch.device("cpu"),
                               repeats=TRIAL_RUNS, margin=1.0) if len(runs) > 1 else first_threads
        self.session, self.binding = sessions[self.threads], bindings[self.threads]

    def run(self, inputs: tuple[torch.Tensor, ...]) -> None:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.session.run_with_iobinding(self.binding)


def _bind_tensor(bind, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: ONNX Runtime reads contiguous memory; this tensor is a strided view")
    bind(name, "cpu", 0, torch.empty(0, dtype=tensor.dtype).numpy().dtype, list(tensor.shape), tensor.data_ptr())
