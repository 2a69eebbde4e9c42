"""`genfast train --log wandb`: a W&B run written offline beside an unchanged TensorBoard log,
continued by a resumed run; a missing library or an unknown target is one line."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from genfast.errors import GenfastError
from genfast.train import WANDB_ID_NAME, TrainOptions, train

from conftest import train_tiny
from test_cli import run

BLOCK = 32768  # the .wandb file is LevelDB's log format: 32 KiB blocks of checksummed chunks
FULL, LAST = 1, 4


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never a network, whatever the machine's W&B settings say."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_records(path: Path):
    """The protobuf records of one offline run's .wandb file (wandb 0.31 ships no reader)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""  # after the 7-byte header: magic, 0xBEE1, version
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(folder: Path) -> tuple[str, dict, dict[int, dict]]:
    """(run id, config, history by step) of one offline-run-* folder."""
    (path,) = folder.glob("run-*.wandb")
    run_id, config, history = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    return run_id, config, history


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars | {tag: [(e.step, 0.0) for e in events.Images(tag)] for tag in events.Tags()["images"]}


def test_wandb_run_holds_the_losses_beside_an_unchanged_tensorboard_log_and_resumes(tmp_path: Path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    train_tiny(both, steps=6, log_every=2, sample_every=3, log=("tensorboard", "wandb"))
    train_tiny(alone, steps=6, log_every=2, sample_every=3)

    # TensorBoard's log is the one a TensorBoard-only run writes: the same tags at the same
    # steps, the same losses (a seeded CPU run is bit-reproducible; images/s is a clock).
    logged, reference = tensorboard(both), tensorboard(alone)
    assert logged.keys() == reference.keys() and "train/loss_d" in logged and "samples" in logged
    for tag in reference:
        assert [s for s, _ in logged[tag]] == [s for s, _ in reference[tag]], tag
        if tag != "train/images_per_s":
            assert logged[tag] == reference[tag], tag
    assert not (alone / "wandb").exists() and not (alone / WANDB_ID_NAME).exists()

    # W&B's run: the id kept in the run folder, the config, the same scalars at the same steps.
    (first,) = offline_runs(both)
    run_id, config, history = wandb_run(first)
    assert run_id == (both / WANDB_ID_NAME).read_text().strip() and first.name.endswith(f"-{run_id}")
    assert config["family"] == "gan" and config["data"] == "fake" and config["seed"] == 0
    assert config["config"]["batch_size"] > 0 and config["total_steps"] == 6
    assert sorted(history) == [2, 3, 4, 6]  # scalars every 2 steps, sample grids at 3 and 6
    for step, value in logged["train/loss_d"]:
        assert history[step]["train/loss_d"] == pytest.approx(value, rel=1e-6)
    for step in (3, 6):
        assert history[step]["samples/_type"] == "image-file"  # nested values come flat, keys joined by /
        assert (first / "files" / history[step]["samples/path"]).is_file()
    assert "samples/path" not in history[2] and "train/loss_d" not in history[3]

    # A resumed run is the same W&B run, continued from the checkpoint's step.
    train_tiny(both, steps=10, log_every=2, resume=True, log=("tensorboard", "wandb"))
    first_again, second = offline_runs(both)
    assert first_again == first
    resumed_id, _, resumed = wandb_run(second)
    assert resumed_id == run_id == (both / WANDB_ID_NAME).read_text().strip()
    assert sorted(resumed) == [8, 10] and all("train/loss_g" in row for row in resumed.values())


def test_a_wandb_that_cannot_start_is_one_line_and_closes_tensorboard(tmp_path: Path, capsys, monkeypatch):
    def no_network(**kwargs):
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", no_network)
    closed = []
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter.close", lambda writer: closed.append(writer))
    status, _, err = run(capsys, "train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 2, "--out",
                         tmp_path / "run", "--log", "tensorboard,wandb", "-q")
    assert status == 1 and err.count("\n") == 1, err
    assert "W&B could not start the run: network is unreachable; WANDB_MODE=offline logs locally" in err
    assert len(closed) == 1 and not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_missing_wandb_names_the_extra(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    status, _, err = run(capsys, "train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 2, "--out",
                         tmp_path / "run", "--log", "wandb", "-q")
    assert status == 1 and err == "genfast: error: --log wandb needs the wandb library: pip install 'genfast[wandb]'\n"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_log_target_lists_the_valid_ones(tmp_path: Path, capsys):
    status, _, err = run(capsys, "train", "gan", "--data", "fake", "--out", tmp_path / "run", "--log",
                         "tensorboard,mlflow")
    assert status == 2 and err.count("\n") == 1
    assert "unknown log target 'mlflow'; choose from tensorboard, wandb" in err


def test_the_library_refuses_an_unknown_log_target_before_any_work(tmp_path: Path):
    with pytest.raises(GenfastError, match="unknown log target 'mlflow'; choose from tensorboard, wandb"):
        train("gan", TrainOptions(out=tmp_path / "run", data="fake", steps=1, progress=False, log=("mlflow",)),
              preset="tiny")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_only_rank_0_logs_to_wandb(tmp_path: Path):
    out = tmp_path / "run"
    argv = ["train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 4, "--log-every", 2, "--out", out,
            "--nproc", 2, "--log", "tensorboard,wandb", "-q"]
    subprocess.run([sys.executable, "-m", "genfast", *map(str, argv)],
                   env=os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}, check=True,
                   capture_output=True)
    (only,) = offline_runs(out)
    assert sorted(wandb_run(only)[2]) == [2, 4]
