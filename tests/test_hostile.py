"""Hostile and faulty input: crafted checkpoints, counts that would exhaust memory, full
disks, damaged manifests, names at the file-system's limit. Each case is one GenfastError
(one line from the CLI), costs little, and loses nothing already written."""

from __future__ import annotations

import errno
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import genfast
from genfast import bulk, checkpoint, memory
from genfast.errors import GenfastError

from test_cli import run

# --- crafted checkpoints -------------------------------------------------------------------------


def crafted(source: Path | str, tmp_path: Path, name: str = "crafted.safetensors", **changes) -> Path:
    """A copy of a real checkpoint with its header (config, dataset, extra) or weights changed."""
    ckpt = checkpoint.load(source)
    for where, values in changes.items():
        if where == "modules":
            for key, tensor in values.items():
                module, _, param = key.partition(".")
                ckpt.modules[module][param] = tensor
        else:
            getattr(ckpt, where).update(values)
    path = tmp_path / name
    checkpoint.save(ckpt, path)
    return path


def refused_cheaply(path: Path, match: str, **load) -> None:
    """genfast.load refuses the file with `match`, using at most a few MB beyond its size."""
    with memory.peak_cpu_bytes() as peak, pytest.raises(GenfastError, match=match):
        genfast.load(path, **load)
    if peak["peak"] is not None:
        assert peak["peak"] < path.stat().st_size * 3 + 32 * 2**20, f"{peak['peak'] / 2**20:.0f} MB"


@pytest.mark.parametrize("key, value, match", [
    ("image_size", 800, "do not fit its config"),           # shapes disagree with the tensors
    ("image_size", 10**9, "image_size=1000000000 is outside 4..1024"),
    ("z_dim", 10**6, "do not fit its config"),
    ("hidden_channels", 10**30, "hidden_channels"),
    ("channels", 0, "channels=0 is outside 1..4"),
])
def test_a_header_that_lies_about_sizes_is_refused_before_any_network(tiny_gan, tmp_path, key, value, match):
    refused_cheaply(crafted(tiny_gan, tmp_path, config={key: value}), match)


def test_class_counts_and_names_must_agree_with_the_model(tiny_cgan, tmp_path):
    refused_cheaply(crafted(tiny_cgan, tmp_path, config={"num_classes": 10**9}), "num_classes=1000000000 is outside")
    refused_cheaply(crafted(tiny_cgan, tmp_path, dataset={"class_names": [f"c{i}" for i in range(20)]}),
                    "names 20 classes for a model of 10")
    refused_cheaply(crafted(tiny_cgan, tmp_path, dataset={"class_names": list(range(10))}), "class_names")


@pytest.mark.parametrize("what, tensor, match", [
    ("nan", lambda t: torch.full_like(t, float("nan")), "holds NaN or infinite values"),
    ("int", lambda t: t.to(torch.int32), "is torch.int32, not floating point"),
    ("bool", lambda t: t > 0, "is torch.bool, not floating point"),
])
def test_weights_that_would_give_black_grids_are_refused(tiny_gan, tmp_path, what, tensor, match):
    weight = checkpoint.load(tiny_gan).modules["generator"]["fc.weight"]
    refused_cheaply(crafted(tiny_gan, tmp_path, modules={"generator.fc.weight": tensor(weight)}), match)


def test_a_damaged_tokenizer_config_is_one_line(tmp_path):
    path = crafted("ar-mnist", tmp_path, config={"tokenizer_config": "{not json"})
    refused_cheaply(path, "tokenizer")
    ok = json.loads(checkpoint.read_header("ar-mnist")["config"]["tokenizer_config"])
    path = crafted("ar-mnist", tmp_path, config={"tokenizer_config": json.dumps(ok | {"codebook_size": 10**12})})
    refused_cheaply(path, "codebook_size=1000000000000 is outside")


def test_a_resumed_runs_header_is_checked_like_any_input(tiny_gan, tmp_path, capsys):
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    saved = run_folder / "checkpoint.safetensors"
    crafted(tiny_gan, run_folder, "checkpoint.safetensors", extra={"seed": "abc"})
    status, _, err = run(capsys, "train", "gan", "--out", run_folder, "--resume", "--steps", 10, "-q")
    assert status == 1 and err.count("\n") == 1 and "seed must be between 0 and" in err
    ckpt = checkpoint.load(tiny_gan)
    state = ckpt.optimizers["generator"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(3, 3)  # the moment of another weight's shape
    checkpoint.save(ckpt, saved)
    status, _, err = run(capsys, "train", "gan", "--out", run_folder, "--resume", "--steps", 10, "-q")
    assert status == 1 and err.count("\n") == 1 and "optimizer state does not fit the model" in err, err
    assert checkpoint.load(saved).step == ckpt.step  # nothing was overwritten


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=5)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["config", "dataset", "extra"]), key=st.sampled_from(
    ["image_size", "channels", "num_classes", "z_dim", "hidden_channels", "conditional", "class_names", "name",
     "batch_size", "leaky_slope", "seed"]), value=JSON_VALUES)
def test_any_header_value_loads_or_is_one_genfast_error(tiny_cgan, tmp_path, where, key, value):
    path = crafted(tiny_cgan, tmp_path, **{where: {key: value}})
    try:
        sampler = genfast.load(path)
    except GenfastError:
        return
    assert sampler.generate(2).shape == (2, 1, 28, 28)


