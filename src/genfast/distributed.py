"""Running as one of several processes, on PyTorch's own distributed engine.

A job is spread over processes by `torchrun` (any number of nodes) or, on one machine,
by `genfast train|sample --nproc N`, which starts the same elastic agent torchrun uses
(`torch.distributed.launcher`). Each process learns its place from the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); a process started any other way is a
world of one, and every code path below is then a no-op, so the single-process tool is
the same program.

gloo is the backend on the CPU and NCCL on GPUs (one GPU per process: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
import uuid
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from genfast.errors import GenfastError


@dataclass(frozen=True)
class World:
    rank: int = 0        # this process among all of the job's
    size: int = 1        # how many processes the job has
    local_rank: int = 0  # this process among those of its machine: its GPU

    @property
    def main(self) -> bool:
        """Rank 0 alone writes what the job writes once (checkpoints, logs, manifests)."""
        return self.rank == 0


def world() -> World:
    """This process's place in the job, from the variables torchrun sets."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise GenfastError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None


def device_of(asked: torch.device, here: World) -> torch.device:
    """A process of a multi-GPU job uses the GPU of its local rank, whatever was asked."""
    if asked.type == "cuda" and here.size > 1:
        if here.local_rank >= torch.cuda.device_count():
            raise GenfastError(f"process {here.rank} needs GPU {here.local_rank}, but this machine has "
                               f"{torch.cuda.device_count()}; start at most that many processes per node")
        return torch.device("cuda", here.local_rank)
    return asked


@contextlib.contextmanager
def joined(device: torch.device):
    """The job's process group for the duration of the block (nothing in a world of one)."""
    here = world()
    if here.size == 1 or dist.is_initialized():
        yield here
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield here
    finally:
        # A DistributedDataParallel wrapper lives on in a reference cycle after its training
        # has returned, and with it its Reducer and the gloo group's worker threads. Left to
        # the collector they could be destroyed while the interpreter shuts down, which
        # aborts the process (SIGABRT, "terminate called without an active exception", seen
        # once in CI after a clean run); collected here, they go while everything is alive.
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over every process (in place; itself in a world of one)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """A trained module as DistributedDataParallel (gradients averaged over processes
    during backward); the module itself is returned in a world of one."""
    if not dist.is_initialized():
        return module
    # DDP warns when a gradient's strides differ from its bucket's, which for a weight with a
    # dimension of size 1 (the convolution of a 1-channel image) they may, harmlessly.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # Gradients as views of the all-reduce buckets: no copy in or out of them each step.
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper: for its methods and attributes, and for a
    forward pass that must not take part in the gradient averaging (a frozen network)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# --- starting N local processes ------------------------------------------------------------------

def without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` / `option=VALUE` (what the started processes are given)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


# The exit status of one of several processes that met a user error (and handed it over),
# told apart from a crash's 1 by the launcher.
USER_ERROR = 3
# Set for the processes `launch` starts: the launcher, not they, prints a user error.
LAUNCHED_BY_GENFAST = "GENFAST_LAUNCHED"


def lost_a_peer(error: BaseException) -> bool:
    """An error of the collective layer (gloo, NCCL): another process of the job is gone,
    which its own failure explains; this one's traceback would only bury that."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Connection reset")))


def launched_by_genfast() -> bool:
    return bool(os.environ.get(LAUNCHED_BY_GENFAST))


def hand_over_error(message: str) -> bool:
    """A user error met in one of several processes: written to the error file the elastic
    agent gives each process (TORCHELASTIC_ERROR_FILE), where `launch` (and torchrun's own
    summary) read the first failure's message. Returns whether this process should print
    the message itself: only rank 0 under a bare torchrun, so it is printed once."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
    return world().main and not launched_by_genfast()


class ProcessFailed(GenfastError):
    """One of the started processes stopped with an error: a user error (its message) or a crash."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error  # the message is the process's own GenfastError


class Interrupted(KeyboardInterrupt):
    """Ctrl-C of started processes: rank 0 has said where things stand."""


def launch(nproc: int, argv: list[str]) -> None:
    """Run `python -m genfast ARGV` as `nproc` processes on this machine, as
    `torchrun --standalone --nproc-per-node NPROC` would; returns when all have finished.
    Each process gets an equal share of the cores (unless OMP_NUM_THREADS says otherwise)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED_BY_GENFAST] = "1"
    # The agent logs each step of a failure (each of its modules at its own level); the one
    # line below says what a user needs.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "genfast", *argv)
    except SignalException:  # Ctrl-C: the agent has passed it on to the processes, which stop as one would
        raise Interrupted() from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the cause; the others were stopped because of it
        if e.failures.get(0) is not None and e.failures[0].exitcode == USER_ERROR:
            rank, failure = 0, e.failures[0]  # the error most often every process met: said as one process would
        status = failure.exitcode
        if status == USER_ERROR and isinstance(failure.message, str):
            raise ProcessFailed(failure.message if rank == 0 else f"(process {rank}) {failure.message}",
                                user_error=True) from None
        how = (f"was killed by {signal.Signals(-status).name}" if status < 0 and -status in signal.valid_signals()
               else f"exited with status {status}")
        raise ProcessFailed(f"process {rank} of {nproc} {how}, and the others were stopped", user_error=False) from None
    finally:
        os.environ.pop(LAUNCHED_BY_GENFAST, None)
