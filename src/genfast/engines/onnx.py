"""ONNX: export a sampler's network, and run it with ONNX Runtime in fp32 or int8 (CPU; CUDA provider
when present); or, for a sampler that decodes in a loop (ar), its whole decode (static) or its
fixed pass (jacobi, parallel) in fp32 on the CPU.

The export goes through torch.export (`torch.onnx.export(dynamo=True)`) with a dynamic
batch dimension, so one file serves every batch size. ONNX Runtime and the exporter's
helpers are optional dependencies (`pip install genfast[onnx]`); without them the engine
says so in one line.

Why a loop's part goes to ONNX Runtime: a token step of the ar transformer is ~100
small operators. On the 2-core AMD EPYC genfast is built on, PyTorch spends ~4 ms on
one (eager; torch.compile 2.2-3.6 ms): MKL takes ~100 us per
1x192 by 192x576 product (its small-matrix path, with the weights not yet in cache),
and a compiled call pays ~0.3 ms of guard checks. ONNX Runtime runs the same step in
~0.5 ms: its MLAS kernels read prepacked weights, and a node costs ~1-2 us. The static
decode runs as one function's chained calls (LoopRuntime), each bound once to its views
of the loop's buffers (IO binding, no copy): its cache, tokens and noise stay where they
are from the first call to the last, and a token costs ONNX Runtime's run alone.
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
from genfast.engines.compiled import bucket, padded
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
    """The onnx engine's wrapper of a looping network's fixed pass (jacobi's and parallel's
    full-sequence pass, families/base.py `Exported`): each distinct part (its `key`) is
    exported once, with dynamic batch axes, into sessions that every batch size shares."""

    def __init__(self):
        self.sessions: dict[tuple, dict[int, object]] = {}

    def __call__(self, part) -> ExportedCall:
        return ExportedCall(self.sessions_of(part.exported()))

    def sessions_of(self, exported: Exported) -> dict[int, object]:
        if exported.key not in self.sessions:
            self.sessions[exported.key] = _part_sessions(exported)
        return self.sessions[exported.key]


class WholeRuntime(PartRuntime):
    """The onnx engine's wrapper of a whole decode that is one exported function (next-scale's:
    families/base.py `FixedPart.whole`): one export with a dynamic batch, called at the batch's
    bucket (padded to a power of two, as ReplayedLoop is), since each new input shape costs its
    IO bindings and thread trials, and a server's batches come in every size."""

    def __call__(self, part) -> BucketedCall:
        return BucketedCall(super().__call__(part))


class BucketedCall:
    """An ExportedCall made at the bucket of each call's batch; every input is a batch."""

    def __init__(self, call: ExportedCall):
        self.call = call

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = len(inputs[0])
        return self.call(*padded(inputs, bucket(n)))[:n]


class LoopRuntime(PartRuntime):
    """The onnx engine's recorder of a looping network's whole decode (the static decoder's:
    families/base.py `ExportedLoop`): its one function exported once per distinct loop (its
    `key`), and replayed per batch bucket as the loop's calls, each bound once to its views
    of the loop's buffers (ReplayedLoop). Why: a call costs ONNX Runtime's run alone, where
    the step wrapped on its own also paid PyTorch's copies of its inputs, of its cache writes
    and of its output, and an eager prefill, ~40% of a batch-1 decode."""

    def __call__(self, part) -> ReplayedLoop:
        loop = part.exported_loop()
        return ReplayedLoop(loop, self.sessions_of(loop.call))


