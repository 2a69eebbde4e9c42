"""Shared fixtures: tiny seeded models trained on the `fake` data set, offline and fast."""

from __future__ import annotations

import pytest

from genfast.train import TrainOptions, train


def train_tiny(out, steps=6, conditional=False, **kwargs):
    """A few steps of the tiny DCGAN on fake data; returns the checkpoint path."""
    options = TrainOptions(out=out, data="fake", steps=steps, seed=kwargs.pop("seed", 0), progress=False,
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
