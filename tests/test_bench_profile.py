"""`genfast bench --profile DIR`: a torch.profiler trace per engine and batch size that parses
as Chrome's trace JSON, and a table of top operators that are the trace's own."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from genfast import bench, engines, timing

from test_cli import run


def trace_events(path: Path) -> list[dict]:
    trace = json.loads(path.read_text())
    return trace["traceEvents"]


def table(out: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table printed after the line starting with `heading`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]  # less the header and the rule


def test_profile_traces_every_engine_and_batch_and_names_their_top_operators(tiny_cgan, tmp_path: Path, capsys,
                                                                             monkeypatch):
    def unavailable(sampler):
        raise engines.EngineUnavailable("needs CUDA; this machine has none")

    monkeypatch.setitem(engines.ENGINES, "cudagraph-test", unavailable)
    folder = tmp_path / "traces"
    status, out, err = run(capsys, "bench", tiny_cgan, "--engines", "eager", "fused", "cudagraph-test",
                           "--batch-sizes", 2, 4, "--repeats", 2, "--profile", folder, "--json", tmp_path / "b.json",
                           "-q")
    assert status == 0, err
    assert sorted(p.name for p in folder.iterdir()) == [
        "eager-b2.pt.trace.json", "eager-b4.pt.trace.json", "fused-b2.pt.trace.json", "fused-b4.pt.trace.json"]

    profiled = table(out, "top operators by self CPU time per call")
    assert [(cells[0], cells[1]) for cells in profiled] == [("eager", "2"), ("eager", "4"), ("fused", "2"),
                                                            ("fused", "4")]  # the skipped engine has no row
    rows = {(r["engine"], r["batch_size"]): r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["cudagraph-test", 2]["trace"] is None and rows["cudagraph-test", 2]["top_operators"] is None
    for engine, batch, trace_name, *cells in profiled:
        events = trace_events(folder / trace_name)
        # The warm calls, each a range named after its row, and the aten operators inside them.
        calls = [e for e in events if e.get("name") == f"{engine} b{batch}" and e.get("cat") == "user_annotation"]
        assert len(calls) == bench.PROFILE_CALLS
        operators = {e["name"] for e in events if e.get("cat") == "cpu_op"}
        assert any(name.startswith("aten::") for name in operators)
        # The table's operators are the trace's, in the order of the JSON's, by falling self time.
        top = rows[engine, int(batch)]["top_operators"]
        assert rows[engine, int(batch)]["trace"] == str(folder / trace_name)
        assert 0 < len(top) <= bench.PROFILE_TOP and {op["name"] for op in top} <= operators
        assert [cell.split(" ")[0] for cell in cells if cell != "-"] == [op["name"] for op in top]
        times = [op["ms_per_call"] for op in top]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert 0 < sum(op["share"] for op in top) <= 1 + 1e-9
    # The eager generator's time is in its (transposed) convolutions: the profile must say so.
    assert any("conv" in op["name"] for op in rows["eager", 4]["top_operators"])


def test_without_profile_there_are_no_traces(tiny_gan, tmp_path: Path, capsys):
    status, out, err = run(capsys, "bench", tiny_gan, "--engines", "eager", "--batch-sizes", 2, "--repeats", 2,
                           "--json", tmp_path / "b.json", "-q")
    assert status == 0, err
    assert "top operators" not in out
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["trace"] is None and row["top_operators"] is None


def test_a_profile_folder_that_is_a_file_is_one_line_before_any_work(tiny_gan, tmp_path: Path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    status, out, err = run(capsys, "bench", tiny_gan, "--profile", taken, "--json", tmp_path / "b.json", "-q")
    assert status == 1 and err.count("\n") == 1 and f"--profile {taken} is a file; give a folder" in err, err
    assert taken.read_text() == "mine" and not (tmp_path / "b.json").exists() and out == ""


def test_nvtx_ranges_on_cuda_only(monkeypatch):
    named = []
    monkeypatch.setattr(torch.cuda.nvtx, "range", lambda label: named.append(label) or contextlib.nullcontext())
    with timing.named("fused b16", torch.device("cpu")):  # a CPU build's NVTX would raise: never called
        pass
    assert named == []
    with timing.named("fused b16", torch.device("cuda")):
        pass
    assert named == ["fused b16"]


@pytest.mark.parametrize("decode, expected", [(None, "fused+bf16-b16.pt.trace.json"),
                                              ("static", "eager-static-b1.pt.trace.json")])
def test_trace_names_say_engine_decode_and_batch(decode, expected):
    engine = "fused+bf16" if decode is None else "eager"
    assert bench.trace_name(engine, decode, 16 if decode is None else 1) == expected
