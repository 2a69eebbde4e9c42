"""Bulk generation into a folder, spread over worker processes.

`genfast sample NAME -n 100000 --out DIR --workers W` cuts the n images into batches and
hands them to W processes (each with cores / W threads), which write their batches
directly: one PNG per image (000000.png, ...) or one .npz shard per batch (uint8 images,
labels, indexes). Image i is the same whatever the number of workers or the batch size:
every process draws the whole noise of the seed once (cheap next to generating: 40 MB for
100,000 images of z = 100) and takes its rows from it.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genfast import images, pretrained
from genfast.errors import GenfastError
from genfast.fileio import atomic_path, ensure_dir

FORMATS = ("png", "npz")

_worker: dict = {}  # per process: the sampler, its noise and labels, the job's settings


def _setup(model: str, engine: str, n: int, seed: int, class_index: int | None, out: str, fmt: str,
           threads: int, settings: dict, condition: torch.Tensor | None) -> None:
    from genfast import engines, memory

    memory.reuse_freed_memory()
    torch.set_num_threads(threads)
    sampler = engines.apply(pretrained.load(model, **settings), engine)
    labels = sampler.labels(n, class_index) if condition is None else condition.expand(n, -1)
    _worker.update(sampler=sampler, noise=sampler.noise(n, seed), labels=labels, out=Path(out), fmt=fmt)


def _write(span: tuple[int, int]) -> int:
    start, end = span
    sampler, labels = _worker["sampler"], _worker["labels"]
    batch_labels = None if labels is None else labels[start:end]
    pixels = sampler(_worker["noise"][start:end], batch_labels)
    if _worker["fmt"] == "png":
        images.save_each(pixels, _worker["out"], start=start)
    else:
        shard = _worker["out"] / f"shard_{start:09d}.npz"
        with atomic_path(shard, durable=False) as tmp, open(tmp, "wb") as f:
            class_labels = batch_labels is not None and not batch_labels.is_floating_point()
            np.savez(f, images=images.to_uint8(pixels).numpy(), index=np.arange(start, end),
                     labels=batch_labels.numpy() if class_labels else np.array([]))
    return end - start


def generate(model: str, out: Path, n: int, seed: int = 0, class_index: int | None = None, batch_size: int = 256,
             workers: int = 1, fmt: str = "png", engine: str = "eager", progress: bool = True,
             settings: dict | None = None, condition: torch.Tensor | None = None) -> int:
    """Write n images of `model` into the folder `out`; returns how many were written.
    `settings` are the model's sampling settings (ar: decode, cfg); `condition`, one
    prompt embedding for every image (ar-text)."""
    if fmt not in FORMATS:
        raise GenfastError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if workers < 1:
        raise GenfastError(f"--workers must be at least 1, got {workers}")
    ensure_dir(out)
    spans = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    setup = (str(model), engine, n, seed, class_index, str(out), fmt, threads, settings or {},
             None if condition is None else condition[:1].clone())
    bar = tqdm(total=n, desc=f"sampling ({workers} worker{'s' if workers > 1 else ''})", unit="img",
               disable=not progress)
    written = 0
    if workers == 1:
        _setup(*setup)
        for span in spans:
            written += _write(span)
            bar.update(span[1] - span[0])
    else:
        # spawn, not fork: a forked copy of a process with a live thread pool can deadlock.
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_setup, initargs=setup) as pool:
            for count in pool.imap_unordered(_write, spans):
                written += count
                bar.update(count)
    bar.close()
    return written
