"""The one training loop. Families own their loss; this owns everything around it.

Seeds, devices, mixed precision, the progress bar, the logs (TensorBoard, and W&B when
asked), sample grids, checkpoints, resume and divergence checks live here, so every family gets them
the same way (after minGPT's trainer, which knows nothing about the model).

Randomness is a pure function of (seed, step): the data order of epoch e is a
permutation drawn from the stream (seed, e), and the noise of step s (and the dropout
masks) from the stream (seed, s, process), each its own (seeding.py). A resumed run therefore draws
exactly what the uninterrupted run would have drawn, and needs no RNG state in the
checkpoint. (On a CPU the two end bit-identical; CUDA kernels are not bitwise
deterministic, so there they end merely equivalent.)

Several processes (torchrun, or `genfast train --nproc N`) train one model with
DistributedDataParallel. `batch_size` is the global batch: each of N processes takes
1/N of it, and the sampler hands process r the rows r, r+N, ... of the same epoch
order, so a step sees the same images whatever N is, and the averaged gradient is the
same mean over them. What differs with N: the noise (process r draws its own, from
the stream (seed, step, r)), BatchNorm statistics (per process unless --sync-bn)
and the order of floating-point sums. Rank 0 alone writes checkpoints, samples and
logs; the checkpoint holds the bare networks, so a run resumes at any N.

A run is first a plan (`plan_run`: a pure function of the family, the options, the
config asked for, the saved run if resuming, and the world; every rule about what a
run may be is there and unit-tested), then a set-up (`_set_up`: networks, optimizers,
restored state) and a loop that reads top to bottom (`_loop`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from genfast import checkpoint, data, distributed, images, pretrained, seeding
from genfast import config as configlib
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import Family, get_family
from genfast.fileio import write_bytes

CHECKPOINT_NAME = "checkpoint.safetensors"
DEFAULT_DATA = "fashion-mnist"
DEFAULT_EPOCHS = 5
# Config fields the data set decides; a user setting them would be silently overruled.
DATA_KEYS = ("channels", "num_classes")
CPU = torch.device("cpu")


@dataclass
class TrainOptions:
    out: Path
    data: str | None = None        # default DEFAULT_DATA; a resumed run keeps its own
    epochs: int | None = None      # total epochs of the run; default DEFAULT_EPOCHS
    steps: int | None = None       # or total optimisation steps (wins over epochs)
    seed: int | None = None        # default 0; a resumed run keeps its own
    resume: bool = False
    init: str | None = None        # a new run starting from this checkpoint's weights (path or shipped name)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str | None = None   # auto (default: by probe_precision) | fp32 | bf16 autocast; a resumed run
    #                                keeps its own unless told fp32 or bf16
    sample_every: int = 500        # steps between sample grids (and at the end)
    checkpoint_every: int = 500    # steps between checkpoints (and at the end, and on Ctrl-C)
    log_every: int = 10            # steps between logged scalars
    log: tuple[str, ...] = ("tensorboard",)  # where scalars and sample grids go: names in LOG_TARGETS
    max_loss_growth: float = 1e4   # a loss this many times its first value (or NaN/inf) stops the run
    progress: bool = True
    sync_batchnorm: bool = False   # several GPU processes: BatchNorm statistics over the global batch

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out) / CHECKPOINT_NAME


def _seed_step(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Puts the global generators (dropout masks) on the stream of step `step` in process
    `rank`, and returns the generator the family draws that step's noise from."""
    seeding.seed_global(device, seed, "train-dropout", step, rank)
    return seeding.generator(seed, "train-noise", step, rank, device=device)


def _epoch_order(train_size: int, seed: int, epoch: int, here: distributed.World) -> torch.Tensor:
    """This process's rows of epoch `epoch`: the shuffled order's rows rank, rank + N, ...
    (what DistributedSampler with drop_last hands out, but shuffled from the stream (seed,
    epoch): its own seeding adds epoch to a seed that torch then cuts to 32 bits)."""
    usable = train_size // here.size * here.size
    order = torch.randperm(train_size, generator=seeding.generator(seed, "data-order", epoch))
    return order[:usable][here.rank::here.size]


class _LogTarget:
    """Where a run's scalars and sample grids go (one entry of LOG_TARGETS). A target is
    opened by rank 0 alone, in the run folder, once the run is known to be possible."""

    name = ""  # what --log calls it

    @classmethod
    def check_installed(cls) -> None:
        """Raise a GenfastError naming what to install when the target's library is missing:
        asked before any work, so a run never stops for it half-way."""

    def __init__(self, out: Path, start: int, run_config: dict[str, Any]):
        """`start`: the step a resumed run continues from (0 for a new one); `run_config`:
        the family, the data set, the config and the run's facts, for targets that keep them."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        raise NotImplementedError

    def add_images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        """`batch`: uint8 (N, C, H, W), the sample grid's images."""
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        """`failed` while another error is on its way: that one is what the user must read."""


