"""Several processes (torch.distributed, gloo on the CPU): training that matches one process,
resume at another world size, bulk generation that does not depend on the number of
processes, and jobs that survive a killed worker. Processes are started the way a user
starts them: `genfast ... --nproc 2` (torchrun's elastic agent)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genfast import bulk, checkpoint, distributed, images
from genfast.cli import main
from genfast.errors import GenfastError
from genfast.families import get_family
from genfast.families.gan import PRESETS
from genfast.seeding import NOISE_BLOCK
from genfast.train import TrainOptions, plan_run, train

# One thread a process: the two processes then do the same arithmetic as one process
# with one thread, and share the CI machine's cores without oversubscribing them.
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
# The tokenizer has no BatchNorm, and without dead-code restarts no noise: a deterministic
# function of its data, so one and two processes must agree to rounding. A wrong split of
# the batch, of the gradient averaging or of the codebook's statistics would not.
TOKENIZER = ["--data", "fake", "--preset", "tiny", "dead_threshold=0", "--log-every", 1, "--precision", "fp32"]


def genfast(*args, check: bool = True, **popen) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "genfast", *map(str, args)], env=ENV, capture_output=True,
                            text=True, timeout=300, **popen)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def start(*args) -> subprocess.Popen:
    """A genfast job left running (to be killed)."""
    return subprocess.Popen([sys.executable, "-m", "genfast", *map(str, args)], env=ENV, stderr=subprocess.PIPE,
                            text=True)


def losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "checkpoint.safetensors").modules["vqvae"]


def train_tokenizer(out: Path, steps: int, resume: bool = False) -> None:
    # fp32 pinned: where bf16 is faster (AVX-512 bf16, AMX) `auto` trains in bf16, whose rounding
    # differs between one batch and two halves of it far beyond these tolerances.
    options = TrainOptions(out=out, data="fake", steps=steps, resume=resume, progress=False, log_every=1,
                           sample_every=1000, checkpoint_every=1000, precision="fp32")
    train("vqvae", options, preset="tiny", pairs=["dead_threshold=0"])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_at_the_other_world_size(tmp_path: Path):
    one = tmp_path / "one"
    train_tokenizer(one, steps=12)

    # 2 processes for 6 steps, then 1 process to 12: the same losses and weights as 1 process throughout.
    two_then_one = tmp_path / "two-then-one"
    genfast("train", "vqvae", *TOKENIZER, "--steps", 6, "--out", two_then_one, "--nproc", 2, "-q")
    assert checkpoint.read_header(two_then_one / "checkpoint.safetensors")["extra"]["processes"] == 2
    # Rank 0 alone wrote logs: one event file, not one per process.
    assert len(list((two_then_one / "tb").glob("events.out.tfevents.*"))) == 1
    train_tokenizer(two_then_one, steps=12, resume=True)

    # 1 process for 6 steps, then 2 processes to 12.
    one_then_two = tmp_path / "one-then-two"
    train_tokenizer(one_then_two, steps=6)
    genfast("train", "vqvae", "--out", one_then_two, "--resume", "--steps", 12, "--log-every", 1, "--nproc", 2, "-q",
            "--precision", "fp32")

    reference = losses(one)
    assert len(reference) == 12
    for run in (two_then_one, one_then_two):
        np.testing.assert_allclose(losses(run), reference, rtol=1e-4)
        assert_same_weights(weights(run), weights(one))


@pytest.mark.slow
def test_the_transformer_trains_on_two_processes(tiny_vqvae, tmp_path: Path):
    """ar calls its GPT's forward through DDP and its own methods on the bare network."""
    run = tmp_path / "ar"
    genfast("train", "ar", "--data", "fake", "--preset", "tiny", f"tokenizer={tiny_vqvae}", "--conditional",
            "--steps", 4, "--out", run, "--nproc", 2, "-q")
    from genfast import pretrained

    saved = checkpoint.load(run / "checkpoint.safetensors")
    assert saved.step == 4 and saved.extra["processes"] == 2
    pixels = pretrained.load(run / "checkpoint.safetensors").generate(3, seed=0)
    assert pixels.shape == (3, 1, 28, 28) and bool(torch.isfinite(pixels).all())


