"""`auto`: the fastest engine stack that keeps the images, measured on this machine and remembered.

A decision is made for one (model, device, batch bucket), in a bounded time:

1. The candidates of the sampler's kind (ONE_CALL_CANDIDATES, or LOOP_CANDIDATES for a model
   that decodes in a loop), cheapest to build first. A stack that cannot run here is skipped
   without being built: CUDA-only engines on a CPU, ONNX Runtime missing, and whatever an
   engine itself refuses at once (EngineUnavailable: a loop whose decode has no fixed part).
2. Each is built and called once on a fixed probe of noise at the bucket's batch size. It
   is kept when its images stay within the tolerance its engines are tested at (TOLERANCES:
   max and mean pixel error against eager fp32 on the same noise; on a conditional model with
   a shipped judge, the judge's class accuracy too) and its one-off cost (building and first
   call) fits what is left of the time budget. A build cannot be stopped part-way, so a
   stack expected to take longer than what is left (its one-off in this model's earlier
   decisions here, else BUILD_PRIOR_S for its slow engines) is not started; candidates left
   untried make the decision incomplete, and it is remade for a job allowing twice its time.
3. The kept stacks, eager always among them, are timed in interleaved rounds (the order
   rotating each round), median per call.
4. With `check_fid=N` (the slow check: `genfast tune --check-fid N`), each kept stack's FID
   over N images must be within FID_MARGIN of eager's.

The decision is cached in the user's cache folder (`cache_path`), keyed by what would change
it: the weights' digest, the machine (CPU model and ISA flags or GPU name, thread count, torch
and ONNX Runtime versions: machine.py), the device, the batch bucket and, for a loop, its
decoding strategy and sampling settings. A warm cache decides in milliseconds; a damaged
cache file is ignored with a one-line warning and rewritten.

Which kept stack a job gets: the one that makes its n images soonest, one-off cost included
(n unknown, as for a server: the fastest per image); a stack must be MIN_GAIN times eager's
speed to replace it, so timing noise never trades the reference for a slower stack. A job so
small that eager makes it in under SMALL_JOB_S gets eager without a decision (deciding would
cost more than it could save), and a job's decision gets at most as long as eager needs for
the whole job: `genfast tune` decides ahead of time, with a larger budget.

The batch size. `resolve(sampler, batch_size, apply, n)` decides once, for a job: sample,
bulk and serve call it, so all of a job's images come from one stack, and say its one-line
`Choice.line()`. The registry's `auto` (`engines.apply(sampler, "auto")`, for the Python API
and `bench --engines auto`) resolves lazily instead: at the first call of each batch bucket,
keeping each bucket's stack. It takes the loaded (eager) sampler and comes alone in a stack.

Why `apply` is passed in: the registry (engines/__init__.py) holds `auto`, so this module
cannot import the registry back (genfast keeps its imports free of cycles). The tolerances
live here for the same reason, and engines re-exports them for the engines' own tests.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genfast import machine, metrics, timing
from genfast.checkpoint import weights_digest
from genfast.engines.compiled import bucket
from genfast.errors import EngineUnavailable, GenfastError, GenfastWarning
from genfast.families.base import LoopNetwork, Sampler
from genfast.fileio import ensure_dir, user_cache, write_bytes

Apply = Callable[[Sampler, str], Sampler]  # engines.apply: a sampler through a stack's name


@dataclass(frozen=True)
class Tolerance:
    """How far an engine's images may be from eager fp32's on the same noise: what its tests
    assert, and what `auto` keeps a stack to. Pixels are in [-1, 1]."""

    max_abs: float               # the largest |pixel difference|
    mean_abs: float              # the mean |pixel difference|
    accuracy_drop: float = 0.0   # conditional models: how far the judge's class accuracy may fall


FP32_ROUNDING = Tolerance(1e-5, 1e-5)
TOLERANCES = {
    "eager": Tolerance(0.0, 0.0),
    "fused": FP32_ROUNDING,                   # BatchNorm folded: the same arithmetic, reordered
    "compile": FP32_ROUNDING,
    "cudagraph": Tolerance(1e-4, 1e-4),
    "onnx": Tolerance(1e-4, 1e-4),            # another runtime's kernels, fp32 still
    "bf16": Tolerance(0.15, 0.01, 0.02),      # 8 bits of mantissa: a few hundredths at most
    "fp16": Tolerance(0.15, 0.01, 0.02),      # 11 bits: bf16's bound holds with room to spare
    "int8": Tolerance(math.inf, 0.03, 0.02),  # ~1% of the range on average; a few pixels far more
    "int8-inductor": Tolerance(math.inf, 0.03, 0.02),  # the same bound: int8 inputs, fp32 outputs
}


def tolerance(stack: str) -> Tolerance:
    """A stack's tolerance: its engines' added up (each is bounded against the network it wraps,
    so their errors add at worst). An engine missing from TOLERANCES is held to fp32 rounding:
    a lossy engine must say how lossy."""
    parts = [TOLERANCES.get(name, FP32_ROUNDING) for name in stack.split("+")]
    return Tolerance(sum(t.max_abs for t in parts), sum(t.mean_abs for t in parts),
                     sum(t.accuracy_drop for t in parts))


# Cheapest to build first: module rewrites (milliseconds), then recordings and compilations
# (seconds), then exports to another runtime (seconds, more on a large model).
ONE_CALL_CANDIDATES = (
    "eager", "fused", "bf16", "fused+bf16", "fp16", "fused+fp16",
    "fused+cudagraph", "fused+bf16+cudagraph", "fused+fp16+cudagraph",
    "compile", "fused+compile", "fused+bf16+compile", "fused+fp16+compile",
    "fused+bf16+compile+cudagraph", "fused+fp16+compile+cudagraph",
    "onnx", "int8", "int8-inductor",
)
# A loop's engines wrap its decode's fixed part (or record the whole decode); reduced precision
# would change the tokens drawn, which no pixel tolerance survives.
LOOP_CANDIDATES = ("eager", "onnx", "compile", "cudagraph", "compile+cudagraph")
NEEDS_CUDA = ("fp16", "cudagraph")
NEEDS_ONNXRUNTIME = ("onnx", "int8")
# What building the slow engines costs before this machine has been seen doing it (seconds for
# the shipped GAN on the 2-core AMD EPYC; what earlier decisions measured here replaces them).
BUILD_PRIOR_S = {"compile": 5.0, "onnx": 5.0, "int8": 10.0, "int8-inductor": 20.0}

BUDGET_S = 20.0       # a cold decision's time when nothing smaller is asked for
SMALL_JOB_S = 1.0     # a job eager makes faster than this gets eager without a decision
MIN_GAIN = 1.05       # a stack replaces eager only this much faster (timing noise is a few %)
MIN_ROUNDS, MAX_ROUNDS = 3, 15
TIMING_S = 2.0        # interleaved timing stops after this long, once MIN_ROUNDS are done
CLASS_PROBE_MIN = 64  # images a class accuracy is judged on, at least
FID_MARGIN = 0.02     # check_fid: a stack's FID may exceed eager's by this fraction
PROBE_SEED = 1234
MAX_ENTRIES = 1000    # decisions kept in the cache, newest first


@dataclass
class Trial:
    """One candidate stack in a decision: what became of it, and what was measured."""

    engine: str
    status: str = "kept"                 # or why not: "skipped: ...", "over tolerance: ...", ...
    one_off_s: float | None = None       # building it and its first call
    images_per_s: float | None = None    # kept stacks: interleaved timing, median call
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    accuracy_drop: float | None = None   # eager's class accuracy less this stack's
    fid_change: float | None = None      # check_fid: FID relative to eager's, less 1

    @property
    def kept(self) -> bool:
        return self.status == "kept"


@dataclass
class Decision:
    """Every candidate's trial at one batch bucket, and what the decision cost."""

    batch: int
    trials: list[Trial]
    budget_s: float
    complete: bool          # no candidate was left untried for want of time
    seconds: float          # how long the decision took
    fid_n: int = 0          # images the FID check was over (0: not made)
    decided_at: float = 0.0
    model_key: str = ""     # the cache key less the batch: shared by one model's decisions on one machine
    about: dict = field(default_factory=dict)  # model, machine and settings, for people reading the cache

    @classmethod
    def from_json(cls, entry: dict) -> Decision:
        """A decision read from the cache, checked enough that using it cannot fail later."""
        decision = cls(**{**entry, "trials": [Trial(**trial) for trial in entry["trials"]]})
        _numbers(decision, "batch", "budget_s", "seconds", "fid_n")
        for trial in decision.kept():
            if not isinstance(trial.engine, str):
                raise ValueError(f"a stack named {trial.engine!r}")
            _numbers(trial, "one_off_s", "images_per_s", "max_abs_diff", "mean_abs_diff")
            if not trial.images_per_s > 0:
                raise ValueError(f"{trial.engine} made no images")
        decision.trial("eager")
        return decision

    def kept(self) -> list[Trial]:
        return [trial for trial in self.trials if trial.kept]

    def trial(self, engine: str) -> Trial:
        found = [trial for trial in self.kept() if trial.engine == engine]
        if not found:
            raise ValueError(f"no kept '{engine}' trial")
        return found[0]

    def speedup(self, trial: Trial) -> float:
        return trial.images_per_s / self.trial("eager").images_per_s

    def best(self, n: int | None) -> Trial:
        """The kept stack that makes n images soonest, its one-off cost included (n None: the
        fastest per image); only stacks MIN_GAIN times eager's speed compete with it."""
        eager = self.trial("eager")
        worth = [t for t in self.kept() if t is eager or self.speedup(t) >= MIN_GAIN]

        def seconds(trial: Trial) -> float:
            return 1 / trial.images_per_s if n is None else trial.one_off_s + n / trial.images_per_s

        return min(worth, key=seconds)  # eager comes first: a tie keeps it


