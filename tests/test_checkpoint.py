import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from genfast import checkpoint, pretrained
from genfast.errors import GenfastError


def _example() -> checkpoint.Checkpoint:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return checkpoint.Checkpoint(family="gan", config={"z_dim": 3}, dataset={"name": "fake"}, step=7,
                                 modules={"net": model.state_dict()}, optimizers={"net": opt.state_dict()},
                                 extra={"total_steps": 9})


def test_round_trip_keeps_weights_and_optimizer_state(tmp_path: Path):
    saved = _example()
    checkpoint.save(saved, tmp_path / "c.safetensors")
    loaded = checkpoint.load(tmp_path / "c.safetensors")
    assert (loaded.family, loaded.step, loaded.config, loaded.extra) == ("gan", 7, {"z_dim": 3}, {"total_steps": 9})
    for key, value in saved.modules["net"].items():
        assert torch.equal(loaded.modules["net"][key], value)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    opt.load_state_dict(loaded.optimizers["net"])
    assert opt.param_groups[0]["lr"] == 0.01
    original = saved.optimizers["net"]["state"]
    for index, state in opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], original[index][key])


def test_loading_never_unpickles(tmp_path: Path, monkeypatch):
    checkpoint.save(_example(), tmp_path / "c.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert checkpoint.load(tmp_path / "c.safetensors").step == 7
    for name in pretrained.shipped(generative=True):
        assert pretrained.load(name).image_shape == (1, 28, 28)
    for path in pretrained.shipped(generative=False).values():
        assert checkpoint.load(path).family in ("classifier", "vqvae", "captioner", "clip")


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "c.safetensors"
    checkpoint.save(_example(), path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(GenfastError, match="cannot write checkpoint .*disk full; the previous file"):
        checkpoint.save(_example(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_files_give_one_clear_error(tmp_path: Path, damage):
    path = tmp_path / "c.safetensors"
    checkpoint.save(_example(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10,
                      "empty": b""}[damage])
    with pytest.raises(GenfastError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(GenfastError, match="not a genfast checkpoint"):
        checkpoint.load(tmp_path / "other.safetensors")
    with pytest.raises(GenfastError, match="not found"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_half_storage_loads_back_as_fp32(tmp_path: Path):
    saved = _example()
    checkpoint.save(saved, tmp_path / "h.safetensors", half=True)
    loaded = checkpoint.load(tmp_path / "h.safetensors")
    weight = loaded.modules["net"]["weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, saved.modules["net"]["weight"].half().float())


def test_written_files_get_ordinary_permissions(tmp_path: Path):
    # Atomic writes must not leave owner-only temp-file modes on the final file.
    umask = os.umask(0o022)
    try:
        checkpoint.save(_example(), tmp_path / "c.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("header, message", [
    ([], "not a genfast checkpoint header"),
    ({"format": "genfast-checkpoint", "format_version": 1, "family": "gan"}, "damaged header (field 'config')"),
    ({"format": "genfast-checkpoint", "format_version": 99}, "format v99; this genfast reads v1"),
])
def test_malformed_headers_are_one_clear_error(tmp_path: Path, header, message):
    import json

    from safetensors.torch import save_file

    save_file({"model.generator.x": torch.zeros(1)}, tmp_path / "c.safetensors",
              metadata={"genfast": json.dumps(header)})
    with pytest.raises(GenfastError, match=re.escape(message)):
        checkpoint.load(tmp_path / "c.safetensors")
