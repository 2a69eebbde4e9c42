"""`genfast bench`: every engine at every batch size, speed and quality side by side.

For each (engine, batch size): the one-off cost (wrapping + first call: folding,
compiling), a warm-up, then timed calls, interleaved across engines (the device
synchronised around each; CUDA events on a GPU), giving median and p90 latency and images/s; the ratio to eager
measured in the same run; the max and mean |pixel difference| to eager on the same
noise; and, with --fid-n, FID through `genfast eval`'s code for the engine's images
next to eager's. An engine that cannot run here is a row with status "skipped: why",
never a crash. Output: a markdown table, a JSON list of rows, a PNG plot.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genfast import engines, images
from genfast.families.base import Sampler


@dataclass
class Row:
    engine: str
    batch_size: int
    status: str = "ok"
    one_off_s: float | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    images_per_s: float | None = None
    speedup_vs_eager: float | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    peak_memory_mb: float | None = None
    fid: float | None = None


def _timed(call, device: torch.device) -> float:
    """Seconds for one call, the device synchronised (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def measure(sampler: Sampler, engine_names: list[str], batch_sizes: list[int], repeats: int = 20,
            warmup: int = 3, fid_n: int = 0, seed: int = 0, progress: bool = True) -> list[Row]:
    """Rows in engine order, then batch size. The timed calls of all engines are interleaved
    (round robin), so a machine that speeds up or slows down during the run skews no engine."""
    device = next(sampler.module.parameters()).device
    ready: dict[str, tuple[Sampler, float]] = {}  # engine -> (its sampler, seconds to wrap)
    rows: dict[tuple[str, int], Row] = {}
    for name in engine_names:
        try:
            start = time.perf_counter()
            ready[name] = (engines.apply(sampler, name), time.perf_counter() - start)
        except engines.EngineUnavailable as e:  # a row, not a crash; an unknown name is still an error
            rows.update({(name, b): Row(name, b, status=f"skipped: {e}") for b in batch_sizes})
    for batch in batch_sizes:
        noise, labels = sampler.noise(batch, seed), sampler.labels(batch)
        expected = sampler(noise, labels).float().cpu()
        for name, (fast, wrap_s) in ready.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            out = fast(noise, labels).float().cpu()
            one_off = time.perf_counter() - start + (wrap_s if batch == batch_sizes[0] else 0.0)
            for _ in range(warmup):
                fast(noise, labels)
            rows[name, batch] = Row(name, batch, one_off_s=one_off,
                                    max_abs_diff=float((out - expected).abs().max()),
                                    mean_abs_diff=float((out - expected).abs().mean()),
                                    peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20
                                    if device.type == "cuda" else None)
        times: dict[str, list[float]] = {name: [] for name in ready}
        for _ in range(repeats):
            for name, (fast, _) in ready.items():
                times[name].append(_timed(lambda: fast(noise, labels), device))
        for name in ready:
            ordered = sorted(times[name])
            row = rows[name, batch]
            row.median_ms = 1000 * statistics.median(ordered)
            row.p90_ms = 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            row.images_per_s = 1000 * batch / row.median_ms
        if "eager" in ready:
            for name in ready:
                rows[name, batch].speedup_vs_eager = rows[name, batch].images_per_s / rows["eager", batch].images_per_s
    if fid_n:
        from genfast import metrics

        for name, (fast, _) in ready.items():
            fid = metrics.evaluate(fast, n=fid_n, seed=seed, progress=progress)["fid"]
            for batch in batch_sizes:
                rows[name, batch].fid = fid
    return [rows[name, batch] for name in engine_names for batch in batch_sizes]


def markdown(rows: list[Row]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| engine | batch | status | one-off s | median ms | p90 ms | images/s | vs eager | max diff | FID |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.engine} | {r.batch_size} | {r.status} | {fmt(r.one_off_s, '.2f')} | "
                     f"{fmt(r.median_ms, '.3f')} | {fmt(r.p90_ms, '.3f')} | {fmt(r.images_per_s, ',.0f')} | "
                     f"{fmt(r.speedup_vs_eager, '.2f')}x | {fmt(r.max_abs_diff, '.1e')} | {fmt(r.fid, '.3f')} |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    from genfast.fileio import write_bytes

    images.writable_target(path)
    write_bytes(path, (json.dumps([asdict(r) for r in rows], indent=2) + "\n").encode())


def plot(rows: list[Row], path: Path, title: str) -> None:
    """images/s against batch size, one line per engine (log-log)."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    images.writable_target(path)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for engine in dict.fromkeys(r.engine for r in rows):
        points = [(r.batch_size, r.images_per_s) for r in rows if r.engine == engine and r.status == "ok"]
        if points:
            axes.plot(*zip(*points), marker="o", label=engine)
    axes.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    from genfast.fileio import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
