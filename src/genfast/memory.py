"""CPU memory: keep freed tensor memory for reuse, and measure a call's peak.

glibc's malloc serves every large allocation (above a threshold that it moves between
128 KiB and 32 MiB as it goes) with a fresh mmap, and gives it back on free. A
generator allocates the same few large activations on every call, so each call
page-faults them in again: on the 2-core VM, eager sampling of the seed's DCGAN at
batch 256 took 7,600-15,000 minor page faults and 40-80 ms per call, against under
900 and ~30 ms with mmap off (BENCHMARKS.md, "the allocator"). Which of the two a run
got depended on the history of the threshold, the bimodal timings first seen in bench.

`reuse_freed_memory()` turns mmap off and lets freed memory stay in the heap (up to
1 GiB at its top), the setting TCMalloc and jemalloc have by design. It is
process-wide, so the CLI calls it for the commands that generate; library users
call it themselves. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_AT_TOP = 1 << 30


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc():
    """glibc, or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallopt  # noqa: B018  (both symbols are glibc's)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def reuse_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for the next call.
    True where it took effect (glibc)."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_MAX, 0)) and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_AT_TOP))


def in_use_bytes() -> int | None:
    """Bytes the process has allocated with malloc and not freed (PyTorch's CPU tensors,
    ONNX Runtime's arena, Python's large objects): None where unknown."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def available_bytes() -> int | None:
    """Memory the machine can still give without swapping (the kernel's MemAvailable):
    None where unknown (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@contextmanager
def peak_cpu_bytes(interval_s: float = 2e-4) -> Iterator[dict]:
    """Within the block, sample `in_use_bytes` every `interval_s` from a second thread;
    afterwards result["peak"] is the highest level above the level at entry (None where
    unknown). Sampled, so a buffer that lives under `interval_s` can be missed; a
    generator's activations live for milliseconds."""
    result: dict = {"peak": None}
    start = in_use_bytes()
    if start is None:
        yield result
        return
    peak, done = start, threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, in_use_bytes())
            time.sleep(interval_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield result
    finally:
        done.set()
        watcher.join()
        result["peak"] = max(peak, in_use_bytes()) - start