def _numbers(record, *names: str) -> None:
    """Each named field of a record read from the cache a number from 0 up (NaN and text fail)."""
    for name in names:
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{name} is {value!r}, not a number from 0 up")


@dataclass
class Choice:
    """The stack a job gets, and the one line that says why."""

    engine: str
    why: str
    decision: Decision | None = None  # None when no decision was made (a small job, no network)

    def line(self) -> str:
        return f"auto: {self.engine} ({self.why})"


def resolve(sampler: Sampler, batch_size: int, apply: Apply, n: int | None = None, settings: dict | None = None,
            budget_s: float | None = None, check_fid: int = 0, fresh: bool = False) -> tuple[Sampler, Choice]:
    """`sampler` (eager) through the stack `auto` chooses for a job of n images (None: open-ended,
    a server) made batch_size at a time, and that choice. `settings`: the sampling settings the
    model was loaded with (ar: cfg, temperature, ...), part of the cache key. `budget_s` bounds
    a decision (default: BUDGET_S, or eager's time for the job when that is less); `fresh`
    decides even when the cache holds a decision (genfast tune)."""
    if batch_size < 1:
        raise GenfastError(f"batch size must be at least 1, got {batch_size}")
    if sampler.module is None:
        return apply(sampler, "eager"), Choice("eager", "this sampler has no network for engines to wrap")
    decoding = _with_fixed_shapes(sampler)
    fast, choice = _resolve(decoding, batch_size, apply, n, settings, budget_s, check_fid, fresh)
    if decoding is not sampler:
        decode, fixed = sampler.module.decode, decoding.module.decode
        choice = dataclasses.replace(choice, why=f"decoding {fixed}, {decode}'s tokens; {choice.why}")
    return fast, choice


