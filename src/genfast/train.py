"""The one training loop. Families own their loss; this owns everything around it.

Seeds, devices, mixed precision, the progress bar, TensorBoard, sample grids,
checkpoints, resume and divergence checks live here, so every family gets them
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
TensorBoard logs; the checkpoint holds the bare networks, so a run resumes at any N.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genfast import checkpoint, config as configlib, data, distributed, images, seeding
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import get_family
from genfast.pretrained import load_weights

CHECKPOINT_NAME = "checkpoint.safetensors"
DEFAULT_DATA = "fashion-mnist"
DEFAULT_EPOCHS = 5
# Config fields the data set decides; a user setting them would be silently overruled.
DATA_KEYS = ("channels", "num_classes")


@dataclass
class TrainOptions:
    out: Path
    data: str | None = None        # default DEFAULT_DATA; a resumed run keeps its own
    epochs: int | None = None      # total epochs of the run; default DEFAULT_EPOCHS
    steps: int | None = None       # or total optimisation steps (wins over epochs)
    seed: int | None = None        # default 0; a resumed run keeps its own
    resume: bool = False
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str | None = None   # fp32 (default) | bf16 autocast; a resumed run keeps its own unless told
    sample_every: int = 500        # steps between sample grids (and at the end)
    checkpoint_every: int = 500    # steps between checkpoints (and at the end, and on Ctrl-C)
    log_every: int = 10            # steps between TensorBoard scalars
    max_loss_growth: float = 1e4   # a loss this many times its first value (or NaN/inf) stops the run
    progress: bool = True
    sync_batchnorm: bool = False   # several GPU processes: BatchNorm statistics over the global batch


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


class _Silent:
    """The TensorBoard writer of a process that is not rank 0: it writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise GenfastError(f"unknown precision '{precision}'; use fp32 or bf16")


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


def _saved_run(family, options: TrainOptions, ckpt_path: Path) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume (checked), or None for a new run in an unused folder."""
    if not options.resume:
        if ckpt_path.exists():
            raise GenfastError(f"{ckpt_path} already exists; pass --resume to continue that run, "
                               f"or choose another --out")
        return None
    saved = checkpoint.load(ckpt_path)
    if saved.family != family.name:
        raise GenfastError(f"{ckpt_path} is a '{saved.family}' checkpoint, not '{family.name}'; "
                           f"resume it as that family")
    if saved.inference_only:
        raise GenfastError(f"{ckpt_path} is an inference-only checkpoint (no optimizer state); it cannot be resumed")
    for what, asked, kept in (("data set", options.data, saved.dataset["name"]),
                              ("seed", options.seed, saved.extra.get("seed"))):
        if asked is not None and asked != kept:
            raise GenfastError(f"--resume continues the saved run, whose {what} is {kept!r}, not {asked!r}; "
                               f"drop that option or start a new run with another --out")
    return saved


def _config_for_run(family, asked: dict[str, Any], saved: checkpoint.Checkpoint | None):
    """A new run builds its config from what was asked. A resumed run keeps the saved
    config, except the optimizer's hyperparameters (a lower learning rate is how one
    gets past a divergence); anything else would no longer be the same run."""
    if fixed := [k for k in asked if k in DATA_KEYS]:
        raise GenfastError(f"config key(s) {', '.join(fixed)} are set by the data set; drop them")
    if saved is None:
        return configlib.override(family.config_class(), asked)
    resumed = configlib.from_dict(family.config_class, saved.config)
    wanted = configlib.override(resumed, asked)
    changed = [f"{k}={getattr(wanted, k)!r} (saved: {getattr(resumed, k)!r})" for k in asked
               if getattr(wanted, k) != getattr(resumed, k) and k not in family.optimizer_keys]
    if changed:
        raise GenfastError(f"--resume continues the saved run and can change only "
                           f"{', '.join(family.optimizer_keys)}, not: {'; '.join(changed)}; "
                           f"start a new run with another --out")
    return wanted


def _restore(saved: checkpoint.Checkpoint, modules, optimizers) -> None:
    """Load weights and optimizer state; the optimizers keep the current config's hyperparameters."""
    load_weights(modules, saved.modules)
    for name, opt in optimizers.items():
        current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        try:
            opt.load_state_dict(saved.optimizers[name])
        except (KeyError, ValueError) as e:
            raise GenfastError(f"the checkpoint's '{name}' optimizer state does not fit the model ({e}); "
                               f"the file is damaged, start a new run") from None
        for group, hyper in zip(opt.param_groups, current):
            group.update(hyper)


def train(family_name: str, options: TrainOptions, preset: str = "default", toml_path: Path | None = None,
          pairs: list[str] = (), conditional: bool = False) -> Path:
    """Train a model (or continue one with options.resume); returns the path of its checkpoint.
    Started by torchrun, this process trains its share of each batch (module docstring)."""
    device = distributed.device_of(resolve_device(options.device), distributed.world())
    with distributed.joined(device) as here:
        return _train(family_name, options, preset, toml_path, pairs, conditional, device, here)