class _TensorBoard(_LogTarget):
    """TensorBoard's writer (in tb/), its file errors (a full disk) one line like every other
    write's. Its events are written by a thread, which hands an error to the next call here
    (where it becomes the one line), after printing it itself: that print is silenced."""

    name = "tensorboard"

    def __init__(self, out: Path, start: int, run_config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # 0.3 s to import: only when training

        _quiet_writer_thread_errors()
        self.folder = out / "tb"
        # purge_step: a resumed run drops events logged after its checkpoint by the run it
        # continues (the checkpoint of step `start` was written after that step's events).
        self.writer = self._guarded(SummaryWriter, str(self.folder), purge_step=start + 1 if start else None)

    def _guarded(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except OSError as e:
            raise GenfastError(f"cannot write TensorBoard logs in {self.folder}: {e.strerror or e}; free some space "
                               f"or choose another --out (checkpoints already written are kept)") from None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._guarded(self.writer.add_scalar, tag, value, step)

    def add_images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        self._guarded(self.writer.add_images, tag, batch, step, dataformats="NCHW")

    def close(self, failed: bool = False) -> None:
        try:
            self._guarded(self.writer.close)
        except GenfastError:
            if not failed:
                raise


def _quiet_writer_thread_errors() -> None:
    """Once per process: TensorBoard's writer thread no longer prints the file errors it
    hands on to the writer's next call (any other thread's exception prints as before)."""
    if getattr(threading.excepthook, "genfast", False):
        return
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook

    def quiet(args):
        if not (isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError)):
            previous(args)

    quiet.genfast = True
    threading.excepthook = quiet


WANDB_ID_NAME = "wandb-run-id"  # in the run folder: the W&B run a resumed run continues


class _WandB(_LogTarget):
    """Weights & Biases, through the `wandb` library: the same scalars and sample grids as
    TensorBoard, plus the run's config. Offline unless WANDB_MODE says otherwise, so that a
    run never waits on a network or a login: W&B writes the run under wandb/ in the run
    folder, and `wandb sync` uploads it later. The run's W&B id is kept in the run folder,
    so a resumed run continues the same W&B run (its steps after the checkpoint's)."""

    name = "wandb"

    @classmethod
    def check_installed(cls) -> None:
        try:
            import wandb  # noqa: F401  (1-3 s to import: only when asked for)
        except ImportError:
            raise GenfastError("--log wandb needs the wandb library: pip install 'genfast[wandb]'") from None

    def __init__(self, out: Path, start: int, run_config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        id_path = out / WANDB_ID_NAME
        run_id = id_path.read_text().strip() if start and id_path.exists() else uuid.uuid4().hex[:12]
        write_bytes(id_path, run_id.encode() + b"\n")
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = self._guarded("start the run", wandb.init, dir=str(out), id=run_id, resume="allow", mode=self.mode,
                                 project=os.environ.get("WANDB_PROJECT") or "genfast", name=out.name,
                                 config=run_config, settings=wandb.Settings(console="off"))

    def _guarded(self, what: str, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except (OSError, self.wandb.errors.Error) as e:
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            hint = "free some space or choose another --out" if self.mode == "offline" else \
                "WANDB_MODE=offline logs locally, for a later wandb sync"
            raise GenfastError(f"W&B could not {what}: {why}; {hint} (checkpoints already written are kept)") from None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        # Rows of one step gather until a later step is logged (W&B's step only grows).
        self._guarded("log", self.run.log, {tag: value}, step=step)

    def add_images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        grid = images.make_grid(batch)  # one picture, as TensorBoard shows the batch
        picture = self.wandb.Image(grid[..., 0] if grid.shape[-1] == 1 else grid)
        self._guarded("log", self.run.log, {tag: picture}, step=step)

    def close(self, failed: bool = False) -> None:
        try:
            self._guarded("finish the run", self.run.finish, exit_code=1 if failed else 0)
        except GenfastError:
            if not failed:
                raise


# Every place a run can log to, by the name --log takes.
LOG_TARGETS: dict[str, type[_LogTarget]] = {target.name: target for target in (_TensorBoard, _WandB)}


def check_log_targets(names: tuple[str, ...]) -> None:
    """Unknown names and missing libraries, said before any work (no names: a run that logs nowhere)."""
    if unknown := [name for name in names if name not in LOG_TARGETS]:
        raise GenfastError(f"unknown log target '{unknown[0]}'; choose from {', '.join(LOG_TARGETS)}, "
                           f"or several joined by commas")
    for name in names:
        LOG_TARGETS[name].check_installed()


class _Silent:
    """The logs of a process that is not rank 0: it writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Logs:
    """The run's log targets, each told the same thing, in the order --log named them."""

    def __init__(self, names: tuple[str, ...], out: Path, start: int, run_config: dict[str, Any]):
        self.targets: list[_LogTarget] = []
        try:
            for name in names:
                self.targets.append(LOG_TARGETS[name](out, start, run_config))
        except BaseException:
            self.close(failed=True)  # the ones already open are not left half-written
            raise

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for target in self.targets:
            target.add_scalar(tag, value, step)

    def add_images(self, tag: str, batch: torch.Tensor, step: int) -> None:
        for target in self.targets:
            target.add_images(tag, batch, step)

    def close(self, failed: bool = False) -> None:
        """Every target is closed, whichever fails; the first failure is the one said."""
        errors = []
        for target in self.targets:
            try:
                target.close(failed)
            except GenfastError as e:
                errors.append(e)
        if errors:
            raise errors[0]


PRECISIONS = ("auto", "fp32", "bf16")  # what --precision takes; auto resolves to one of the others


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise GenfastError(f"unknown precision '{precision}'; use {', '.join(PRECISIONS)}")


PRECISION_MARGIN = 1.1  # bf16 must beat fp32 by this much: autocast's casts cost what a near tie gains
PROBE_ROUNDS = 3        # timed rounds of the probe step in each precision, after one warm-up


@functools.cache
def probe_precision(device: torch.device, threads: int) -> tuple[str, str]:
    """(bf16 or fp32, one line saying why): the precision `--precision auto` trains in here.

    A miniature training step, the two kinds of work genfast's networks do (a linear layer
    and a 3x3 convolution, forward and backward) is timed under bf16 autocast and in fp32,
    interleaved; bf16 is kept where it is PRECISION_MARGIN faster. Measured, not assumed
    from the CPU's flags (DESIGN.md, principle 7): on the AVX2-only AMD EPYC VM bf16 ran it
    at ~0.1x fp32's speed; AVX-512 bf16 / AMX CPUs and GPUs run it faster. Once per
    process, device and thread count (`threads`: the cache key; the probe runs at torch's)."""
    scale = 8 if device.type == "cuda" else 1  # a GPU needs more work per call than its launch overhead
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(512, 512).to(device)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(device)
    rows = torch.randn(256 * scale, 512, generator=generator).to(device)
    planes = torch.randn(8 * scale, 32, 16, 16, generator=generator).to(device)

    def step(precision: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        with _autocast(device, precision):
            loss = linear(rows).square().mean() + conv(planes).square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - begin

    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(PROBE_ROUNDS + 1):  # the first round warms up and is dropped
        for precision, times in seconds.items():
            times.append(step(precision))
    ratio = statistics.median(seconds["fp32"][1:]) / statistics.median(seconds["bf16"][1:])
    chosen = "bf16" if ratio >= PRECISION_MARGIN else "fp32"
    return chosen, (f"precision auto: {chosen} (a probe training step under bf16 autocast ran at {ratio:.2f}x "
                    f"fp32's speed on {device}; bf16 needs {PRECISION_MARGIN}x)")


@contextlib.contextmanager
def _stop_between_steps():
    """The first Ctrl-C asks the loop to stop after the step in progress (so the saved
    checkpoint is a whole step); a second one interrupts at once."""
    requested: list[bool] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield requested
        return
    previous = signal.getsignal(signal.SIGINT)

    def ask_to_stop(signum, frame):
        requested.append(True)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def read_saved(options: TrainOptions) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume, or None for a new run in an unused folder."""
    path = options.checkpoint_path
    if options.resume and options.init:
        raise GenfastError("--init starts a new run from a model's weights and --resume continues a run; choose one")
    if not options.resume:
        if path.exists():
            raise GenfastError(f"{path} already exists; pass --resume to continue that run, or choose another --out")
        return None
    return checkpoint.load(path)


@dataclass
class RunPlan:
    """What a run is, decided before any network exists."""

    family: Family
    config: Any                  # complete but for what family.prepare adds to a new run
    train_set: data.ImageSet
    seed: int
    precision: str               # fp32 | bf16 (auto resolved)
    start: int                   # the step it continues from (0 for a new run)
    total: int                   # the step it ends at
    steps_per_epoch: int
    local_batch: int             # each process's share of the global batch
    saved: checkpoint.Checkpoint | None
    dataset_info: dict[str, Any]  # what the checkpoint says about the data
    precision_note: str | None = None  # --precision auto: the probe's one line (None when told or resumed)
    init: checkpoint.Checkpoint | None = None  # a new run's starting weights (--init), fine-tuned from

    @property
    def data_name(self) -> str:
        return self.dataset_info["name"]


def plan_run(family: Family, options: TrainOptions, asked: dict[str, Any], saved: checkpoint.Checkpoint | None,
             world_size: int = 1, device: torch.device = CPU, load_data=data.load,
             probe=None) -> RunPlan:
    """The run that `options` and the config values `asked` (preset, TOML, key=value) make,
    continuing `saved` when resuming, or starting from options.init's config and weights (a
    fine-tuning run: its sizes are the init model's, `asked` may change anything else); any
    rule broken is one GenfastError saying what to do.
    `load_data(name, split, image_size=, channels=)` gives the training split; `probe(device,
    threads)` (default probe_precision) the precision a new run asked for auto trains in,
    once every rule has passed."""
    if saved is not None:
        _check_resumable(family, options, saved)
    init = _init_checkpoint(family, options.init) if options.init and saved is None else None
    data_name = saved.dataset["name"] if saved else options.data or (init.dataset["name"] if init else DEFAULT_DATA)
    seed = saved.extra.get("seed", 0) if saved else 0 if options.seed is None else options.seed
    auto = options.precision in (None, "auto")
    precision = (saved.extra.get("precision", "fp32") if saved else "auto") if auto else options.precision
    if saved is not None and not (type(saved.step) is int and saved.step >= 0 and isinstance(precision, str)
                                  and type(saved.extra.get("total_steps", 0)) is int):
        raise GenfastError(f"{options.checkpoint_path} has a damaged header (its step, total_steps or "
                           f"precision); it cannot be resumed")
    seeding.check_seed(seed)
    if precision != "auto":
        _autocast(CPU, precision)  # an unknown precision is refused here
    check_log_targets(options.log)

    config = _config_for_run(family, asked, saved, init)
    train_set = load_data(data_name, "train", image_size=config.image_size, channels=config.channels if saved else None)
    if config.conditional and train_set.labels is None:
        raise GenfastError(f"data set '{data_name}' has no labels, so it cannot train a conditional model")
    config = configlib.override(config, {"channels": train_set.image_shape[0], "num_classes": train_set.num_classes})
    if saved is not None and saved.dataset.get("train_size") not in (None, len(train_set)):
        raise GenfastError(f"data set '{data_name}' now has {len(train_set)} training images, the saved run had "
                           f"{saved.dataset['train_size']}; it is not the same data, start a new run")
    if not 2 <= config.batch_size <= len(train_set):  # BatchNorm needs two examples a batch
        raise GenfastError(f"batch_size={config.batch_size} is impossible for {len(train_set)} training images; "
                           f"choose 2..{len(train_set)}")
    if config.batch_size % world_size or config.batch_size // world_size < 2:
        raise GenfastError(f"batch_size={config.batch_size} is the global batch and must split evenly, at least 2 "
                           f"images each, over the {world_size} processes; choose a multiple of {world_size}")
    if options.sync_batchnorm and (world_size == 1 or device.type != "cuda"):
        raise GenfastError("--sync-bn shares BatchNorm statistics between GPU processes (PyTorch's SyncBatchNorm "
                           "runs on CUDA only); drop it for a single process or the CPU")

    steps_per_epoch = len(train_set) // config.batch_size
    start = saved.step if saved else 0
    if options.steps is not None:
        total = options.steps
    elif options.epochs is not None:
        total = options.epochs * steps_per_epoch
    else:
        total = saved.extra.get("total_steps", 0) if saved else DEFAULT_EPOCHS * steps_per_epoch
    if total <= start:
        raise GenfastError(f"nothing to train: the run is at step {start} and {total} steps were asked for; "
                           f"ask for more with --steps or --epochs")
    _check_schedule(config, total)
    dataset_info = {"name": data_name, "class_names": list(train_set.class_names),
                    "image_shape": list(train_set.image_shape), "train_size": len(train_set),
                    "source": train_set.source}
    note = None
    if precision == "auto":
        precision, note = (probe or probe_precision)(device, torch.get_num_threads())
    return RunPlan(family, config, train_set, seed, precision, start, total, steps_per_epoch,
                   config.batch_size // world_size, saved, dataset_info, note, init)


# The learning-rate schedule's keys (TrainedConfig's): a resumed run may change them, as it
# may change its optimizers' hyperparameters (family.optimizer_keys).
SCHEDULE_KEYS = ("warmup_steps", "decay_steps")


def learning_rate_share(step: int, total: int, warmup: int, decay: int) -> float:
    """The share of its configured learning rate that step `step` (from 0) of a `total`-step run
    trains at: a linear warm-up over the first `warmup` steps, constant, then linearly down over
    the last `decay` steps, to 1/decay at the last one (warmup-stable-decay: Hu et al., "MiniCPM",
    2024). Why a decay at the end: a constant rate leaves the weights moving about the minimum
    by its noise, which the last steps at a falling rate settle; a run at constant rate can be
    continued (--init, or --resume with more steps) and decayed later."""
    share = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay:
        share *= min(1.0, (total - step) / decay)
    return share


def _check_schedule(config: Any, total: int) -> None:
    configlib.require(config, non_negative=SCHEDULE_KEYS)
    if config.decay_steps > total:
        raise GenfastError(f"decay_steps={config.decay_steps} is more than the run's {total} steps: the rate "
                           f"decays over a run's last steps; choose at most {total}")


def _init_checkpoint(family: Family, name: str) -> checkpoint.Checkpoint:
    """The model a fine-tuning run starts from: of this family, its weights read without unpickling."""
    init = checkpoint.load(name)
    if init.family != family.name:
        raise GenfastError(f"--init {name} is a '{init.family}' model, not '{family.name}'; train it as that family "
                           f"('genfast train {init.family} --init {name} ...')")
    return init


def _check_resumable(family: Family, options: TrainOptions, saved: checkpoint.Checkpoint) -> None:
    path = options.checkpoint_path
    if saved.family != family.name:
        raise GenfastError(f"{path} is a '{saved.family}' checkpoint, not '{family.name}'; resume it as that family")
    if saved.inference_only:
        raise GenfastError(f"{path} is an inference-only checkpoint (no optimizer state); it cannot be resumed")
    for what, asked, kept in (("data set", options.data, saved.dataset["name"]),
                              ("seed", options.seed, saved.extra.get("seed"))):
        if asked is not None and asked != kept:
            raise GenfastError(f"--resume continues the saved run, whose {what} is {kept!r}, not {asked!r}; "
                               f"drop that option or start a new run with another --out")


def _config_for_run(family: Family, asked: dict[str, Any], saved: checkpoint.Checkpoint | None,
                    init: checkpoint.Checkpoint | None = None):
    """A new run builds its config from what was asked, over the init model's (--init) if
    it starts from one. A resumed run keeps the saved
    config, except the optimizer's hyperparameters (a lower learning rate is how one
    gets past a divergence); anything else would no longer be the same run."""
    if fixed := [k for k in asked if k in DATA_KEYS]:
        raise GenfastError(f"config key(s) {', '.join(fixed)} are set by the data set; drop them")
    if saved is None:
        base = configlib.from_dict(family.config_class, init.config) if init else family.config_class()
        return configlib.override(base, asked)
    resumed = configlib.from_dict(family.config_class, saved.config)
    wanted = configlib.override(resumed, asked)
    changeable = family.optimizer_keys + SCHEDULE_KEYS
    changed = [f"{k}={getattr(wanted, k)!r} (saved: {getattr(resumed, k)!r})" for k in asked
               if getattr(wanted, k) != getattr(resumed, k) and k not in changeable]
    if changed:
        raise GenfastError(f"--resume continues the saved run and can change only "
                           f"{', '.join(changeable)}, not: {'; '.join(changed)}; "
                           f"start a new run with another --out")
    return wanted


def _restore(saved: checkpoint.Checkpoint, modules, optimizers) -> None:
    """Load weights and optimizer state; the optimizers keep the current config's hyperparameters."""
    pretrained.load_weights(modules, saved.modules)
    for name, opt in optimizers.items():
        current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        try:
            opt.load_state_dict(saved.optimizers[name])
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise GenfastError(f"the checkpoint's '{name}' optimizer state does not fit the model "
                               f"({str(e)[:120]}); the file is damaged, start a new run") from None
        # load_state_dict checks the groups, not the moments' shapes: a wrong one would fail
        # (or broadcast) at the first step instead.
        for param, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise GenfastError(f"the checkpoint's '{name}' optimizer state does not fit the model (its "
                                       f"'{key}' is {tuple(value.shape)} for a weight of {tuple(param.shape)}); "
                                       f"the file is damaged, start a new run")
        for group, hyper in zip(opt.param_groups, current):
            group.update(hyper)


def train(family_name: str, options: TrainOptions, preset: str = "default", toml_path: Path | None = None,
          pairs: list[str] = (), conditional: bool = False) -> Path:
    """Train a model (or continue one with options.resume); returns the path of its checkpoint.
    Started by torchrun, this process trains its share of each batch (module docstring)."""
    family = get_family(family_name)
    device = distributed.device_of(resolve_device(options.device), distributed.world())
    with distributed.joined(device) as here:
        asked = configlib.layered_values(family.presets, preset, toml_path, pairs)
        if conditional:
            asked["conditional"] = True
        plan = _agreed_precision(plan_run(family, options, asked, read_saved(options), here.size, device), device)
        return _loop(plan, options, device, here)


def _agreed_precision(plan: RunPlan, device: torch.device) -> RunPlan:
    """Every process trains in rank 0's precision: each probed its own, and timings on a
    shared machine could differ across a margin."""
    if plan.precision_note is None:
        return plan
    bf16 = distributed.sum_over_ranks(torch.tensor([float(plan.precision == "bf16" and distributed.world().main)],
                                                   device=device))
    return dataclasses.replace(plan, precision="bf16" if bf16.item() > 0 else "fp32")


@dataclass
class _SetUp:
    """The networks of a run, ready for its first step."""

    config: Any
    modules: dict[str, nn.Module]         # the bare networks: what is saved and sampled
    optimizers: dict[str, torch.optim.Optimizer]
    trained: dict[str, nn.Module]         # what train_step runs: the trained ones as DDP over the processes
    base_rates: dict[str, list[float]]    # each optimizer's learning rate per group, as the config sets it

    def schedule(self, share: float) -> None:
        """Every optimizer's groups at `share` of their configured learning rates."""
        for name, optimizer in self.optimizers.items():
            for group, rate in zip(optimizer.param_groups, self.base_rates[name]):
                group["lr"] = rate * share


def _set_up(plan: RunPlan, options: TrainOptions, device: torch.device) -> _SetUp:
    config, initial = plan.config, {}
    if plan.saved is None:  # a family that starts from trained parts (ar: its tokenizer)
        config, initial = plan.family.prepare(config, plan.train_set)
    torch.manual_seed(plan.seed)  # weight initialisation: the same in every process
    # Built once they are known to fit (the machine, and a resumed run's saved weights).
    modules = pretrained.build(plan.family, config, device, plan.saved.modules if plan.saved else None)
    if plan.init is not None:
        _load_init(options.init, plan.init, modules, initial)
    for name, state in initial.items():
        modules[name].load_state_dict(state, strict=False)
    if options.sync_batchnorm:
        modules = {name: nn.SyncBatchNorm.convert_sync_batchnorm(m) for name, m in modules.items()}
    optimizers = plan.family.optimizers(modules, config)
    if plan.saved is not None:
        _restore(plan.saved, modules, optimizers)
    plan.family.start_run(modules, config, plan.train_set, plan.seed)
    trained = {name: distributed.wrap(m, device) if name in optimizers else m for name, m in modules.items()}
    base_rates = {name: [group["lr"] for group in optimizer.param_groups] for name, optimizer in optimizers.items()}
    return _SetUp(config, modules, optimizers, trained, base_rates)


def _load_init(name: str, init: checkpoint.Checkpoint, modules: dict[str, nn.Module],
               fresh: dict[str, dict[str, torch.Tensor]]) -> None:
    """A fine-tuning run's weights: the init model's, each of the shape this config builds, but
    for what prepare gives afresh (`fresh`: ar's caption embeddings). A module the file lacks (a
    slim model keeps what sampling needs: a GAN's discriminator is not there) starts from scratch."""
    for module, state in init.modules.items():
        if module not in modules:
            raise GenfastError(f"--init {name} holds a '{module}' network this family does not build; the file is "
                               f"damaged or was edited")
        expected, given = modules[module].state_dict(), fresh.get(module, {})
        state = {key: value for key, value in state.items() if key not in given}
        if extra := sorted(set(state) - set(expected)):
            raise GenfastError(f"--init {name} holds '{module}.{extra[0]}', which this config does not build; the "
                               f"file is of another version of the model, or damaged")
        for key in sorted(set(expected) - set(given)):
            if key not in state or state[key].shape != expected[key].shape:
                found = f"is {tuple(state[key].shape)}" if key in state else "is missing"
                raise GenfastError(f"--init {name}: its '{module}.{key}' {found}, this config builds "
                                   f"{tuple(expected[key].shape)}; a fine-tuning run keeps the model's sizes, so drop "
                                   f"the size settings")
            if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
                raise GenfastError(f"--init {name}: its weight '{module}.{key}' holds NaN or infinite values; start "
                                   f"from another checkpoint")
        modules[module].load_state_dict({key: state[key] for key in expected if key in state}, strict=False)


class _Outputs:
    """What rank 0 writes: the checkpoint, sample grids, held-out scores, the logs."""

    def __init__(self, plan: RunPlan, setup: _SetUp, options: TrainOptions, device: torch.device,
                 here: distributed.World):
        self.plan, self.setup, self.out = plan, setup, Path(options.out)
        self.path = options.checkpoint_path
        self.info = {"seed": plan.seed, "total_steps": plan.total, "steps_per_epoch": plan.steps_per_epoch,
                     "precision": plan.precision,
                     # how auto chose it: this session's probe, or the one of the run it continues
                     "precision_probe": plan.precision_note or (plan.saved.extra.get("precision_probe")
                                                                if plan.saved else None),
                     "device": str(device), "processes": here.size,
                     # the model a fine-tuning run started from (--init), kept when it is resumed
                     "init": options.init if plan.init else plan.saved.extra.get("init") if plan.saved else None,
                     "model_name": plan.family.model_name(setup.config)}
        self.class_names = plan.train_set.class_names if setup.config.conditional else ()
        self.test_split: data.ImageSet | None = None  # loaded at the first evaluation only
        if here.main:
            images.writable_target(self.path)
        run_config = {"family": plan.family.name, "data": plan.data_name, **self.info,
                      "config": configlib.to_dict(setup.config)}
        self.logs = _Logs(options.log, self.out, plan.start, run_config) if here.main else _Silent()

    def save(self, step: int) -> None:
        s = self.setup
        checkpoint.save(checkpoint.Checkpoint(
            family=self.plan.family.name, config=configlib.to_dict(s.config), dataset=self.plan.dataset_info,
            step=step, modules={n: m.state_dict() for n, m in s.modules.items()},
            optimizers={n: o.state_dict() for n, o in s.optimizers.items()}, extra=self.info), self.path)

    def save_samples(self, step: int) -> None:
        """The same noise every time, so the grids show the model's progress and nothing else."""
        s = self.setup
        grid = self.plan.family.sampler(s.modules, s.config, self.class_names).generate(
            10 * len(self.class_names) or 64, seed=self.plan.seed)
        images.save_grid(grid, self.out / "samples" / f"step_{step:07d}.png", nrow=len(self.class_names) or None)
        self.logs.add_images("samples", images.to_uint8(grid), step)
        for module in s.modules.values():
            module.train()

    def evaluate(self, step: int) -> None:
        """A non-generative model (the classifier, the tokenizer) is judged on the held-out split."""
        s = self.setup
        if self.test_split is None:
            self.test_split = data.load(self.plan.data_name, "test", image_size=s.config.image_size,
                                        channels=s.config.channels)
        scores = self.plan.family.evaluate(s.modules, s.config, images.to_float(self.test_split.images),
                                           self.test_split.labels)
        for key, value in scores.items():
            self.logs.add_scalar(f"test/{key}", value, step)
        self.info["test"] = scores


def _loop(plan: RunPlan, options: TrainOptions, device: torch.device, here: distributed.World) -> Path:
    if plan.precision_note and here.main and options.progress:  # -q silences notes, as it does auto's
        print(plan.precision_note, file=sys.stderr, flush=True)  # the one line: what auto chose, and why
    setup = _set_up(plan, options, device)
    family, config = plan.family, setup.config
    outputs = _Outputs(plan, setup, options, device, here)
    # The sets fit in memory (Fashion-MNIST is 47 MB as uint8), so they go to the device
    # once and batches are cut and scaled there: no loader processes, no copies per step.
    all_images = plan.train_set.images.to(device)
    all_labels = plan.train_set.labels.to(device) if plan.train_set.labels is not None else None
    for module in setup.modules.values():
        module.train()

    first_losses: dict[str, float] = {}  # the scale divergence is judged against (losses differ by family)
    epoch_order: dict[int, torch.Tensor] = {}
    data_seconds = step_seconds = 0.0
    last_saved = plan.start
    processes = f" ({here.size} processes)" if here.size > 1 else ""
    bar = tqdm(total=plan.total, initial=plan.start, unit="step", disable=not (options.progress and here.main),
               desc=f"train {family.model_name(config)} on {plan.data_name}{processes}")
    finished = False
    with _stop_between_steps() as stop_requested:
        try:
            for step in range(plan.start, plan.total):
                # The step: this process's rows of the batch, its noise stream, the family's update.
                t0 = time.perf_counter()
                epoch, index = divmod(step, plan.steps_per_epoch)
                if epoch not in epoch_order:
                    epoch_order = {epoch: _epoch_order(len(plan.train_set), plan.seed, epoch, here)}
                batch = epoch_order[epoch][index * plan.local_batch:(index + 1) * plan.local_batch].to(device)
                x = images.to_float(all_images[batch])
                y = all_labels[batch] if all_labels is not None else None
                t1 = time.perf_counter()
                generator = _seed_step(plan.seed, step, here.rank, device)
                share = learning_rate_share(step, plan.total, config.warmup_steps, config.decay_steps)
                setup.schedule(share)
                with _autocast(device, plan.precision):
                    losses = family.train_step(setup.trained, setup.optimizers, x, y, generator, config)
                # Every process logs and judges the global batch's mean losses, and stops at
                # the same step when any of them was asked to.
                losses, stop = _mean_over_processes(losses, bool(stop_requested), device, here.size)
                t2 = time.perf_counter()
                data_seconds += t1 - t0
                step_seconds += t2 - t1
                done = step + 1

                # Divergence: a loss that is NaN, infinite or far above its first value stops the run.
                if not first_losses:
                    first_losses.update({k: max(1.0, abs(v)) for k, v in losses.items() if math.isfinite(v)})
                _check_divergence(losses, first_losses, options.max_loss_growth, done, family,
                                  outputs.path, last_saved)

                # Log: the log targets every log_every steps, the progress bar every step.
                images_per_s = (done - plan.start) * config.batch_size / step_seconds
                if done % options.log_every == 0 or done == plan.total:
                    for key, value in losses.items():
                        outputs.logs.add_scalar(f"train/{key}", value, done)
                    outputs.logs.add_scalar("train/images_per_s", images_per_s, done)
                    outputs.logs.add_scalar("train/lr_share", share, done)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k.startswith("loss")}
                                | {"img/s": f"{images_per_s:.0f}"})

                # Sample grid (generative families).
                if (done % options.sample_every == 0 or done == plan.total) and family.generative and here.main:
                    outputs.save_samples(done)

                # Checkpoint (with held-out scores for the others).
                if done % options.checkpoint_every == 0 or done == plan.total:
                    if here.main:
                        if not family.generative:
                            outputs.evaluate(done)
                        outputs.info["images_per_s"] = round(images_per_s, 1)
                        outputs.info["data_fraction"] = round(data_seconds / (data_seconds + step_seconds), 4)
                        outputs.save(done)
                    last_saved = done

                # Stop, when asked (Ctrl-C): after a whole step, its checkpoint written.
                if stop:
                    if done > last_saved and here.main:
                        outputs.save(done)
                    distributed.barrier()  # none ends (and gets rank 0 stopped) before the save
                    raise KeyboardInterrupt(f"checkpoint saved at step {done} in {outputs.path}; "
                                            "continue with --resume")
            finished = True
        finally:
            bar.close()
            outputs.logs.close(failed=not finished)
    distributed.barrier()  # no process ends the job before rank 0 has written the last checkpoint
    return outputs.path


def _check_divergence(losses: dict[str, float], first: dict[str, float], max_growth: float, step: int,
                      family: Family, path: Path, last_saved: int) -> None:
    bad = {k: v for k, v in losses.items() if k.startswith("loss") and not abs(v) <= max_growth * first.get(k, 1.0)}
    if bad:
        what = ", ".join(f"{k}={v:.4g}" for k, v in bad.items())
        kept = (f"the last good checkpoint is {path} at step {last_saved}; continue it with --resume "
                f"and a lower {' or '.join(k for k in family.optimizer_keys if k.startswith('lr'))}"
                if path.exists() else "no checkpoint was written yet; start again with a lower learning rate")
        raise GenfastError(f"training diverged at step {step} ({what}); {kept}")


def _mean_over_processes(losses: dict[str, float], stop: bool, device: torch.device,
                         size: int) -> tuple[dict[str, float], bool]:
    """The losses averaged over the `size` processes (their batches are equal shares of the
    global one), and whether any process was asked to stop; as they are in a world of one."""
    if size == 1:
        return losses, stop
    values = distributed.sum_over_ranks(torch.tensor([*losses.values(), float(stop)], dtype=torch.float64,
                                                     device=device)).tolist()
    return {key: value / size for key, value in zip(losses, values)}, values[-1] > 0
