"""ONNX export round trip and the onnx engine, against eager on the same noise."""

from pathlib import Path

import numpy as np
import pytest
import torch

import genfast
from genfast import engines
from genfast.engines import TOLERANCES
from genfast.engines.onnx import export

ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cgan-mnist", "vae-fashion-mnist"])
def test_export_round_trip_equals_eager_at_any_batch_size(name, tmp_path: Path):
    sampler = genfast.load(name)
    path = export(sampler, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):  # one file, a dynamic batch dimension
        noise, labels = sampler.noise(n, 3), sampler.labels(n)
        feed = {"noise": noise.numpy()} | ({"labels": labels.numpy()} if labels is not None else {})
        out = session.run(None, feed)[0]
        assert out.shape == (n, 1, 28, 28)
        assert np.abs(out - sampler(noise, labels).numpy()).max() < 1e-4


@pytest.mark.slow
def test_onnx_engine_matches_eager(tmp_path: Path):
    sampler = genfast.load("gan-fashion-mnist")
    fast = engines.apply(sampler, "onnx")
    assert torch.allclose(fast.generate(20, seed=1), sampler.generate(20, seed=1), atol=TOLERANCES["onnx"].max_abs)


@pytest.mark.slow
def test_export_command_and_missing_runtime(tmp_path: Path, capsys, monkeypatch):
    from test_cli import run

    status, out, _ = run(capsys, "export", "cgan-mnist", "--out", tmp_path / "m.onnx")
    assert status == 0 and "inputs noise (B, 100), labels (B,)" in out and (tmp_path / "m.onnx").stat().st_size > 1e6
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(engines.EngineUnavailable, match="needs onnxruntime: pip install 'genfast\\[onnx\\]'"):
        engines.apply(genfast.load("gan-mnist"), "onnx")
    status, _, err = run(capsys, "export", "gan-mnist", "--out", tmp_path)
    assert status == 1 and "is a folder" in err