def _resolve(sampler: Sampler, batch_size: int, apply: Apply, n: int | None, settings: dict | None,
             budget_s: float | None, check_fid: int, fresh: bool) -> tuple[Sampler, Choice]:
    size = bucket(batch_size)
    path, facts = cache_path(), _facts(sampler, settings)
    key, model_key = _digest(facts | {"batch": size}), _digest(facts)
    entries = _read(path)
    cached = None if fresh else _cached(entries, key, path)
    # An incomplete decision (made for a shorter job) serves jobs up to twice its time: estimates
    # of a job's time differ from run to run, and a decision must not be remade for each.
    if cached is not None and cached.fid_n >= check_fid and (
            cached.complete or 2 * cached.budget_s >= _budget(budget_s, n, 1 / cached.trial("eager").images_per_s)):
        chosen = cached.best(n)
        why = _why(cached, chosen, n, f"cached in {_shown(path)}")
        try:
            return apply(sampler, chosen.engine), Choice(chosen.engine, why, cached)
        except GenfastError as e:  # an engine renamed or removed since: decide again
            warnings.warn(GenfastWarning(f"the cached engine choice {chosen.engine} no longer runs ({e}); "
                                         f"deciding again"), stacklevel=2)
    probe = _Probe.of(sampler, size)
    if budget_s is None and n is not None and (job_s := n * probe.eager_s / size) < SMALL_JOB_S:
        return apply(sampler, "eager"), Choice("eager", f"{n} images take about {job_s:.2g} s here: too few to pay "
                                                        f"for a decision; `genfast tune` makes one ahead of time")
    budget = _budget(budget_s, n, probe.eager_s / size)
    decision, built = _decide(sampler, probe.judged(sampler), apply, budget, check_fid,
                              _one_offs_seen(entries, model_key))
    decision.model_key = model_key
    decision.about = {"model": sampler.info.get("path", sampler.info.get("model")),
                      "machine": machine.current(sampler.device).describe(), "device": str(sampler.device),
                      "settings": _settings(sampler, settings)}
    where = f"decided in {decision.seconds:.1f} s"
    if _store(path, key, decision):
        where += f", cached in {_shown(path)}"
    chosen = decision.best(n)
    return built[chosen.engine], Choice(chosen.engine, _why(decision, chosen, n, where), decision)


