from pathlib import Path

import pytest
import torch

from genfast import checkpoint, pretrained
from genfast.errors import GenfastError
from genfast.families.gan import GAN
from genfast.train import TrainOptions, learning_rate_share, train

from conftest import train_tiny


def _all_tensors(ckpt: checkpoint.Checkpoint) -> dict[str, torch.Tensor]:
    tensors = {f"{m}.{k}": v for m, state in ckpt.modules.items() for k, v in state.items()}
    for name, opt in ckpt.optimizers.items():
        for index, state in opt["state"].items():
            tensors.update({f"optim.{name}.{index}.{k}": v for k, v in state.items()})
    return tensors


@pytest.mark.parametrize("conditional", [False, True])
def test_resume_continues_the_same_run(tmp_path: Path, conditional):
    straight = checkpoint.load(train_tiny(tmp_path / "a", steps=8, conditional=conditional))
    train_tiny(tmp_path / "b", steps=4, conditional=conditional)
    half = checkpoint.load(tmp_path / "b" / "checkpoint.safetensors")
    assert half.step == 4
    resumed = checkpoint.load(train_tiny(tmp_path / "b", steps=8, conditional=conditional, resume=True))
    assert resumed.step == straight.step == 8
    a, b = _all_tensors(straight), _all_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And the resumed run really continued (it is not a copy of the half-way state).
    assert not torch.equal(_all_tensors(half)["generator.fc.weight"], b["generator.fc.weight"])


def test_resume_refuses_to_change_the_config(tmp_path: Path):
    train_tiny(tmp_path, steps=2)
    options = TrainOptions(out=tmp_path, data="fake", steps=4, resume=True, progress=False)
    with pytest.raises(GenfastError,
                       match="can change only lr_g, lr_d, beta1, beta2, warmup_steps, decay_steps, not: z_dim=9"):
        train("gan", options, preset="tiny", pairs=["z_dim=9"])
    with pytest.raises(GenfastError, match="whose data set is 'fake', not 'mnist'"):
        train("gan", TrainOptions(out=tmp_path, data="mnist", steps=4, resume=True, progress=False), preset="tiny")


def test_existing_run_is_not_overwritten(tmp_path: Path):
    path = train_tiny(tmp_path, steps=2)
    before = path.read_bytes()
    with pytest.raises(GenfastError, match="pass --resume"):
        train_tiny(tmp_path, steps=2)
    assert path.read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_family(tmp_path: Path):
    path = train_tiny(tmp_path, steps=2)
    ckpt = checkpoint.load(path)
    ckpt.family = "vae"
    checkpoint.save(ckpt, path)
    with pytest.raises(GenfastError, match="is a 'vae' checkpoint, not 'gan'"):
        train_tiny(tmp_path, steps=4, resume=True)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch):
    real_step = GAN.train_step
    calls = []

    def step_that_blows_up(self, *args):
        calls.append(1)
        losses = real_step(self, *args)
        return losses | {"loss_g": float("nan")} if len(calls) == 5 else losses

    monkeypatch.setattr(GAN, "train_step", step_that_blows_up)
    with pytest.raises(GenfastError, match=r"diverged at step 5 \(loss_g=nan\).*at step 4"):
        train_tiny(tmp_path, steps=10, checkpoint_every=2)
    kept = checkpoint.load(tmp_path / "checkpoint.safetensors")
    assert kept.step == 4
    assert all(torch.isfinite(v).all() for state in kept.modules.values() for v in state.values()
               if v.is_floating_point())


def test_run_folder_has_samples_tensorboard_and_a_loadable_checkpoint(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = train_tiny(tmp_path, steps=20, sample_every=10, conditional=True)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000010.png", "step_0000020.png"]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_d")] == [10, 20]
    assert "samples" in events.Tags()["images"]
    ckpt = checkpoint.load(path)
    assert ckpt.dataset["class_names"][:2] == ["class0", "class1"]
    assert ckpt.config["conditional"] and ckpt.config["num_classes"] == 10
    assert 0 <= ckpt.extra["data_fraction"] < 1 and ckpt.extra["images_per_s"] > 0