@pytest.mark.slow
def test_a_user_error_met_by_every_process_is_said_once(tmp_path: Path):
    """Each process meets it; the launcher alone prints it, from the first process's error file."""
    result = genfast("train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 2, "--out", tmp_path / "run",
                     "--nproc", 2, "batch_size=15", "-q", check=False)
    message = [line for line in result.stderr.splitlines() if line.startswith("genfast:")]
    assert result.returncode == 1 and len(message) == 1, result.stderr
    assert "batch_size=15 is the global batch and must split evenly" in message[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_killed_training_process_stops_the_job_and_the_checkpoint_resumes(tmp_path: Path):
    run = tmp_path / "gan"
    job = start("train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 100_000, "--checkpoint-every", 10,
                "--out", run, "--nproc", 2, "-q")
    saved = run / "checkpoint.safetensors"
    wait_for(lambda: saved.exists(), job)
    os.kill(worker(job.pid, rank=1), signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1
    message = [line for line in err.splitlines() if line.startswith("genfast:")]
    assert len(message) == 1 and "process 1 of 2 was killed by SIGKILL" in message[0], err
    assert "Traceback" not in err  # rank 0's lost connection is not a second story
    assert f"the last checkpoint is {saved} at step" in message[0] and "continue with --resume" in message[0]

    step = checkpoint.load(saved).step  # whole and loadable
    assert step >= 10 and step % 10 == 0
    options = TrainOptions(out=run, data="fake", steps=step + 5, resume=True, progress=False)
    train("gan", options, preset="tiny")
    assert checkpoint.read_header(saved)["step"] == step + 5


@pytest.mark.slow
def test_two_processes_generate_what_one_does_and_a_killed_job_completes(tiny_cgan, tmp_path: Path):
    spec = bulk.job(tiny_cgan, n=60_000, seed=3, fmt="npz", shard_size=1000)
    torch.set_num_threads(1)
    bulk.generate(spec, tmp_path / "one", batch_size=500, progress=False)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    reference = manifest(tmp_path / "one")
    assert reference["complete"] and reference["images"] == 60_000 and len(reference["shards"]) == 60

    # Killed part-way: some shards finished, not all; the re-run, at another world size, completes the set.
    # --engine eager throughout: the bytes are compared with the eager reference above.
    job = start("sample", tiny_cgan, "-n", 60_000, "--seed", 3, "--format", "npz", "--batch-size", 500,
                "--engine", "eager", "--out", tmp_path / "two", "--nproc", 2, "-q")
    records = tmp_path / "two" / bulk.RECORDS
    wait_for(lambda: records.exists() and len(list(records.glob("shard_*.json"))) >= 4, job)
    os.kill(worker(job.pid, rank=1), signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1 and "process 1 of 2 was killed by SIGKILL" in err, err
    assert not manifest(tmp_path / "two").get("complete")
    finished = len(list(records.glob("shard_*.json")))
    assert 4 <= finished < 60
    out = genfast("sample", tiny_cgan, "-n", 60_000, "--seed", 3, "--format", "npz", "--batch-size", 500,
                  "--engine", "eager", "--out", tmp_path / "two", "-q").stdout
    assert f"({finished * 1000} were already there)" in out

    # 2 processes, from the start, in a fresh folder.
    genfast("sample", tiny_cgan, "-n", 60_000, "--seed", 3, "--format", "npz", "--batch-size", 500,
            "--engine", "eager", "--out", tmp_path / "fresh", "--nproc", 2, "-q")
    for folder in ("two", "fresh"):  # no gap, no duplicate, the same bytes
        assert manifest(tmp_path / folder)["shards"] == reference["shards"]
        assert not (tmp_path / folder / bulk.RECORDS).exists()
    shards = [np.load(tmp_path / "fresh" / f"shard_{k:06d}.npz") for k in range(60)]
    assert np.concatenate([s["index"] for s in shards]).tolist() == list(range(60_000))
    assert np.concatenate([s["labels"] for s in shards]).tolist() == [i % 10 for i in range(60_000)]
    # Every image a fresh draw: 60,000 different images, and each shard's record says so.
    assert len({digest for s in shards for digest in images.digests(torch.from_numpy(s["images"]))}) == 60_000
    assert all(record["distinct"] == record["count"] for record in reference["shards"])


def manifest(folder: Path) -> dict:
    return json.loads((folder / bulk.MANIFEST).read_text())


def wait_for(condition, job: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert job.poll() is None, f"the job ended first: {job.stderr.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def worker(launcher: int, rank: int) -> int:
    """The pid of the process of `rank` among the launcher's children (Linux /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} among {children}")


# --- without starting processes -------------------------------------------------------------------

def test_noise_of_any_range_is_that_of_the_whole(tiny_gan):
    from genfast import pretrained

    sampler = pretrained.load(tiny_gan)
    whole = sampler.noise(3 * NOISE_BLOCK + 7, seed=11)
    for start, n in [(0, 1), (0, 3), (5, NOISE_BLOCK), (NOISE_BLOCK - 1, 2), (2 * NOISE_BLOCK + 3, NOISE_BLOCK + 4)]:
        assert torch.equal(sampler.noise(n, 11, start), whole[start:start + n])
    assert not torch.equal(sampler.noise(4, 12), whole[:4])


def test_a_rerun_remakes_exactly_the_missing_or_damaged_shards(tiny_gan, tmp_path: Path):
    spec = bulk.job(tiny_gan, n=25, seed=1, fmt="png", shard_size=10)
    assert bulk.generate(spec, tmp_path, batch_size=4, progress=False) == (25, 0)
    original = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert sorted(original) == [f"{i:06d}.png" for i in range(25)]
    assert bulk.generate(spec, tmp_path, progress=False) == (0, 25)  # complete: nothing to do

    (tmp_path / "000003.png").unlink()                   # shard 0 lost a file
    (tmp_path / "000012.png").write_bytes(b"not a png")  # shard 1 damaged
    assert bulk.generate(spec, tmp_path, batch_size=7, progress=False) == (20, 5)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == original
    assert manifest(tmp_path)["complete"] and manifest(tmp_path)["images"] == 25


def test_a_folder_of_another_job_is_refused(tiny_gan, tiny_cgan, tmp_path: Path):
    bulk.generate(bulk.job(tiny_gan, n=5, seed=1, shard_size=2), tmp_path, progress=False)
    for other in (bulk.job(tiny_gan, n=5, seed=2, shard_size=2), bulk.job(tiny_cgan, n=5, seed=1, shard_size=2),
                  bulk.job(tiny_gan, n=5, seed=1, shard_size=3)):
        with pytest.raises(GenfastError, match="holds another job's images"):
            bulk.generate(other, tmp_path, progress=False)
    with pytest.raises(GenfastError, match="unknown format 'jpg'"):
        bulk.job(tiny_gan, n=2, fmt="jpg")


def test_npz_shards_are_reproducible_bytes(tiny_cgan, tmp_path: Path):
    spec = bulk.job(tiny_cgan, n=7, seed=5, fmt="npz", shard_size=4)
    bulk.generate(spec, tmp_path / "a", batch_size=3, progress=False)
    time.sleep(1.1)  # a zip time stamp would now differ
    bulk.generate(spec, tmp_path / "b", batch_size=7, progress=False)
    assert manifest(tmp_path / "a")["shards"] == manifest(tmp_path / "b")["shards"]
    shard = np.load(tmp_path / "a" / "shard_000001.npz")
    assert shard["images"].shape == (3, 1, 28, 28) and shard["index"].tolist() == [4, 5, 6]
    assert shard["labels"].tolist() == [4, 5, 6]


def test_process_options_are_checked(tiny_gan, tmp_path: Path, monkeypatch, capsys):
    options = TrainOptions(out=tmp_path / "run", data="fake", steps=1, progress=False, sync_batchnorm=True)
    gan = get_family("gan")
    with pytest.raises(GenfastError, match="must split evenly.*multiple of 3"):
        plan_run(gan, options, dict(PRESETS["tiny"]), None, world_size=3)
    with pytest.raises(GenfastError, match="--sync-bn .* CUDA only"):
        plan_run(gan, options, dict(PRESETS["tiny"], batch_size=30), None, world_size=3)

    assert main(["sample", str(tiny_gan), "--out", str(tmp_path / "grid.png"), "--nproc", "2"]) == 1
    assert "give --out a folder" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of 2, as under torchrun: a user error's status tells the launcher
    assert main(["sample", str(tiny_gan), "--out", str(tmp_path / "imgs"), "--nproc", "2"]) == distributed.USER_ERROR
    assert "under torchrun, drop it" in capsys.readouterr().err
    assert distributed.without_option(["a", "--nproc", "2", "b", "--nproc=3"], "--nproc") == ["a", "b"]