def _part_sessions(exported: Exported) -> dict[int, object]:
    """Sessions of the exported part, one per thread count worth trying (1 and torch's):
    which is faster depends on the batch and the machine (see _fewer_threads_if_faster)."""
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
    sources |= {inspect.getsourcefile(function) for function in exported.code}
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
    copied into buffers of its own (as a CUDA graph's are) and the output is bound where
    it lives, so a call makes no other copy; it returns a copy of the output, since the
    next run overwrites it."""

    def __init__(self, sessions: dict[int, object]):
        self.sessions = sessions
        self.bound: dict[tuple, _Bound] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = tuple(tuple(x.shape) for x in inputs)
        if shapes not in self.bound:
            self.bound[shapes] = _Bound(self.sessions, inputs)
        else:
            self.bound[shapes].run(inputs)
        return self.bound[shapes].output.clone()


class _Bound:
    """IO bindings of one input shape, one per session (the first run lets ONNX Runtime
    allocate the output, whose shape follows from the inputs'; every binding then writes
    into that tensor), and the session kept for it (_fewer_threads_if_faster)."""

    def __init__(self, sessions: dict[int, object], inputs: tuple[torch.Tensor, ...]):
        with torch.inference_mode(False):  # buffers that a call outside inference_mode may write too
            self.inputs = tuple(x.detach().contiguous().clone() for x in inputs)
        first = next(iter(sessions.values()))
        [name] = [node.name for node in first.get_outputs()]
        allocating = first.io_binding()
        for node, tensor in zip(first.get_inputs(), self.inputs):
            _bind_tensor(allocating.bind_input, node.name, tensor)
        allocating.bind_output(name, "cpu")
        first.run_with_iobinding(allocating)
        self.output = torch.from_numpy(allocating.get_outputs()[0].numpy()).clone()
        self.session, [self.binding] = _fewer_threads_if_faster(sessions, [(self.inputs, (self.output,))])

    def run(self, inputs: tuple[torch.Tensor, ...]) -> None:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.session.run_with_iobinding(self.binding)


class ReplayedLoop:
    """An exported loop run in ONNX Runtime: per batch bucket (the batch padded to a power of
    two, as cudagraph's recordings are), its plan's buffers, one IO binding per call and the
    session for them (_fewer_threads_if_faster: the batch-1 calls run faster on one thread,
    larger batches on all), made on the first call of that bucket; a loop then costs the
    plan's `load`, one run per call and its `result`. Buckets, not every batch size: a
    server's passes come in every size, and each new one would pay a plan and its trials
    (measured: serving at 64 clients, batching on fell to 0.89x of off without them). Every
    argument is a batch; rows are independent, so padding rows change no other row."""

    def __init__(self, loop, sessions: dict[int, object]):
        self.loop, self.sessions = loop, sessions
        self.bound: dict[int, tuple] = {}

    def __call__(self, *arguments: torch.Tensor) -> torch.Tensor:
        n = len(arguments[0])
        size = bucket(n)
        if size not in self.bound:
            plan = self.loop.plan(size)
            self.bound[size] = (plan, *_fewer_threads_if_faster(self.sessions, plan.calls))
        plan, session, bindings = self.bound[size]
        plan.load(*padded(arguments, size))
        run = session.run_with_iobinding
        for binding in bindings:
            run(binding)
        return plan.result()[:n]


TRIAL_ROUNDS = 3  # timed rounds per thread count when a shape is first bound
TRIAL_SHARE = 8   # a round runs every 8th call of a loop


def _fewer_threads_if_faster(sessions: dict[int, object], calls: list[tuple[tuple, tuple]]) -> tuple[object, list]:
    """The session to run `calls` (each: its input and output tensors) and their IO bindings
    in it. With more than one session (thread counts), the one that runs them faster
    (fusion.fastest, interleaved rounds of every TRIAL_SHARE-th call: the calls of a loop
    differ in cost, and one call timed alone varied by 30% between runs). On the 2-core AMD
    EPYC VM one thread ran the batch-1 static decode in 16 ms and two in 22 (a node is too
    small to split, and waking the second thread costs more than it saves); at batch 64 two
    threads took 258 ms and one 349. A call's run writes only its own outputs, which the
    real run overwrites before anything reads them, so the trials change nothing."""
    bindings = {}
    for threads, session in sessions.items():
        inputs, outputs = [node.name for node in session.get_inputs()], [node.name for node in session.get_outputs()]
        bindings[threads] = []
        for call_inputs, call_outputs in calls:
            binding = session.io_binding()
            for name, tensor in zip(inputs, call_inputs):
                _bind_tensor(binding.bind_input, name, tensor)
            for name, tensor in zip(outputs, call_outputs):
                _bind_tensor(binding.bind_output, name, tensor)
            bindings[threads].append(binding)
    threads = next(iter(sessions))
    if len(sessions) > 1:
        def run(count: int) -> None:
            for binding in bindings[count][::TRIAL_SHARE]:
                sessions[count].run_with_iobinding(binding)

        threads = fastest({count: count for count in sessions}, run, torch.device("cpu"), repeats=TRIAL_ROUNDS,
                          margin=1.0)
    return sessions[threads], bindings[threads]


def _bind_tensor(bind, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: ONNX Runtime reads contiguous memory; this tensor is a strided view")
    bind(name, "cpu", 0, torch.empty(0, dtype=tensor.dtype).numpy().dtype, list(tensor.shape), tensor.data_ptr())