def test_impossible_batch_size_and_unlabelled_conditional(tmp_path: Path):
    with pytest.raises(GenfastError, match="batch_size=100000 is impossible"):
        train("gan", TrainOptions(out=tmp_path, data="fake", steps=1, progress=False), preset="tiny",
              pairs=["batch_size=100000"])
    with pytest.raises(GenfastError, match="batch_size=0 is impossible"):
        train("gan", TrainOptions(out=tmp_path, data="fake", steps=1, progress=False), preset="tiny",
              pairs=["batch_size=0"])
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_save_and_load_give_bit_identical_samples(tiny_cgan, tmp_path: Path):
    a = pretrained.load(tiny_cgan).generate(30, seed=5, batch_size=8)
    b = pretrained.load(tiny_cgan).generate(30, seed=5, batch_size=8)
    assert torch.equal(a, b)
    # Slimming (fp32) changes nothing a sampler uses.
    slim = pretrained.slim(tiny_cgan, tmp_path / "slim.safetensors", half=False)
    assert checkpoint.load(slim).inference_only
    assert torch.equal(pretrained.load(slim).generate(30, seed=5, batch_size=8), a)
    # Another seed gives other images; one class gives that class's images.
    assert not torch.equal(pretrained.load(tiny_cgan).generate(30, seed=6, batch_size=8), a)


def test_bf16_autocast_changes_the_arithmetic_not_the_result(tmp_path: Path):
    fp32 = checkpoint.load(train_tiny(tmp_path / "fp32", steps=3)).modules["generator"]["fc.weight"]
    bf16 = checkpoint.load(train_tiny(tmp_path / "bf16", steps=3, precision="bf16")).modules["generator"]["fc.weight"]
    assert bf16.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(fp32, bf16)  # autocast really ran the matmuls in bf16
    assert (fp32 - bf16).abs().max() < 1e-2


def test_class_index_selects_that_class(tiny_cgan):
    sampler = pretrained.load(tiny_cgan)
    threes = sampler.generate(6, seed=1, class_index=3)
    noise = sampler.noise(6, seed=1)
    assert torch.equal(threes, sampler(noise, torch.full((6,), 3)))
    assert not torch.equal(threes, sampler(noise, torch.full((6,), 4)))
    assert torch.equal(sampler.generate(6, seed=1, class_index="class3"), threes)  # by name too


def test_class_names_win_over_indexes():
    from genfast.families.base import Sampler

    sampler = Sampler(lambda z, y: z, noise_shape=(1,), image_shape=(1, 1, 1), class_names=("10", "3", "7"))
    assert sampler.class_index("7") == 2 and sampler.class_index("3") == 1  # names, as a user types them
    assert sampler.class_index(2) == 2 and sampler.class_index("0") == 0    # an int, or text that is no name
    with pytest.raises(GenfastError, match="class 5 is outside"):
        sampler.class_index("5")