# --- counts that would exhaust memory ------------------------------------------------------------

def test_a_huge_count_starts_without_allocating_for_it(tiny_cgan, tmp_path, capsys, monkeypatch):
    sampler = genfast.load(tiny_cgan)
    tracemalloc.start()
    first = next(sampler.batches(10**12, seed=1, batch_size=4))  # noise and labels a batch at a time
    assert torch.equal(first, sampler.generate(4, seed=1))
    status, _, err = run(capsys, "sample", tiny_cgan, "-n", 10**12, "--out", tmp_path / "g.png")
    assert status == 1 and "a grid holds at most 10,000 images" in err and not (tmp_path / "g.png").exists()

    # A folder job of 10^12 images: two shards made, then stopped; what it held stayed flat.
    made = []

    def two_shards(out, spec, shard, *args):
        made.append(shard)
        if len(made) > 2:
            raise KeyboardInterrupt
        return written(out, spec, shard, *args)

    written = bulk._write_shard
    monkeypatch.setattr(bulk, "_write_shard", two_shards)
    spec = bulk.job(str(tiny_cgan), n=10**12, seed=0, fmt="npz", shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        bulk.generate(spec, tmp_path / "big", batch_size=4, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert made == [0, 1, 2] and len(list((tmp_path / "big").glob("shard_*.npz"))) == 2
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB"
    # A shard is held whole while it is made: its size is bounded too, before any work.
    status, _, err = run(capsys, "sample", tiny_cgan, "-n", 10**10, "--shard-size", 10**9, "--out", tmp_path / "s")
    assert status == 1 and "makes shards of 747,681 MiB" in err and not any((tmp_path / "s").iterdir())


# --- full disks, damaged manifests, long names ---------------------------------------------------

def test_a_full_disk_is_one_line_and_the_earlier_file_stays(tiny_gan, tmp_path, capsys, monkeypatch):
    out = tmp_path / "npz"
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 8, "--format", "npz", "--shard-size", 4, "--out", out,
                         "-q")
    assert status == 0, err
    before = (out / "manifest.json").read_bytes()
    real_replace = genfast.fileio.os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(genfast.fileio.os, "replace", full)
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 12, "--format", "npz", "--shard-size", 4, "--out",
                         tmp_path / "other", "-q")
    assert status == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    monkeypatch.setattr(genfast.fileio.os, "replace", real_replace)
    assert (out / "manifest.json").read_bytes() == before


def test_a_full_disk_while_training_is_one_line_not_buried(tiny_gan, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # TensorBoard's writer fails: one line, the checkpoint of the run so far kept.
    run_folder = tmp_path / "run"
    status, _, err = run(capsys, "train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 4, "--out",
                         run_folder, "-q")
    assert status == 0
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter.add_scalar", full)
    status, _, err = run(capsys, "train", "gan", "--out", run_folder, "--steps", 40, "--resume", "-q")
    assert status == 1 and err.count("\n") == 1 and "cannot write TensorBoard logs" in err, err
    assert checkpoint.load(run_folder / "checkpoint.safetensors").step == 4

    # The checkpoint cannot be written, and then neither can the writer close: the first is what is said.
    monkeypatch.undo()
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter.close", full)
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (_ for _ in ()).throw(
        GenfastError("cannot write checkpoint x: No space left on device; the previous file, if any, is unchanged")))
    status, _, err = run(capsys, "train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 4, "--out",
                         tmp_path / "run2", "-q")
    assert status == 1 and err == "genfast: error: cannot write checkpoint x: No space left on device; the previous " \
        "file, if any, is unchanged\n"


@pytest.mark.parametrize("damage", ["[]", "{not json", '"a string"'])
def test_a_damaged_manifest_says_which_file_and_what_to_do(tiny_gan, tmp_path, capsys, damage):
    out = tmp_path / "imgs"
    assert run(capsys, "sample", tiny_gan, "-n", 4, "--out", out, "-q")[0] == 0
    (out / "manifest.json").write_text(damage)
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 4, "--out", out, "-q")
    assert status == 1 and err.count("\n") == 1 and f"{out / 'manifest.json'} is damaged" in err
    assert "delete it" in err


def test_a_damaged_record_is_not_believed_and_its_shard_is_made_again(tiny_gan, tmp_path, capsys):
    args = ["sample", tiny_gan, "-n", 12, "--shard-size", 4, "--format", "npz", "--out", tmp_path / "a", "-q"]
    assert run(capsys, *args)[0] == 0
    whole = json.loads((tmp_path / "a" / "manifest.json").read_text())
    damaged = whole | {"complete": False, "shards": [whole["shards"][0] | {"count": "many"}, *whole["shards"][1:]]}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(damaged))
    (tmp_path / "a" / "shard_000000.npz").write_bytes(b"garbage")
    status, out, err = run(capsys, *args)
    assert status == 0 and "8 were already there" in out, err
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == whole  # healed, not copied forward


def test_names_at_the_file_systems_limit(tiny_gan, tmp_path, capsys):
    longest = tmp_path / ("g" * 251 + ".png")  # 255 bytes: legal, and so is writing it atomically
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 2, "--out", longest, "-q")
    assert status == 0 and longest.exists(), err
    status, _, err = run(capsys, "sample", tiny_gan, "-n", 2, "--out", tmp_path / ("g" * 252 + ".png"), "-q")
    assert status == 1 and "a file name may have at most 255 bytes" in err
