"""`genfast bench` on a tiny model: a well-formed table, JSON and plot; unavailable engines skipped."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from genfast import engines

from test_cli import run


def test_bench_writes_table_json_and_plot(tiny_cgan, tmp_path: Path, capsys, monkeypatch):
    def unavailable(sampler):
        raise engines.EngineUnavailable("needs CUDA; this machine has none")

    monkeypatch.setitem(engines.ENGINES, "cudagraph-test", unavailable)
    status, out, err = run(capsys, "bench", tiny_cgan, "--engines", "eager", "fused", "cudagraph-test",
                           "--batch-sizes", 2, 8, "--repeats", 3, "--json", tmp_path / "b.json",
                           "--plot", tmp_path / "b.png", "-q")
    assert status == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["engine"], r["batch_size"]) for r in rows] == [
        ("eager", 2), ("eager", 8), ("fused", 2), ("fused", 8), ("cudagraph-test", 2), ("cudagraph-test", 8)]
    for r in rows:
        assert {"engine", "batch_size", "images_per_s", "speedup_vs_eager", "max_abs_diff", "fid", "status"} <= r.keys()
    eager, fused, skipped = rows[0], rows[2], rows[4]
    assert eager["speedup_vs_eager"] == 1.0 and eager["max_abs_diff"] == 0.0
    assert fused["status"] == "ok" and fused["images_per_s"] > 0 and fused["max_abs_diff"] < 1e-5
    assert fused["speedup_vs_eager"] == fused["images_per_s"] / eager["images_per_s"]
    assert skipped["status"] == "skipped: needs CUDA; this machine has none" and skipped["images_per_s"] is None
    assert fused["p90_ms"] >= fused["median_ms"] > 0
    # The table: a header, a rule, one line per row, in the JSON's order.
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and table[2].startswith("| eager | 2 | ok |")
    assert "| cudagraph-test | 8 | skipped: needs CUDA" in out
    plot = np.array(Image.open(tmp_path / "b.png"))
    assert plot.shape[0] > 100 and plot.shape[1] > 100 and plot.std() > 0  # a real picture, not blank


def test_bench_rejects_an_unknown_engine(tiny_gan, capsys):
    status, _, err = run(capsys, "bench", tiny_gan, "--engines", "fused+warp")
    assert status == 2 and "unknown engine 'warp'" in err
