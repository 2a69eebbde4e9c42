"""`genfast bench`: every engine at every batch size, speed and quality side by side.

For each (engine, batch size): the one-off cost (wrapping + first call: folding,
compiling, quantising), a warm-up, then timed calls, interleaved across engines (the
device synchronised around each; CUDA events on a GPU), giving median and p90 latency
and images/s; the ratio to eager measured in the same run; the memory a warm call
needs (its peak above the level before it); the max and mean |pixel difference| to
eager on the same noise; and, with --fid-n, FID through `genfast eval`'s code for the
engine's images next to eager's. An engine that cannot run here is a row with status "skipped: why",
never a crash. For an ar model the decoding strategies are measured the same way,
each row also carrying its forward passes per image and its ratio to naive decoding.
Output: a markdown table, a JSON list of rows, a PNG plot.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genfast import engines, images, memory, metrics
from genfast.errors import GenfastError
from genfast.families.base import LoopNetwork, Sampler
from genfast.fileio import atomic_path, write_bytes, writing


@dataclass
class Row:
    engine: str
    batch_size: int
    decode: str | None = None      # ar models: the decoding strategy
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
    forward_passes_per_image: int | None = None  # ar models
    speedup_vs_naive: float | None = None         # ar models: against naive decoding, same engine


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


def _peak_memory_mb(call, device: torch.device) -> float | None:
    """Memory one warm call needs above what was in use before it: the CUDA allocator's
    peak on a GPU; on the CPU the process's malloc high-water mark, sampled (memory.py),
    which also sees ONNX Runtime's buffers."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with memory.peak_cpu_bytes() as peak:
        call()
    return None if peak["peak"] is None else peak["peak"] / 2**20


def _passes(sampler: Sampler) -> int | None:
    """Forward passes of an ar sampler's last call (its generator counts them)."""
    if sampler.module is None:
        return None
    return next((m.passes for m in sampler.module.modules() if isinstance(m, LoopNetwork)), None)


def measure(sampler: Sampler, engine_names: list[str], batch_sizes: list[int], repeats: int = 20,
            warmup: int = 3, fid_n: int = 0, seed: int = 0, progress: bool = True,
            decodes: list[str] | None = None) -> list[Row]:
    """Rows in engine order (then decode), then batch size. The timed calls of all
    variants are interleaved (round robin), so a machine that speeds up or slows down
    during the run skews none. For an ar model, `decodes` are its decoding strategies;
    each engine's rows are compared with eager under the same strategy."""
    if decodes and not sampler.loops:
        raise GenfastError("--decode applies to ar models, which decode token by token; this one makes an image "
                           "in one call")
    device = sampler.device
    # The eager reference of each strategy (the sampler itself when there is none).
    references = {decode: sampler if decode is None else sampler.with_decoding(decode) for decode in decodes or [None]}
    variants = [(name, decode) for name in engine_names for decode in references]
    ready: dict[tuple[str, str | None], tuple[Sampler, float]] = {}  # -> (its sampler, seconds to wrap)
    rows: dict[tuple[str, str | None, int], Row] = {}
    for name, decode in variants:
        try:
            start = time.perf_counter()
            ready[name, decode] = (engines.apply(references[decode], name), time.perf_counter() - start)
        except engines.EngineUnavailable as e:  # a row, not a crash; an unknown name is still an error
            rows.update({(name, decode, b): Row(name, b, decode, status=f"skipped: {e}") for b in batch_sizes})
    for batch in batch_sizes:
        noise, labels = sampler.noise(batch, seed), sampler.labels(batch)
        expected = {decode: reference(noise, labels).float().cpu() for decode, reference in references.items()}
        for (name, decode), (fast, wrap_s) in ready.items():
            start = time.perf_counter()
            out = fast(noise, labels).float().cpu()
            one_off = time.perf_counter() - start + (wrap_s if batch == batch_sizes[0] else 0.0)
            passes = _passes(fast)
            for _ in range(warmup):
                fast(noise, labels)
            difference = (out - expected[decode]).abs()
            call = functools.partial(fast, noise, labels)
            rows[name, decode, batch] = Row(name, batch, decode, one_off_s=one_off,
                                            max_abs_diff=float(difference.max()),
                                            mean_abs_diff=float(difference.mean()),
                                            peak_memory_mb=_peak_memory_mb(call, device),
                                            forward_passes_per_image=passes)
        times: dict[tuple[str, str | None], list[float]] = {key: [] for key in ready}
        calls = {key: functools.partial(fast, noise, labels) for key, (fast, _) in ready.items()}
        for _ in range(repeats):
            for key, call in calls.items():
                times[key].append(_timed(call, device))
        for (name, decode), seconds in times.items():
            ordered = sorted(seconds)
            row = rows[name, decode, batch]
            row.median_ms = 1000 * statistics.median(ordered)
            row.p90_ms = 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            row.images_per_s = 1000 * batch / row.median_ms
        for name, decode in ready:
            row = rows[name, decode, batch]
            if ("eager", decode) in ready:
                row.speedup_vs_eager = row.images_per_s / rows["eager", decode, batch].images_per_s
            if (name, "naive") in ready:
                row.speedup_vs_naive = row.images_per_s / rows[name, "naive", batch].images_per_s
    if fid_n:
        for (name, decode), (fast, _) in ready.items():
            fid = metrics.evaluate(fast, n=fid_n, seed=seed, progress=progress)["fid"]
            for batch in batch_sizes:
                rows[name, decode, batch].fid = fid
    return [rows[name, decode, batch] for name, decode in variants for batch in batch_sizes]


def markdown(rows: list[Row]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    decoding = any(r.decode for r in rows)  # ar models: decode, passes and the ratio to naive too
    lines = ["| engine | " + ("decode | " if decoding else "") + "batch | status | one-off s | median ms | p90 ms | "
             "images/s | vs eager | " + ("passes | vs naive | " if decoding else "") + "peak MB | max diff | FID |",
             "| --- | " + ("--- | " if decoding else "") + "---: | --- | ---: | ---: | ---: | ---: | ---: | "
             + ("---: | ---: | " if decoding else "") + "---: | ---: | ---: |"]
    for r in rows:
        cells = [r.engine, *([r.decode] if decoding else []), str(r.batch_size), r.status, fmt(r.one_off_s, ".2f"),
                 fmt(r.median_ms, ".3f"), fmt(r.p90_ms, ".3f"), fmt(r.images_per_s, ",.0f"),
                 fmt(r.speedup_vs_eager, ".2f") + ("x" if r.speedup_vs_eager else ""),
                 *([fmt(r.forward_passes_per_image, "d"), fmt(r.speedup_vs_naive, ".2f")] if decoding else []),
                 fmt(r.peak_memory_mb, ".1f"), fmt(r.max_abs_diff, ".1e"), fmt(r.fid, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    images.writable_target(path)
    write_bytes(path, (json.dumps([asdict(r) for r in rows], indent=2) + "\n").encode())


def plot(rows: list[Row], path: Path, title: str) -> None:
    """images/s against batch size, one line per engine (log-log)."""
    import matplotlib  # 0.3 s to import: only when a plot is asked for

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    images.writable_target(path)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for engine, decode in dict.fromkeys((r.engine, r.decode) for r in rows):
        points = [(r.batch_size, r.images_per_s) for r in rows
                  if (r.engine, r.decode) == (engine, decode) and r.status == "ok"]
        if points:
            axes.plot(*zip(*points), marker="o", label=engine if decode is None else f"{engine}, {decode}")
    axes.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with writing(path), atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