def test_epochs_count_whole_passes_over_the_data(tmp_path: Path):
    options = TrainOptions(out=tmp_path, data="fake", epochs=2, progress=False, sample_every=1000,
                           checkpoint_every=1000)
    ckpt = checkpoint.load(train("gan", options, preset="tiny"))
    assert ckpt.step == 2 * (640 // 32) and ckpt.extra["steps_per_epoch"] == 20


def test_resume_keeps_the_runs_seed(tmp_path: Path):
    straight = checkpoint.load(train_tiny(tmp_path / "a", steps=6, seed=7))
    train_tiny(tmp_path / "b", steps=3, seed=7)
    resumed = checkpoint.load(train("gan", TrainOptions(out=tmp_path / "b", steps=6, resume=True, progress=False,
                                                         sample_every=1000), preset="tiny"))
    assert resumed.extra["seed"] == 7 and resumed.dataset["name"] == "fake"
    assert torch.equal(straight.modules["generator"]["fc.weight"], resumed.modules["generator"]["fc.weight"])
    with pytest.raises(GenfastError, match="whose seed is 7, not 8"):
        train_tiny(tmp_path / "b", steps=9, seed=8, resume=True)


def test_resume_may_lower_the_learning_rate(tmp_path: Path):
    train_tiny(tmp_path, steps=2)
    options = TrainOptions(out=tmp_path, steps=4, resume=True, progress=False, sample_every=1000)
    path = train("gan", options, preset="tiny", pairs=["lr_g=1e-5"])
    ckpt = checkpoint.load(path)
    assert ckpt.config["lr_g"] == 1e-5
    assert ckpt.optimizers["generator"]["param_groups"][0]["lr"] == 1e-5  # the optimizer really uses it
    assert ckpt.optimizers["discriminator"]["param_groups"][0]["lr"] == 2e-4


def test_learning_rate_share_warms_up_holds_and_decays_to_the_runs_end():
    shares = [learning_rate_share(step, 10, warmup=2, decay=4) for step in range(10)]
    assert shares == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [learning_rate_share(step, 3, warmup=0, decay=0) for step in range(3)] == [1.0, 1.0, 1.0]
    assert learning_rate_share(0, 4, warmup=3, decay=4) == 1 / 3  # both at once: their product


def _schedule_run(out: Path, steps: int, decay: int, resume: bool = False) -> checkpoint.Checkpoint:
    options = TrainOptions(out=out, data="fake", steps=steps, resume=resume, progress=False, precision="fp32",
                           sample_every=1000, checkpoint_every=1000)
    return checkpoint.load(train("gan", options, preset="tiny", pairs=["warmup_steps=2", f"decay_steps={decay}"]))


def test_the_schedule_sets_every_optimizer_and_a_resumed_run_keeps_it(tmp_path: Path):
    straight = _schedule_run(tmp_path / "a", steps=8, decay=4)
    config = straight.config
    # The last step (7 of 8) trains at 1/4 of each configured rate, the generator's and the discriminator's.
    assert straight.optimizers["generator"]["param_groups"][0]["lr"] == pytest.approx(config["lr_g"] / 4)
    assert straight.optimizers["discriminator"]["param_groups"][0]["lr"] == pytest.approx(config["lr_d"] / 4)
    # Warmed up at constant rate, then continued and decayed: the straight run's steps, as
    # warmup-stable-decay allows (the decay decided when the run is continued).
    _schedule_run(tmp_path / "b", steps=4, decay=0)
    resumed = _schedule_run(tmp_path / "b", steps=8, decay=4, resume=True)
    a, b = _all_tensors(straight), _all_tensors(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_saves_the_last_whole_step(tmp_path: Path, monkeypatch):
    import os
    import signal

    real_step = GAN.train_step
    calls = []

    def step_then_ctrl_c(self, *args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the loop finishes the step first
        return real_step(self, *args)

    monkeypatch.setattr(GAN, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN under nohup
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved at step 5.*--resume"):
        train_tiny(tmp_path, steps=50, checkpoint_every=1000)
    assert checkpoint.load(tmp_path / "checkpoint.safetensors").step == 5
    assert signal.getsignal(signal.SIGINT) == before  # the trainer put it back


def test_divergence_before_any_checkpoint_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(GAN, "train_step", lambda self, *args: {"loss_d": float("inf"), "loss_g": 1.0})
    with pytest.raises(GenfastError, match="diverged at step 1 .*no checkpoint was written yet"):
        train_tiny(tmp_path, steps=5)
    assert not (tmp_path / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("pair, message", [
    ("lr_g=-1", "'lr_g' must be >= 0"), ("lr_d=nan", "'lr_d' must be >= 0"), ("z_dim=0", "'z_dim' must be > 0"),
    ("beta1=1.5", "'beta1' must be in [0, 1)"), ("leaky_slope=-5", "'leaky_slope' must be >= 0"),
    ("batch_size=1", "batch_size=1 is impossible"), ("channels=3", "channels are set by the data set"),
    ("warmup_steps=-1", "'warmup_steps' must be >= 0"),
    ("decay_steps=2", "decay_steps=2 is more than the run's 1 steps"),
])
def test_bad_config_values_are_one_clear_error(tmp_path: Path, pair, message):
    with pytest.raises(GenfastError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        train("gan", TrainOptions(out=tmp_path, data="fake", steps=1, progress=False), preset="tiny", pairs=[pair])


def _learned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a step moves by its learning rate (BatchNorm's running statistics move by its momentum)."""
    return {key: value for key, value in state.items() if "running_" not in key and "num_batches" not in key}


def _fine_tuned(tmp_path: Path, init, name: str, pairs=("lr_g=1e-12", "lr_d=1e-12"), **kwargs):
    """One step from `init`'s weights at a learning rate too small to move them."""
    options = TrainOptions(out=tmp_path / name, steps=1, init=str(init), progress=False, precision="fp32",
                           sample_every=1000, checkpoint_every=1000, **kwargs)
    return checkpoint.load(train("gan", options, pairs=list(pairs)))


def test_init_starts_a_new_run_from_a_models_weights_and_config(tmp_path: Path):
    source = checkpoint.load(train_tiny(tmp_path / "source", steps=6))
    fresh = checkpoint.load(train_tiny(tmp_path / "fresh", steps=1, seed=5))
    tuned = _fine_tuned(tmp_path, tmp_path / "source" / "checkpoint.safetensors", "tuned", seed=5)
    assert tuned.step == 1 and tuned.dataset["name"] == "fake"  # the init's data set and sizes, a new run
    assert tuned.config["z_dim"] == source.config["z_dim"] and tuned.config["lr_g"] == 1e-12
    assert tuned.extra["init"] == str(tmp_path / "source" / "checkpoint.safetensors")
    for module in ("generator", "discriminator"):
        for key, value in _learned(source.modules[module]).items():
            assert torch.allclose(tuned.modules[module][key], value, atol=1e-8), (module, key)
    assert not torch.allclose(tuned.modules["generator"]["fc.weight"], fresh.modules["generator"]["fc.weight"])


def test_init_from_a_slim_model_starts_what_it_lacks_from_scratch(tmp_path: Path):
    slim = pretrained.slim(train_tiny(tmp_path / "source", steps=6), tmp_path / "slim.safetensors", half=False)
    options = TrainOptions(out=tmp_path / "fresh", data="fake", steps=1, seed=5, progress=False, precision="fp32",
                           sample_every=1000, checkpoint_every=1000)
    fresh = checkpoint.load(train("gan", options, preset="tiny", pairs=["lr_g=1e-12", "lr_d=1e-12"]))
    tuned = _fine_tuned(tmp_path, slim, "tuned", seed=5)
    assert torch.allclose(tuned.modules["generator"]["fc.weight"],
                          checkpoint.load(slim).modules["generator"]["fc.weight"], atol=1e-8)
    for key, value in _learned(fresh.modules["discriminator"]).items():  # what a new run of this seed starts from
        assert torch.allclose(tuned.modules["discriminator"][key], value, atol=1e-8), key


def test_init_refuses_what_cannot_be_a_fine_tuning_run(tmp_path: Path):
    source = train_tiny(tmp_path / "source", steps=2)
    with pytest.raises(GenfastError, match="a fine-tuning run keeps the model's sizes"):
        _fine_tuned(tmp_path, source, "bigger", pairs=["z_dim=9"])
    assert not (tmp_path / "bigger" / "checkpoint.safetensors").exists()
    with pytest.raises(GenfastError, match="--init starts a new run .* and --resume continues a run; choose one"):
        train("gan", TrainOptions(out=tmp_path / "source", steps=4, init=str(source), resume=True, progress=False))
    with pytest.raises(GenfastError, match="is a 'gan' model, not 'vae'"):
        train("vae", TrainOptions(out=tmp_path / "vae", steps=1, init=str(source), progress=False))
