"""The run plan: every rule about what a training run may be, checked without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genfast import checkpoint
from genfast import config as configlib
from genfast.data import ImageSet
from genfast.errors import GenfastError
from genfast.families import get_family
from genfast.families.gan import GANConfig
from genfast.train import DEFAULT_EPOCHS, TrainOptions, plan_run, read_saved

GAN = get_family("gan")


def images(n=100, labelled=True, name="stub") -> ImageSet:
    return ImageSet(name, "train", torch.zeros(n, 1, 28, 28, dtype=torch.uint8),
                    torch.arange(n) % 4 if labelled else None, ("a", "b", "c", "d") if labelled else (), "stub")


def loader(n=100, labelled=True):
    """A stand-in for data.load: the data set named, as `n` blank images; remembers its calls."""
    calls = []

    def load(name, split, image_size=28, channels=None):
        calls.append((name, split, image_size, channels))
        return images(n, labelled, name)

    load.calls = calls
    return load


def saved_run(step=10, seed=3, total=20, data="stub", train_size=100, **config) -> checkpoint.Checkpoint:
    """What a resumable GAN checkpoint's header says (no weights: the plan reads none)."""
    return checkpoint.Checkpoint(
        family="gan", config=configlib.to_dict(GANConfig(batch_size=10, channels=1, num_classes=4, **config)),
        dataset={"name": data, "train_size": train_size, "class_names": list("abcd"), "image_shape": [1, 28, 28]},
        step=step, modules={}, optimizers={"generator": {"state": {}}}, extra={"seed": seed, "total_steps": total,
                                                                                "precision": "fp32"})


def fp32_probe(device, threads):
    """A stand-in for probe_precision that finds bf16 slower, as on the AVX2 machines."""
    return "fp32", "precision auto: fp32 (faked probe)"


def plan(options=None, asked=None, saved=None, world_size=1, load=None, probe=fp32_probe, **kwargs):
    options = options or TrainOptions(out=Path("unused"), data="stub", resume=saved is not None, **kwargs)
    return plan_run(GAN, options, {"batch_size": 10} if asked is None else asked, saved, world_size,
                    load_data=load or loader(), probe=probe)


def test_a_new_run_takes_its_options_and_the_data_sets_shape():
    load = loader()
    p = plan(asked={"batch_size": 10, "lr_g": 1e-3}, load=load, seed=5, steps=7)
    assert (p.seed, p.start, p.total, p.steps_per_epoch, p.precision) == (5, 0, 7, 10, "fp32")
    assert p.config.lr_g == 1e-3 and p.config.channels == 1 and p.config.num_classes == 4
    assert load.calls == [("stub", "train", 28, None)]
    assert p.dataset_info == {"name": "stub", "class_names": list("abcd"), "image_shape": [1, 28, 28],
                              "train_size": 100, "source": "stub"}
    assert plan().total == DEFAULT_EPOCHS * 10 and plan(epochs=2).total == 20
    assert plan(world_size=2).local_batch == 5


def test_a_resumed_run_keeps_its_data_seed_precision_length_and_config():
    load = loader()
    p = plan(saved=saved_run(), load=load, options=TrainOptions(out=Path("x"), resume=True))
    assert (p.data_name, p.seed, p.start, p.total, p.precision) == ("stub", 3, 10, 20, "fp32")
    assert load.calls == [("stub", "train", 28, 1)]  # the saved run's channels
    assert plan(saved=saved_run(), options=TrainOptions(out=Path("x"), resume=True, steps=30)).total == 30


@pytest.mark.parametrize("option, value", [("data", "mnist"), ("seed", 4)])
def test_resume_refuses_another_data_set_or_seed(option, value):
    what = "data set" if option == "data" else option
    with pytest.raises(GenfastError, match=f"--resume continues the saved run, whose {what}"):
        plan(saved=saved_run(), options=TrainOptions(out=Path("x"), resume=True, **{option: value}))


def test_resume_may_change_only_the_optimizers_keys():
    resumed = plan(saved=saved_run(), asked={"lr_g": 1e-5, "beta1": 0.3})
    assert resumed.config.lr_g == 1e-5 and resumed.config.beta1 == 0.3
    with pytest.raises(GenfastError, match="can change only lr_g, .*not: z_dim=64 \\(saved: 100\\)"):
        plan(saved=saved_run(), asked={"z_dim": 64})
    assert plan(saved=saved_run(), asked={"z_dim": 100}).config.z_dim == 100  # the same value is no change


def test_resume_refuses_another_family_an_inference_only_file_and_changed_data():
    other = saved_run()
    other.family = "vae"
    with pytest.raises(GenfastError, match="is a 'vae' checkpoint, not 'gan'"):
        plan(saved=other)
    slim = saved_run()
    slim.optimizers = {}
    with pytest.raises(GenfastError, match="inference-only checkpoint"):
        plan(saved=slim)
    with pytest.raises(GenfastError, match="now has 100 training images, the saved run had 90"):
        plan(saved=saved_run(train_size=90))


@pytest.mark.parametrize("saved", [None, saved_run(step=20)])
def test_nothing_to_train_is_refused(saved):
    with pytest.raises(GenfastError, match="nothing to train: the run is at step"):
        plan(saved=saved, steps=saved.step if saved else 0) if saved is None else \
            plan(saved=saved, options=TrainOptions(out=Path("x"), resume=True, steps=15))


@pytest.mark.parametrize("asked, world_size, kwargs, message", [
    ({"batch_size": 10, "channels": 3}, 1, {}, "channels are set by the data set"),
    ({"batch_size": 1}, 1, {}, "batch_size=1 is impossible for 100 training images"),
    ({"batch_size": 101}, 1, {}, "batch_size=101 is impossible"),
    ({"batch_size": 10}, 3, {}, "must split evenly.*multiple of 3"),
    ({"batch_size": 10}, 10, {}, "must split evenly, at least 2 images each"),
    ({"batch_size": 10}, 2, {"sync_batchnorm": True}, "--sync-bn .* CUDA only"),
    ({"batch_size": 10}, 1, {"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"batch_size": 10}, 1, {"seed": -1}, "seed"),
])
def test_impossible_runs_are_one_clear_error(asked, world_size, kwargs, message):
    with pytest.raises(GenfastError, match=message):
        plan(asked=asked, world_size=world_size, **kwargs)


def test_a_conditional_run_needs_labels():
    with pytest.raises(GenfastError, match="has no labels, so it cannot train a conditional model"):
        plan(asked={"batch_size": 10, "conditional": True}, load=loader(labelled=False))
    assert plan(load=loader(labelled=False)).config.num_classes == 0


def test_a_new_run_does_not_overwrite_one_and_a_resumed_one_needs_one(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(GenfastError, match="already exists; pass --resume"):
        read_saved(TrainOptions(out=tmp_path))
    assert read_saved(TrainOptions(out=tmp_path / "new")) is None
    with pytest.raises(GenfastError, match="not found"):
        read_saved(TrainOptions(out=tmp_path / "new", resume=True))
