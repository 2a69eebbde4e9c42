"""Timing one call on a device: what bench's rows, auto's decisions, the peak probe and the
engines' own choices (layouts, frozen or not) all measure with, so they agree on what a
second is. On a GPU a call only queues work: CUDA events around it, then a wait, give the
device's time; on the CPU the wall clock around the call is that time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch


def named(label: str, device: torch.device):
    """An NVTX range on CUDA, for Nsight Systems; nothing elsewhere (a CPU build has no NVTX)."""
    return torch.cuda.nvtx.range(label) if device.type == "cuda" else contextlib.nullcontext()


def seconds(call: Callable[[], object], device: torch.device, label: str | None = None) -> float:
    """Seconds for one call, the device synchronised (CUDA events on a GPU, inside an NVTX range
    named `label` when one is given)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with named(label, device) if label else contextlib.nullcontext():
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin
