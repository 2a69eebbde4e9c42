"""What machine this is: the facts that decide which engine pays off here (the CPU's model
and instruction sets, the thread count, the GPU, the runtimes' versions), read from the
machine, never assumed. bench prints them with every table, and `auto` keys its decisions
on them (a decision made on an AVX2-only CPU must not be reused on one with AMX).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
from dataclasses import asdict, dataclass

import torch

# The instruction sets that change which engine is fastest on x86 (bf16 and int8 paths of
# oneDNN, inductor and ONNX Runtime), and their names on ARM. /proc/cpuinfo spells them so.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "bf16", "i8mm", "sve")


@dataclass(frozen=True)
class Machine:
    cpu: str                 # the CPU's model name
    flags: tuple[str, ...]   # those of ISA_FLAGS this CPU has
    threads: int             # torch's intra-op threads
    gpu: str | None          # the CUDA device's name, when there is one
    torch: str
    onnxruntime: str | None  # None when not installed

    def describe(self) -> str:
        """One line for a table's header: "AMD EPYC (avx2, fma), 2 threads, torch 2.13.0+cpu"."""
        line = f"{self.cpu} ({', '.join(self.flags) or 'no AVX2'}), {self.threads} threads, torch {self.torch}"
        return line + (f", GPU {self.gpu}" if self.gpu else "")

    def key(self) -> str:
        """A short digest of everything here: equal on machines where the same choice holds."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def has(flag: str) -> bool:
    """Whether this CPU has the instruction set `flag` (a name from ISA_FLAGS)."""
    return flag in _cpu()[1]


def current(device: torch.device | None = None) -> Machine:
    """This machine, as seen now (the thread count can change between calls)."""
    model, flags = _cpu()
    gpu = None
    if device is not None and device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return Machine(model, flags, torch.get_num_threads(), gpu, torch.__version__, version("onnxruntime"))


@functools.cache
def _cpu() -> tuple[str, tuple[str, ...]]:
    """(model name, ISA flags) from /proc/cpuinfo on Linux; the platform's processor name and
    no flags elsewhere (an engine that needs a flag then reports itself unavailable)."""
    model, found = platform.processor() or platform.machine() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name":
                    model = value.strip()
                elif name in ("flags", "Features"):
                    found = set(value.split())
                if found and name == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return model, tuple(flag for flag in ISA_FLAGS if flag in found)


def version(package: str) -> str | None:
    """An installed package's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
