"""`train --precision auto`: a probe picks bf16 or fp32, the checkpoint records it, resume keeps it."""

import sys
from pathlib import Path

import pytest
import torch

import genfast.train  # noqa: F401  (the module; genfast.train is also the function of that name)
from genfast import checkpoint

from conftest import train_tiny
from test_cli import run

train = sys.modules["genfast.train"]


def faked(choice, calls):
    def probe(device, threads):
        calls.append(device)
        return choice, f"precision auto: {choice} (faked probe)"

    return probe


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
def test_auto_trains_in_what_the_probe_chose_and_records_it(choice, tmp_path: Path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(train, "probe_precision", faked(choice, calls))
    saved = checkpoint.load(train_tiny(tmp_path / "run", steps=2, precision=None))  # None: the default, auto
    assert calls == [torch.device("cpu")]
    assert saved.extra["precision"] == choice
    assert saved.extra["precision_probe"] == f"precision auto: {choice} (faked probe)"
    assert "precision auto" not in capsys.readouterr().err  # train_tiny is quiet: no notes


def test_the_cli_says_the_choice_in_one_line_unless_quiet(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(train, "probe_precision", faked("fp32", []))
    args = ("train", "gan", "--data", "fake", "--preset", "tiny", "--steps", 2)
    status, _, err = run(capsys, *args, "--out", tmp_path / "loud")
    assert status == 0 and "precision auto: fp32 (faked probe)\n" in err
    status, _, err = run(capsys, *args, "--out", tmp_path / "quiet", "-q")
    assert status == 0 and err == ""


def test_a_resumed_run_keeps_its_precision_and_asks_no_probe(tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "probe_precision", faked("bf16", calls))
    train_tiny(tmp_path / "run", steps=2, precision="auto")
    monkeypatch.setattr(train, "probe_precision", faked("fp32", calls))  # the machine would now choose otherwise
    resumed = checkpoint.load(train_tiny(tmp_path / "run", steps=4, precision=None, resume=True))
    assert resumed.step == 4 and resumed.extra["precision"] == "bf16" and len(calls) == 1
    assert resumed.extra["precision_probe"] == "precision auto: bf16 (faked probe)"  # how it was chosen, kept


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_asked_precisions_need_no_probe(asked, tmp_path: Path, monkeypatch):
    def refuse(device, threads):
        raise AssertionError("probed although a precision was asked for")

    monkeypatch.setattr(train, "probe_precision", refuse)
    saved = checkpoint.load(train_tiny(tmp_path / "run", steps=2, precision=asked))
    assert saved.extra["precision"] == asked and saved.extra["precision_probe"] is None


def test_the_real_probe_says_why_in_one_line():
    choice, line = train.probe_precision(torch.device("cpu"), torch.get_num_threads())
    assert choice in ("bf16", "fp32") and line.startswith(f"precision auto: {choice} (") and "\n" not in line


def test_the_cli_takes_auto_and_refuses_an_unknown_precision(capsys, tmp_path: Path):
    status, _, err = run(capsys, "train", "gan", "--out", tmp_path / "r", "--precision", "fp8")
    assert status == 2 and "invalid choice: 'fp8'" in err and "auto" in err