# Decoding strategies that draw the same tokens as another with fixed shapes, for the same
# noise (test_ar holds kv to static's tokens): auto decides over that one's stacks, since only
# a fixed-shape decode has the parts that compile and onnx wrap (ONNX Runtime runs static's
# whole decode ~10x faster than eager kv at batch 1 on the 2-core AMD EPYC VM).
SAME_TOKENS = {"kv": "static"}


def _with_fixed_shapes(sampler: Sampler) -> Sampler:
    if isinstance(sampler.module, LoopNetwork) and sampler.module.decode in SAME_TOKENS:
        return sampler.with_decoding(SAME_TOKENS[sampler.module.decode])
    return sampler


def _budget(asked: float | None, n: int | None, eager_image_s: float) -> float:
    """A decision's time: as asked; else BUDGET_S, and no more than eager needs for the job's n images."""
    if asked is not None:
        return asked
    return BUDGET_S if n is None else min(BUDGET_S, n * eager_image_s)


def per_bucket(sampler: Sampler, apply: Apply) -> Sampler:
    """The registry's `auto`: each batch bucket's stack resolved at its first call (module
    docstring), for a job of unknown length; `info["auto"]` records bucket -> stack."""
    stacks: dict[int, Sampler] = {}
    chosen: dict[int, str] = {}

    def run(noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        size = bucket(len(noise))
        if size not in stacks:
            stacks[size], choice = resolve(sampler, size, apply)
            chosen[size] = choice.engine
        return stacks[size](noise, labels)

    return dataclasses.replace(sampler, fn=run, info=sampler.info | {"auto": chosen})


def table(decision: Decision) -> str:
    """Every candidate of a decision as a markdown table (genfast tune)."""
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    eager = decision.trial("eager").images_per_s
    lines = ["| engine | status | one-off s | images/s | vs eager | max diff | mean diff | class acc. drop | FID |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in decision.trials:
        ratio = None if t.images_per_s is None else t.images_per_s / eager
        cells = [t.engine, t.status, fmt(t.one_off_s, ".2f"), fmt(t.images_per_s, ",.0f"),
                 fmt(ratio, ".2f") + ("x" if ratio else ""), fmt(t.max_abs_diff, ".1e"), fmt(t.mean_abs_diff, ".1e"),
                 fmt(t.accuracy_drop, "+.3f"), fmt(t.fid_change, "+.1%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the decision ---------------------------------------------------------------------------------

@dataclass
class _Probe:
    """The fixed noise every candidate is called on, eager's images of it, and what eager costs."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    expected: torch.Tensor           # eager's pixels, fp32 on the CPU
    eager_s: float                   # one eager call, warm
    judge: metrics.Judge | None = None  # the class check's judge (`judged`), when there is one
    accuracy: float | None = None       # eager's class accuracy on the probe

    @classmethod
    def of(cls, sampler: Sampler, batch: int) -> _Probe:
        noise, labels = sampler.noise(batch, PROBE_SEED), sampler.labels(batch)
        sampler(noise, labels)  # warm-up: a first call's allocations are not the model's speed
        start = time.perf_counter()
        expected = sampler(noise, labels).float().cpu()
        return cls(noise, labels, expected, time.perf_counter() - start)

    def judged(self, sampler: Sampler) -> _Probe:
        """With the class check, for a conditional model whose data set has a judge, on enough images."""
        if self.labels is None or len(self.labels) < CLASS_PROBE_MIN or (judge := _judge(sampler)) is None:
            return self
        return dataclasses.replace(self, judge=judge, accuracy=_accuracy(judge, self.expected, self.labels))


def _judge(sampler: Sampler) -> metrics.Judge | None:
    """The shipped classifier of the model's data set (genfast eval's judge); a model of a data
    set without one is held to its pixel bounds alone."""
    if "dataset" not in sampler.info:
        return None
    try:
        return metrics.load_judge(sampler.info["dataset"], device=str(sampler.device),
                                  image_shape=sampler.image_shape)
    except GenfastError:
        return None


def _accuracy(judge: metrics.Judge, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = judge.embed([pixels], len(pixels), "", progress=False)[1]
    return float((predicted == labels.cpu()).double().mean())


def _decide(sampler: Sampler, probe: _Probe, apply: Apply, budget: float, check_fid: int,
            one_offs_seen: dict[str, float]) -> tuple[Decision, dict[str, Sampler]]:
    """Try the candidates within `budget` seconds, time the kept ones; returns the decision and
    the kept stacks, built (the chosen one is used as it is: no second build). A build cannot
    be stopped part-way (a compilation takes as long as it takes), so a stack whose one-off
    cost is expected to exceed what is left is not started."""
    start = time.perf_counter()
    trials = [Trial("eager", one_off_s=0.0, max_abs_diff=0.0, mean_abs_diff=0.0,
                    accuracy_drop=None if probe.accuracy is None else 0.0)]
    built = {"eager": apply(sampler, "eager")}
    for stack in (LOOP_CANDIDATES if sampler.loops else ONE_CALL_CANDIDATES)[1:]:
        left = budget - (time.perf_counter() - start)
        if left <= 0:
            trials.append(Trial(stack, "not tried: the time budget was spent"))
            continue
        if (expected := _expected_one_off(stack, one_offs_seen)) > left:
            how = "its one-off took" if stack in one_offs_seen else "building it takes about"
            trials.append(Trial(stack, f"not tried: {how} {expected:.1f} s, more than the {left:.1f} s left"))
            continue
        trial, fast = _try(stack, sampler, probe, apply, left)
        trials.append(trial)
        if trial.kept:
            built[stack] = fast
    # Eager alone needs no race: its probe call was timed.
    per_call = _interleaved(built, probe, sampler.device, TIMING_S) if len(built) > 1 else {"eager": probe.eager_s}
    for trial in trials:
        if trial.kept:
            trial.images_per_s = len(probe.noise) / per_call[trial.engine]
    if check_fid:
        _check_fid(trials, built, sampler, check_fid)
    untried = any(trial.status.startswith("not tried") for trial in trials)
    decision = Decision(len(probe.noise), trials, budget, complete=not untried, seconds=time.perf_counter() - start,
                        fid_n=check_fid, decided_at=time.time())
    return decision, {t.engine: built[t.engine] for t in trials if t.kept}


def _expected_one_off(stack: str, seen: dict[str, float]) -> float:
    """A stack's one-off cost as this model's earlier decisions here measured it, else its slow engines' priors."""
    return seen.get(stack, sum(BUILD_PRIOR_S.get(name, 0.0) for name in stack.split("+")))


def _try(stack: str, sampler: Sampler, probe: _Probe, apply: Apply, left: float) -> tuple[Trial, Sampler | None]:
    """Build one candidate and call it once on the probe; its trial says whether it is kept."""
    if why := _cannot_run_here(stack, sampler):
        return Trial(stack, f"skipped: {why}"), None
    start = time.perf_counter()
    try:
        fast = apply(sampler, stack)
        out = fast(probe.noise, probe.labels).float().cpu()
    except EngineUnavailable as e:
        return Trial(stack, f"skipped: {e}"), None
    except Exception as e:  # a stack that breaks on this model must not stop `genfast sample`: it loses
        return Trial(stack, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"), None
    trial = Trial(stack, one_off_s=time.perf_counter() - start)
    if out.shape != probe.expected.shape:
        trial.status = f"failed: images of shape {tuple(out.shape)}, eager makes {tuple(probe.expected.shape)}"
        return trial, None
    difference = (out - probe.expected).abs()
    trial.max_abs_diff, trial.mean_abs_diff = float(difference.max()), float(difference.mean())
    if probe.judge is not None:
        trial.accuracy_drop = probe.accuracy - _accuracy(probe.judge, out, probe.labels)
    allowed = tolerance(stack)
    # Written as "not within", so that NaN pixels fail too.
    if not trial.max_abs_diff <= allowed.max_abs:
        trial.status = f"over tolerance: max pixel diff {trial.max_abs_diff:.2g} > {allowed.max_abs:g}"
    elif not trial.mean_abs_diff <= allowed.mean_abs:
        trial.status = f"over tolerance: mean pixel diff {trial.mean_abs_diff:.2g} > {allowed.mean_abs:g}"
    elif trial.accuracy_drop is not None and not trial.accuracy_drop <= allowed.accuracy_drop + 1e-9:
        trial.status = f"over tolerance: class accuracy {trial.accuracy_drop:.3f} below eager's"
    elif trial.one_off_s > left:
        trial.status = f"one-off {trial.one_off_s:.1f} s ran past the time budget"
    return trial, fast if trial.kept else None


def _cannot_run_here(stack: str, sampler: Sampler) -> str | None:
    """Why a stack cannot run here, known without building it (its other engines would be built
    first, and fused's layout timing alone costs a second)."""
    parts = stack.split("+")
    if sampler.device.type != "cuda" and (cuda := [p for p in parts if p in NEEDS_CUDA]):
        return f"{cuda[0]} needs CUDA"
    if machine.current().onnxruntime is None and (ort := [p for p in parts if p in NEEDS_ONNXRUNTIME]):
        return f"{ort[0]} needs onnxruntime: pip install 'genfast[onnx]'"
    return None


def _interleaved(built: dict[str, Sampler], probe: _Probe, device: torch.device, seconds: float) -> dict[str, float]:
    """Median seconds per call of each stack, timed in rounds (each stack once per round, the
    order rotating), so that a machine speeding up or slowing down skews none; at least
    MIN_ROUNDS, at most MAX_ROUNDS, and no more rounds once `seconds` have passed."""
    calls = {name: functools.partial(fast, probe.noise, probe.labels) for name, fast in built.items()}
    for call in calls.values():  # the probe call warmed each up once; a second settles caches
        call()
    names, times = list(calls), {name: [] for name in calls}
    start = time.perf_counter()
    for round_ in range(MAX_ROUNDS):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            times[name].append(timing.seconds(calls[name], device))
        if round_ + 1 >= MIN_ROUNDS and time.perf_counter() - start > seconds:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def _check_fid(trials: list[Trial], built: dict[str, Sampler], sampler: Sampler, n: int) -> None:
    """The slow check: each kept stack's FID over n images (genfast eval's) against eager's."""
    def fid(fast: Sampler) -> float:
        return metrics.evaluate(fast, n=n, seed=PROBE_SEED, device=str(sampler.device), progress=False)["fid"]

    reference = fid(built["eager"])
    for trial in trials:
        if trial.kept and trial.engine != "eager":
            trial.fid_change = fid(built[trial.engine]) / reference - 1
            if not trial.fid_change <= FID_MARGIN:
                trial.status = f"over tolerance: FID {trial.fid_change:+.1%} against eager's"


def _why(decision: Decision, chosen: Trial, n: int | None, where: str) -> str:
    """The parenthesis of the one line: the speed-up and error of the chosen stack, or why eager stays."""
    eager, batch = decision.trial("eager"), decision.batch
    if chosen is not eager:
        return (f"{decision.speedup(chosen):.1f}x eager at batch {batch} here, max pixel diff "
                f"{chosen.max_abs_diff:.2g}; {where}")
    fastest = max(decision.kept(), key=lambda t: t.images_per_s)
    if fastest is not eager and decision.speedup(fastest) >= MIN_GAIN:
        return (f"{fastest.engine} is {decision.speedup(fastest):.1f}x at batch {batch}, but its "
                f"{fastest.one_off_s:.1f} s set-up costs more than {n} images save; {where}")
    tried = sum(1 for t in decision.trials if t.one_off_s is not None) - 1
    if not tried:
        return f"no other stack runs here for this model at batch {batch} (`genfast tune` says why); {where}"
    return f"no other stack was {MIN_GAIN}x faster within tolerance at batch {batch} here ({tried} tried); {where}"


# --- the cache ------------------------------------------------------------------------------------

def cache_path() -> Path:
    """$GENFAST_AUTO_CACHE, else auto.json in genfast's cache folder ($XDG_CACHE_HOME/genfast,
    else ~/.cache/genfast: where data sets are kept too)."""
    if env := os.environ.get("GENFAST_AUTO_CACHE"):
        return Path(env).expanduser()
    return user_cache() / "auto.json"


def cache_key(sampler: Sampler, batch: int, settings: dict | None = None) -> str:
    """A digest of everything a decision depends on (module docstring)."""
    return _digest(_facts(sampler, settings) | {"batch": bucket(batch)})


def _facts(sampler: Sampler, settings: dict | None) -> dict:
    """What a decision depends on, the batch aside."""
    return {"weights": weights_digest(sampler.module), "machine": asdict(machine.current(sampler.device)),
            "device": str(sampler.device), "settings": _settings(sampler, settings)}


def _digest(facts: dict) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _settings(sampler: Sampler, settings: dict | None) -> dict:
    """The sampling settings a decision is for: a loop's decoding strategy, and what was asked."""
    asked = {key: value for key, value in (settings or {}).items() if value is not None and key != "decode"}
    return asked | ({"decode": sampler.module.decode} if isinstance(sampler.module, LoopNetwork) else {})


def _read(path: Path, warn: bool = True) -> dict[str, dict]:
    """The cache's decisions by key; a missing file is an empty cache, a damaged one too (with a warning)."""
    try:
        entries = json.loads(path.read_text())["decisions"]
        if not isinstance(entries, dict):
            raise TypeError(f"'decisions' is a JSON {type(entries).__name__}")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        if warn:
            warnings.warn(GenfastWarning(f"ignoring the engine decisions in {_shown(path)}, which are damaged "
                                         f"({type(e).__name__}: {str(e)[:80]}); they will be made again"),
                          stacklevel=3)
        return {}


def _cached(entries: dict[str, dict], key: str, path: Path) -> Decision | None:
    entry = entries.get(key)
    if entry is None:
        return None
    try:
        return Decision.from_json(entry)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        warnings.warn(GenfastWarning(f"ignoring a damaged engine decision in {_shown(path)} ({str(e)[:80]}); "
                                     f"it will be made again"), stacklevel=3)
        return None


def _one_offs_seen(entries: dict[str, dict], model_key: str) -> dict[str, float]:
    """The longest one-off cost of each stack in this model's earlier decisions on this machine."""
    seen: dict[str, float] = {}
    for entry in entries.values():
        trials = entry.get("trials") if isinstance(entry, dict) and entry.get("model_key") == model_key else None
        for trial in trials if isinstance(trials, list) else []:
            one_off = trial.get("one_off_s") if isinstance(trial, dict) else None
            if isinstance(one_off, float | int) and isinstance(trial.get("engine"), str):
                seen[trial["engine"]] = max(seen.get(trial["engine"], 0.0), one_off)
    return seen


def _store(path: Path, key: str, decision: Decision) -> bool:
    """Add a decision to the cache (read again just before, so others' recent ones are kept; the
    newest MAX_ENTRIES stay); False, with a warning, when it cannot be written."""
    entries = _read(path, warn=False) | {key: asdict(decision)}
    newest = sorted(entries.items(), key=lambda item: _when(item[1]), reverse=True)[:MAX_ENTRIES]
    try:
        ensure_dir(path.parent)
        write_bytes(path, (json.dumps({"decisions": dict(newest)}, indent=1) + "\n").encode())
    except GenfastError as e:
        warnings.warn(GenfastWarning(f"the engine decision was not cached: {e}"), stacklevel=3)
        return False
    return True


def _when(entry) -> float:
    """When a cached entry was decided (0 for one that does not say: it goes first)."""
    value = entry.get("decided_at") if isinstance(entry, dict) else None
    return value if isinstance(value, float | int) else 0.0


def _shown(path: Path) -> str:
    """A path as people write it: ~ for the home folder."""
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + os.sep) else str(path)
