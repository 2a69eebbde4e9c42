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

Where the time goes (--profile DIR): after the timed calls, a few warm calls of each
(engine, batch size) under torch.profiler (CPU activity, and CUDA's on a GPU), written as
a Chrome trace that Perfetto, chrome://tracing and TensorBoard's profiler plugin open, and
the operators that took the most self time, per row. On CUDA every call of an engine is an
NVTX range named after it, so a run under Nsight Systems (`nsys profile genfast bench ...`)
shows them by name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genfast import engines, images, memory, metrics, timing
from genfast.engines.compiled import bucket
from genfast.errors import GenfastError
from genfast.families.base import LoopNetwork, Sampler
from genfast.fileio import atomic_path, ensure_dir, write_bytes, writing
from genfast.machine import Machine
from genfast.peak import Peak

PROFILE_CALLS = 3  # warm calls in each trace: the steady state, in a file that opens quickly
PROFILE_TOP = 5    # operators named per row of the profile table


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
    trace: str | None = None                      # --profile: the file of this row's torch.profiler trace
    top_operators: list[dict] | None = None       # --profile: {name, ms_per_call, share} by self time
    gflops: float | None = None                   # achieved: the model's useful FLOPs per image x images/s
    peak: str | None = None                       # the measured peak it is held to ("bf16 conv")
    peak_fraction: float | None = None            # gflops / that peak


def _label(name: str, decode: str | None, batch: int) -> str:
    """What a row's calls are called in traces and NVTX ranges: "fused b16", "eager/static b1"."""
    return f"{name}{'/' + decode if decode else ''} b{batch}"


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


def _profiled(call, device: torch.device, label: str, path: Path) -> list[dict]:
    """PROFILE_CALLS warm calls under torch.profiler, each a range named `label`, written as a
    Chrome trace at `path`; returns the operators that took the most self time (module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(PROFILE_CALLS):
            with timing.named(label, device), record_function(label):
                call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with writing(path), atomic_path(path) as tmp:
        profiler.export_chrome_trace(str(tmp))
    return _top_operators(profiler.key_averages(), device, label)


def _top_operators(events, device: torch.device, label: str) -> list[dict]:
    """The PROFILE_TOP operators by self time (the device's on a GPU), each with its time per
    call and its share of all the calls' time. Only the host's events are ranked: on CUDA the
    kernels are listed too, and their time is already their launching operator's self time.
    The label's own range is not an operator; its self time (Python between operators) still
    counts in the whole that the shares are of."""
    cuda = device.type == "cuda"

    def self_us(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    whole = sum(map(self_us, host)) or 1.0
    ranked = sorted((e for e in host if e.key != label and self_us(e) > 0), key=self_us, reverse=True)
    return [{"name": e.key, "ms_per_call": self_us(e) / 1000 / PROFILE_CALLS, "share": self_us(e) / whole}
            for e in ranked[:PROFILE_TOP]]


def trace_name(name: str, decode: str | None, batch: int) -> str:
    """A row's trace file: the suffix TensorBoard's profiler plugin looks for, Chrome's JSON inside."""
    return f"{name}{'-' + decode if decode else ''}-b{batch}.pt.trace.json"


def _passes(sampler: Sampler) -> int | None:
    """Forward passes of an ar sampler's last call (its generator counts them)."""
    if sampler.module is None:
        return None
    return next((m.passes for m in sampler.module.modules() if isinstance(m, LoopNetwork)), None)


@dataclass(frozen=True)
class Work:
    """What one image costs, counted once per model on the eager reference call."""

    flops: float  # useful FLOPs per image
    kind: str     # "conv" or "matmul": which of the two holds most of them (which peak applies)


def useful_work(sampler: Sampler) -> Work:
    """The FLOPs per image of the eager reference (torch.utils.flop_counter on a call of 2
    images). For a model that decodes token by token, those of a KV-cache decode, whatever
    strategy a row uses: the work an image needs, not what a strategy spends (naive decoding
    recomputes every earlier token at each step; the rows' GFLOP/s then compare like with like)."""
    from torch.utils.flop_counter import FlopCounterMode

    if sampler.loops:
        with contextlib.suppress(GenfastError):  # a model no KV decode fits (MaskGIT) counts its own
            sampler = sampler.with_decoding(USEFUL_DECODE)
    noise, labels = sampler.noise(2, 0), sampler.labels(2)
    with FlopCounterMode(display=False) as counter:
        sampler(noise, labels)
    by_operator = counter.get_flop_counts().get("Global", {})
    total = sum(by_operator.values())
    conv = sum(count for operator, count in by_operator.items() if "conv" in str(operator))
    return Work(total / 2, "conv" if conv * 2 >= total else "matmul")


USEFUL_DECODE = "kv"  # the decode whose work counts as an ar image's useful work


def computes_in(engine: str) -> str:
    """The precision an engine stack's arithmetic runs in: the peak its rows are held to (a
    step named after a precision, or a variant of one: int8-inductor)."""
    steps = {step.split("-")[0] for step in engine.split("+")}
    return next((dtype for dtype in ("int8", "fp16", "bf16") if dtype in steps), "fp32")


def measure(sampler: Sampler, engine_names: list[str], batch_sizes: list[int], repeats: int = 20,
            warmup: int = 3, fid_n: int = 0, seed: int = 0, progress: bool = True,
            decodes: list[str] | None = None, profile: Path | None = None, peak: Peak | None = None) -> list[Row]:
    """Rows in engine order (then decode), then batch size. The timed calls of all
    variants are interleaved (round robin, the order rotating), so a machine that speeds up
    or slows down during the run skews none. For an ar model, `decodes` are its decoding strategies;
    each engine's rows are compared with eager under the same strategy. With `profile`
    (a folder), each row's trace is written there after its timed calls. Every row gets
    its achieved GFLOP/s (useful_work), and with `peak` (genfast.peak.measure()) its
    fraction of the peak in the precision it computes in."""
    if decodes and not sampler.loops:
        raise GenfastError("--decode applies to ar models, which decode token by token; this one makes an image "
                           "in one call")
    device = sampler.device
    if profile is not None:
        ensure_dir(profile)
    work = useful_work(sampler)
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
        calls = [(key, functools.partial(fast, noise, labels)) for key, (fast, _) in ready.items()]
        # The order rotates each round: what runs before a call changes its speed (a call after
        # ONNX Runtime's ran 10-25% slower on the AMX Xeon, whichever engine it was), so each
        # variant follows each other equally often.
        for round_ in range(repeats):
            for (name, decode), call in calls[round_ % len(calls):] + calls[:round_ % len(calls)]:
                times[name, decode].append(timing.seconds(call, device, _label(name, decode, batch)))
        for (name, decode), seconds in times.items():
            fast = ready[name, decode][0]
            ordered = sorted(seconds)
            row = rows[name, decode, batch]
            row.median_ms = 1000 * statistics.median(ordered)
            row.p90_ms = 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            row.images_per_s = 1000 * batch / row.median_ms
            row.gflops = work.flops * row.images_per_s / 1e9
            # auto (engines/auto.py) records the stack it chose for each batch bucket: that one computes.
            stack = fast.info.get("auto", {}).get(bucket(batch), name)
            if peak is not None and (held_to := peak.of(computes_in(stack), work.kind)) is not None:
                row.peak, peak_gflops = held_to
                row.peak_fraction = row.gflops / peak_gflops
        for name, decode in ready:
            row = rows[name, decode, batch]
            if ("eager", decode) in ready:
                row.speedup_vs_eager = row.images_per_s / rows["eager", decode, batch].images_per_s
            if (name, "naive") in ready:
                row.speedup_vs_naive = row.images_per_s / rows[name, "naive", batch].images_per_s
        if profile is not None:
            for (name, decode), call in calls:
                row = rows[name, decode, batch]
                row.trace = str(Path(profile) / trace_name(name, decode, batch))
                row.top_operators = _profiled(call, device, _label(name, decode, batch), Path(row.trace))
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
             "images/s | vs eager | GFLOP/s | of peak | " + ("passes | vs naive | " if decoding else "")
             + "peak MB | max diff | FID |",
             "| --- | " + ("--- | " if decoding else "") + "---: | --- | " + "---: | " * 7
             + ("---: | ---: | " if decoding else "") + "---: | ---: | ---: |"]
    for r in rows:
        cells = [r.engine, *([r.decode] if decoding else []), str(r.batch_size), r.status, fmt(r.one_off_s, ".2f"),
                 fmt(r.median_ms, ".3f"), fmt(r.p90_ms, ".3f"), fmt(r.images_per_s, ",.0f"),
                 fmt(r.speedup_vs_eager, ".2f") + ("x" if r.speedup_vs_eager else ""), fmt(r.gflops, ",.3g"),
                 "-" if r.peak_fraction is None else f"{r.peak_fraction:.1%} {r.peak}",
                 *([fmt(r.forward_passes_per_image, "d"), fmt(r.speedup_vs_naive, ".2f")] if decoding else []),
                 fmt(r.peak_memory_mb, ".1f"), fmt(r.max_abs_diff, ".1e"), fmt(r.fid, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_markdown(rows: list[Row]) -> str:
    """--profile's table: per row, its trace file and the operators that took the most self
    time, each with its milliseconds per call and its share of the calls' time."""
    decoding = any(r.decode for r in rows)
    ranks = [str(rank) for rank in range(1, PROFILE_TOP + 1)]
    lines = ["| engine | " + ("decode | " if decoding else "") + "batch | trace | " + " | ".join(ranks) + " |",
             "| --- | " + ("--- | " if decoding else "") + "---: | --- | " + " | ".join("---" for _ in ranks) + " |"]
    for r in rows:
        if r.top_operators is None:  # a skipped engine
            continue
        operators = [f"{op['name']} {op['ms_per_call']:.3f} ms ({op['share']:.0%})" for op in r.top_operators]
        cells = [r.engine, *([r.decode] if decoding else []), str(r.batch_size), Path(r.trace).name,
                 *operators, *["-"] * (PROFILE_TOP - len(operators))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(model: str, machine: Machine, peak: Peak | None) -> str:
    """What the table was measured on: the model, the machine (CPU model, ISA flags, threads,
    torch, the GPU), and its measured peak."""
    return f"{model} on {machine.describe()}" + ("" if peak is None else f"\n{peak.line()}")


def write_json(rows: list[Row], path: Path, machine: Machine | None = None, peak: Peak | None = None,
               settings: dict | None = None) -> None:
    """{"machine": ..., "peak": ..., "settings": ..., "rows": [...]}: the rows with what they were
    measured on, and the sampling settings given for every row (ar: cfg)."""
    images.writable_target(path)
    document = {"machine": None if machine is None else asdict(machine) | {"describe": machine.describe()},
                "peak": None if peak is None else asdict(peak), "settings": settings or {},
                "rows": [asdict(r) for r in rows]}
    write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


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