def _train(family_name: str, options: TrainOptions, preset: str, toml_path: Path | None, pairs: list[str],
           conditional: bool, device: torch.device, here: distributed.World) -> Path:
    family = get_family(family_name)
    out = Path(options.out)
    ckpt_path = out / CHECKPOINT_NAME
    saved = _saved_run(family, options, ckpt_path)
    data_name = saved.dataset["name"] if saved else options.data or DEFAULT_DATA
    seed = saved.extra.get("seed", 0) if saved else 0 if options.seed is None else options.seed
    precision = options.precision or (saved.extra.get("precision", "fp32") if saved else "fp32")
    seeding.check_seed(seed)
    _autocast(torch.device("cpu"), precision)  # reject an unknown precision before any work

    asked = configlib.layered_values(family.presets, preset, toml_path, pairs)
    if conditional:
        asked["conditional"] = True
    config = _config_for_run(family, asked, saved)
    train_set = data.load(data_name, "train", image_size=config.image_size,
                          channels=config.channels if saved else None)
    if config.conditional and train_set.labels is None:
        raise GenfastError(f"data set '{data_name}' has no labels, so it cannot train a conditional model")
    config = configlib.override(config, {"channels": train_set.image_shape[0], "num_classes": train_set.num_classes})
    if not 2 <= config.batch_size <= len(train_set):  # BatchNorm needs two examples a batch
        raise GenfastError(f"batch_size={config.batch_size} is impossible for {len(train_set)} training images; "
                           f"choose 2..{len(train_set)}")
    if config.batch_size % here.size or config.batch_size // here.size < 2:
        raise GenfastError(f"batch_size={config.batch_size} is the global batch and must split evenly, at least 2 "
                           f"images each, over the {here.size} processes; choose a multiple of {here.size}")
    if options.sync_batchnorm and (here.size == 1 or device.type != "cuda"):
        raise GenfastError("--sync-bn shares BatchNorm statistics between GPU processes (PyTorch's SyncBatchNorm "
                           "runs on CUDA only); drop it for a single process or the CPU")

    initial: dict[str, dict[str, torch.Tensor]] = {}
    if saved is None and hasattr(family, "prepare"):  # a family that starts from trained parts (ar: its tokenizer)
        config, initial = family.prepare(config, train_set)

    torch.manual_seed(seed)  # weight initialisation: the same in every process
    modules = {name: m.to(device) for name, m in family.build(config).items()}
    for name, state in initial.items():
        modules[name].load_state_dict(state, strict=False)
    if options.sync_batchnorm:
        modules = {name: torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for name, m in modules.items()}
    optimizers = family.optimizers(modules, config)
    start = 0
    if saved is not None:
        _restore(saved, modules, optimizers)
        start = saved.step
    # What train_step runs: the trained networks as DDP (their gradients averaged over the
    # processes); `modules` stay the bare networks that are saved and sampled.
    trained = {name: distributed.wrap(m, device) if name in optimizers else m for name, m in modules.items()}

    steps_per_epoch = len(train_set) // config.batch_size
    if options.steps is not None:
        total = options.steps
    elif options.epochs is not None:
        total = options.epochs * steps_per_epoch
    else:
        total = saved.extra.get("total_steps", 0) if saved else DEFAULT_EPOCHS * steps_per_epoch
    if total <= start:
        raise GenfastError(f"nothing to train: the run is at step {start} and {total} steps were asked for; "
                           f"ask for more with --steps or --epochs")

    dataset_info = {"name": data_name, "class_names": list(train_set.class_names),
                    "image_shape": list(train_set.image_shape), "train_size": len(train_set),
                    "source": train_set.source}
    if saved is not None and saved.dataset.get("train_size") not in (None, len(train_set)):
        raise GenfastError(f"data set '{data_name}' now has {len(train_set)} training images, the saved run had "
                           f"{saved.dataset['train_size']}; it is not the same data, start a new run")
    run_info = {"seed": seed, "total_steps": total, "steps_per_epoch": steps_per_epoch, "precision": precision,
                "device": str(device), "processes": here.size, "model_name": family.model_name(config)}

    def save(step: int) -> None:
        checkpoint.save(checkpoint.Checkpoint(
            family=family.name, config=configlib.to_dict(config), dataset=dataset_info, step=step,
            modules={n: m.state_dict() for n, m in modules.items()},
            optimizers={n: o.state_dict() for n, o in optimizers.items()}, extra=run_info), ckpt_path)

    class_names = train_set.class_names if config.conditional else ()

    def save_samples(step: int, writer) -> None:
        """The same noise every time, so the grids show the model's progress and nothing else."""
        grid = family.sampler(modules, config, class_names).generate(10 * len(class_names) or 64, seed=seed)
        images.save_grid(grid, out / "samples" / f"step_{step:07d}.png", nrow=len(class_names) or None)
        writer.add_images("samples", images.to_uint8(grid), step, dataformats="NCHW")
        for module in modules.values():
            module.train()

    test_split: list[data.ImageSet] = []  # loaded at the first evaluation only

    def evaluate(step: int, writer) -> None:
        """A non-generative model (the classifier) is judged on the held-out split instead."""
        if not test_split:
            test_split.append(data.load(data_name, "test", image_size=config.image_size, channels=config.channels))
        scores = family.evaluate(modules, config, images.to_float(test_split[0].images), test_split[0].labels)
        for key, value in scores.items():
            writer.add_scalar(f"test/{key}", value, step)
        run_info["test"] = scores

    from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

    if here.main:
        images.writable_target(ckpt_path)
    # purge_step: a resumed run drops events logged after its checkpoint by the run it continues
    # (the checkpoint of step `start` was written after that step's events).
    writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None) if here.main else _Silent()
    local_batch = config.batch_size // here.size
    # The sets fit in memory (Fashion-MNIST is 47 MB as uint8), so they go to the device
    # once and batches are cut and scaled there: no loader processes, no copies per step.
    all_images = train_set.images.to(device)
    all_labels = train_set.labels.to(device) if train_set.labels is not None else None
    for module in modules.values():
        module.train()

    first_losses: dict[str, float] = {}  # the scale divergence is judged against (losses differ by family)
    epoch_order: dict[int, torch.Tensor] = {}
    data_seconds = step_seconds = 0.0
    last_saved = done = start
    processes = f" ({here.size} processes)" if here.size > 1 else ""
    bar = tqdm(total=total, initial=start, unit="step", disable=not (options.progress and here.main),
               desc=f"train {family.model_name(config)} on {data_name}{processes}")
    with _stop_between_steps() as stop_requested:
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                epoch, index = divmod(step, steps_per_epoch)
                if epoch not in epoch_order:
                    epoch_order = {epoch: _epoch_order(len(train_set), seed, epoch, here)}
                batch = epoch_order[epoch][index * local_batch:(index + 1) * local_batch].to(device)
                x = images.to_float(all_images[batch])
                y = all_labels[batch] if all_labels is not None else None
                t1 = time.perf_counter()
                generator = _seed_step(seed, step, here.rank, device)
                with _autocast(device, precision):
                    losses = family.train_step(trained, optimizers, x, y, generator, config)
                # Every process logs and judges the global batch's mean losses, and stops at
                # the same step when any of them was asked to.
                losses, stop = _mean_over_processes(losses, bool(stop_requested), device, here.size)
                t2 = time.perf_counter()
                data_seconds += t1 - t0
                step_seconds += t2 - t1

                if not first_losses:
                    first_losses.update({k: max(1.0, abs(v)) for k, v in losses.items() if math.isfinite(v)})
                bad = {k: v for k, v in losses.items() if k.startswith("loss")
                       and not abs(v) <= options.max_loss_growth * first_losses.get(k, 1.0)}
                if bad:
                    what = ", ".join(f"{k}={v:.4g}" for k, v in bad.items())
                    kept = (f"the last good checkpoint is {ckpt_path} at step {last_saved}; continue it with --resume "
                            f"and a lower {' or '.join(k for k in family.optimizer_keys if k.startswith('lr'))}"
                            if ckpt_path.exists() else
                            "no checkpoint was written yet; start again with a lower learning rate")
                    raise GenfastError(f"training diverged at step {step + 1} ({what}); {kept}")
                done = step + 1
                images_per_s = (done - start) * config.batch_size / step_seconds
                if done % options.log_every == 0 or done == total:
                    for key, value in losses.items():
                        writer.add_scalar(f"train/{key}", value, done)
                    writer.add_scalar("train/images_per_s", images_per_s, done)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k.startswith("loss")}
                                | {"img/s": f"{images_per_s:.0f}"})
                if (done % options.sample_every == 0 or done == total) and family.generative and here.main:
                    save_samples(done, writer)
                if done % options.checkpoint_every == 0 or done == total:
                    if here.main:
                        if not family.generative:
                            evaluate(done, writer)
                        run_info["images_per_s"] = round(images_per_s, 1)
                        run_info["data_fraction"] = round(data_seconds / (data_seconds + step_seconds), 4)
                        save(done)
                    last_saved = done
                if stop:
                    if done > last_saved and here.main:
                        save(done)
                    distributed.barrier()  # none ends (and gets rank 0 stopped) before the save
                    raise KeyboardInterrupt(f"checkpoint saved at step {done} in {ckpt_path}; continue with --resume")
        finally:
            bar.close()
            writer.close()
    distributed.barrier()  # no process ends the job before rank 0 has written the last checkpoint
    return ckpt_path


def _mean_over_processes(losses: dict[str, float], stop: bool, device: torch.device,
                         size: int) -> tuple[dict[str, float], bool]:
    """The losses averaged over the `size` processes (their batches are equal shares of the
    global one), and whether any process was asked to stop; as they are in a world of one."""
    if size == 1:
        return losses, stop
    values = distributed.sum_over_ranks(torch.tensor([*losses.values(), float(stop)], dtype=torch.float64,
                                                     device=device)).tolist()
    return {key: value / size for key, value in zip(losses, values)}, values[-1] > 0
