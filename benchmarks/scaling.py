"""Scaling from 1 to N processes: training (DistributedDataParallel) and bulk generation.

Everything goes through the CLI, as a user runs it: `genfast train ... [--nproc N]` and
`genfast sample ... --out DIR [--nproc N]`. For each world size the script records
- training: the trainer's own images/s (optimisation steps only, after start-up), read
  from the checkpoint, and the wall time of the whole command;
- bulk generation: images/s of the whole command (start-up included, so n is large);
then prints each against 1 process (same run, side by side: the ratios are what to
trust on a shared machine). It ends with the arithmetic of what limits training scaling:
the gradient bytes all-reduced per step against the compute per step, and the measured
time of such an all-reduce on this machine's gloo.

    python benchmarks/scaling.py [--nproc 1 2] [--steps 300] [--n 40000] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from genfast import checkpoint
from genfast.families import get_family
from genfast.families.gan import GANConfig

FAMILIES = {  # what the training runs train: the seed DCGAN and the convolutional VAE
    "gan": ["gan", "--data", "fashion-mnist"],
    "vae": ["vae", "--data", "fashion-mnist"],
}


def genfast(*args: str, threads: int | None = None) -> float:
    """Run a genfast command; returns its wall time."""
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "genfast", *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def training(family: list[str], nproc: int, steps: int, device: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        wall = genfast("train", *family, "--steps", steps, "--out", out, "--device", device, "--nproc", nproc,
                       "--sample-every", 10**9, "--checkpoint-every", 10**9, "-q")
        return checkpoint.read_header(Path(out) / "checkpoint.safetensors")["extra"]["images_per_s"], wall


def generation(model: str, nproc: int, n: int, device: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        wall = genfast("sample", model, "-n", n, "--format", "npz", "--batch-size", 500, "--out", Path(out) / "imgs",
                       "--device", device, "--nproc", nproc, "-q")
        return n / wall


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Median time of one all-reduce of `numel` floats between 2 local gloo processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "seconds"
        mp.spawn(_allreduce_worker, args=(numel, repeats, str(result), folder), nprocs=2)
        return float(result.read_text())


def _allreduce_worker(rank: int, numel: int, repeats: int, result: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    grads, times = torch.ones(numel), []
    for _ in range(repeats + 3):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(result).write_text(str(sorted(times[3:])[repeats // 2]))
    dist.destroy_process_group()


def step_arithmetic() -> None:
    """Gradient bytes against compute per step, for the GAN (batch 128) of the runs above."""
    from torch.utils.flop_counter import FlopCounterMode

    family = get_family("gan")
    config = GANConfig(channels=1, num_classes=10)
    modules = family.build(config)
    optimizers = family.optimizers(modules, config)
    params = sum(p.numel() for m in modules.values() for p in m.parameters())
    images, generator = torch.rand(config.batch_size, 1, 28, 28) * 2 - 1, torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        family.train_step(modules, optimizers, images, None, generator, config)
    flops = counter.get_total_flops()
    reduce_s = allreduce_seconds(params)
    print(f"\nGAN step (batch {config.batch_size}): {params / 1e6:.2f} M parameters -> {4 * params / 1e6:.1f} MB of "
          f"gradients all-reduced per step; {flops / 1e9:.1f} GFLOP of compute per step "
          f"({flops / (4 * params):.0f} FLOP per gradient byte).")
    print(f"Measured all-reduce of {4 * params / 1e6:.1f} MB between 2 gloo processes here: {reduce_s * 1e3:.1f} ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cores = os.cpu_count()
    print(f"torch {torch.__version__}, {cores} cores, device {args.device}; each of N processes gets {cores}/N threads")
    print("\n| work | processes | images/s | vs 1 process | wall s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, family in FAMILIES.items():
        base = None
        for nproc in args.nproc:
            images_per_s, wall = training(family, nproc, args.steps, args.device)
            base = base or images_per_s
            print(f"| train {name}, {args.steps} steps of 128 | {nproc} | {images_per_s:,.0f} | "
                  f"{images_per_s / base:.2f}x | {wall:.1f} |", flush=True)
    base = None
    for nproc in args.nproc:
        images_per_s = generation("gan-fashion-mnist", nproc, args.n, args.device)
        base = base or images_per_s
        print(f"| sample gan-fashion-mnist, {args.n:,} npz | {nproc} | {images_per_s:,.0f} | "
              f"{images_per_s / base:.2f}x | {args.n / images_per_s:.1f} |", flush=True)
    step_arithmetic()


if __name__ == "__main__":
    main()
