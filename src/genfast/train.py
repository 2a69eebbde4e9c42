"""The one training loop. Families own their loss; this owns everything around it.

Seeds, devices, mixed precision, the progress bar, TensorBoard, sample grids,
checkpoints, resume and divergence checks live here, so every family gets them
the same way (after minGPT's trainer, which knows nothing about the model).

Randomness is a pure function of (seed, step): the data order of epoch e comes
from a generator seeded with (seed, e) and the noise of step s from one seeded
with (seed, s). A resumed run therefore draws exactly what the uninterrupted run
would have drawn, and needs no RNG state in the checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genfast import checkpoint, config as configlib, data, images
from genfast.errors import GenfastError
from genfast.families import get_family

CHECKPOINT_NAME = "checkpoint.safetensors"
DEFAULT_EPOCHS = 5


@dataclass
class TrainOptions:
    out: Path
    data: str = "fashion-mnist"
    epochs: int | None = None      # total epochs of the run; default DEFAULT_EPOCHS
    steps: int | None = None       # or total optimisation steps (wins over epochs)
    seed: int = 0
    resume: bool = False
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str = "fp32"        # fp32 | bf16 (autocast)
    sample_every: int = 500        # steps between sample grids (and at the end)
    checkpoint_every: int = 500    # steps between checkpoints (and at the end)
    log_every: int = 10            # steps between TensorBoard scalars
    max_loss: float = 1e4          # a loss above this, or NaN/inf, stops the run
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenfastError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenfastError(f"device '{name}' asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return device


def _seeded(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    # Mix the two numbers so (seed, index) pairs never collide for realistic values.
    return torch.Generator(device).manual_seed(seed * 1_000_003 + index)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise GenfastError(f"unknown precision '{precision}'; use fp32 or bf16")


def _config_for_run(family, asked: dict[str, Any], saved: checkpoint.Checkpoint | None):
    """A new run builds its config from what was asked; a resumed one keeps the saved config,
    and refuses a request that would change it (that would no longer be the same run)."""
    if saved is None:
        return configlib.override(family.config_class(), asked)
    resumed = configlib.from_dict(family.config_class, saved.config)
    wanted = configlib.override(resumed, asked)
    changed = [f"{k}={getattr(wanted, k)!r} (saved: {getattr(resumed, k)!r})"
               for k in asked if getattr(wanted, k) != getattr(resumed, k)]
    if changed:
        raise GenfastError(f"--resume continues the saved run and cannot change its config: {'; '.join(changed)}; "
                           f"start a new run with another --out")
    return resumed


def train(family_name: str, options: TrainOptions, preset: str = "default", toml_path: Path | None = None,
          pairs: list[str] = (), conditional: bool = False) -> Path:
    """Train a model; returns the path of its checkpoint."""
    family = get_family(family_name)
    out = Path(options.out)
    ckpt_path = out / CHECKPOINT_NAME
    saved = None
    if options.resume:
        saved = checkpoint.load(ckpt_path)
        if saved.family != family.name:
            raise GenfastError(f"{ckpt_path} is a '{saved.family}' checkpoint, not '{family.name}'; "
                               f"resume it with 'genfast train {saved.family} --resume'")
        if saved.inference_only:
            raise GenfastError(f"{ckpt_path} is an inference-only checkpoint (no optimizer state); it cannot be resumed")
        if saved.dataset["name"] != options.data:
            raise GenfastError(f"{ckpt_path} was trained on '{saved.dataset['name']}', not '{options.data}'; "
                               f"pass --data {saved.dataset['name']}")
    elif ckpt_path.exists():
        raise GenfastError(f"{ckpt_path} already exists; pass --resume to continue that run, or choose another --out")

    asked = configlib.layered_values(family.presets, preset, toml_path, pairs)
    if conditional:
        asked["conditional"] = True
    config = _config_for_run(family, asked, saved)
    train_set = data.load(options.data, "train", image_size=config.image_size,
                          channels=config.channels if saved else None)
    if config.conditional and train_set.labels is None:
        raise GenfastError(f"data set '{options.data}' has no labels, so it cannot train a conditional model")
    config = configlib.override(config, {"channels": train_set.image_shape[0],
                                         "num_classes": train_set.num_classes})
    if config.batch_size < 1 or config.batch_size > len(train_set):
        raise GenfastError(f"batch_size={config.batch_size} is impossible for {len(train_set)} training images; "
                           f"choose 1..{len(train_set)}")

    device = resolve_device(options.device)
    torch.manual_seed(options.seed)  # weight initialisation
    modules = {name: m.to(device) for name, m in family.build(config).items()}
    optimizers = family.optimizers(modules, config)
    start = 0
    if saved is not None:
        for name, module in modules.items():
            module.load_state_dict(saved.modules[name])
        for name, opt in optimizers.items():
            opt.load_state_dict(saved.optimizers[name])
        start = saved.step

    steps_per_epoch = len(train_set) // config.batch_size
    if options.steps is not None:
        total = options.steps
    elif options.epochs is not None:
        total = options.epochs * steps_per_epoch
    elif saved is not None:
        total = saved.extra["total_steps"]
    else:
        total = DEFAULT_EPOCHS * steps_per_epoch
    if total < 1:
        raise GenfastError(f"nothing to train: --steps/--epochs gives {total} steps")
    if total <= start:
        raise GenfastError(f"{ckpt_path} is already at step {start}; ask for more than {start} steps to continue")

    dataset_info = {"name": options.data, "class_names": list(train_set.class_names),
                    "image_shape": list(train_set.image_shape), "train_size": len(train_set),
                    "source": train_set.source}
    run_info = {"seed": options.seed, "total_steps": total, "steps_per_epoch": steps_per_epoch,
                "precision": options.precision, "device": str(device),
                "model_name": family.model_name(config)}

    def save(step: int) -> None:
        checkpoint.save(checkpoint.Checkpoint(
            family=family.name, config=configlib.to_dict(config), dataset=dataset_info, step=step,
            modules={n: m.state_dict() for n, m in modules.items()},
            optimizers={n: o.state_dict() for n, o in optimizers.items()}, extra=run_info), ckpt_path)

    class_names = train_set.class_names if config.conditional else ()
    preview_n = 10 * len(class_names) if class_names else 64

    def save_samples(step: int, writer) -> None:
        sampler = family.sampler(modules, config, class_names)
        grid = sampler.generate(preview_n, seed=options.seed)
        images.save_grid(grid, out / "samples" / f"step_{step:07d}.png",
                         nrow=len(class_names) or None)
        writer.add_images("samples", images.to_uint8(grid), step, dataformats="NCHW")
        for module in modules.values():
            module.train()

    from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

    images.writable_target(ckpt_path)
    writer = SummaryWriter(str(out / "tb"), purge_step=start or None)
    # The sets fit in memory (Fashion-MNIST is 47 MB as uint8), so they go to the device
    # once and batches are cut and scaled there: no loader processes, no copies per step.
    all_images = train_set.images.to(device)
    all_labels = train_set.labels.to(device) if train_set.labels is not None else None
    for module in modules.values():
        module.train()

    epoch_order: dict[int, torch.Tensor] = {}
    data_seconds = step_seconds = 0.0
    bar = tqdm(total=total, initial=start, unit="step", disable=not options.progress,
               desc=f"train {family.model_name(config)} on {options.data}")
    last_saved = start
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in epoch_order:
                epoch_order = {epoch: torch.randperm(len(train_set), generator=_seeded(options.seed, epoch))}
            batch = epoch_order[epoch][index * config.batch_size:(index + 1) * config.batch_size].to(device)
            x = images.to_float(all_images[batch])
            y = all_labels[batch] if all_labels is not None else None
            t1 = time.perf_counter()
            with _autocast(device, options.precision):
                losses = family.train_step(modules, optimizers, x, y, _seeded(options.seed, step, device), config)
            t2 = time.perf_counter()
            data_seconds += t1 - t0
            step_seconds += t2 - t1

            bad = {k: v for k, v in losses.items() if k.startswith("loss") and not (abs(v) <= options.max_loss)}
            if bad:
                what = ", ".join(f"{k}={v:.4g}" for k, v in bad.items())
                raise GenfastError(f"training diverged at step {step + 1} ({what}); the last good checkpoint "
                                   f"is {ckpt_path} at step {last_saved}; lower the learning rate and --resume "
                                   f"or start again")
            done = step + 1
            if done % options.log_every == 0 or done == total:
                for key, value in losses.items():
                    writer.add_scalar(f"train/{key}", value, done)
                writer.add_scalar("train/images_per_s", (done - start) * config.batch_size / step_seconds, done)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k.startswith("loss")}
                            | {"img/s": f"{(done - start) * config.batch_size / step_seconds:.0f}"})
            if done % options.sample_every == 0 or done == total:
                save_samples(done, writer)
            if done % options.checkpoint_every == 0 or done == total:
                run_info["images_per_s"] = round((done - start) * config.batch_size / step_seconds, 1)
                run_info["data_fraction"] = round(data_seconds / (data_seconds + step_seconds), 4)
                save(done)
                last_saved = done
    finally:
        bar.close()
        writer.close()
    return ckpt_path

