"""FID, KID and accuracy: the yardstick must itself be right."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast import checkpoint, corpus, data, images, metrics
from genfast.families.classifier import Classifier
from genfast.pretrained import load_modules


@pytest.fixture(scope="module")
def judge():
    return metrics.load_judge("fashion-mnist")  # the shipped feature network


@pytest.fixture(scope="module")
def garments():
    """Two sets of 'real' images: the shipped Fashion-MNIST GAN, two seeds (offline, fast)."""
    sampler = genfast.load("gan-fashion-mnist")
    return sampler.generate(600, seed=1), sampler.generate(600, seed=2)


def blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1) if k > 1 else x


def features(judge, x):
    return judge.embed([x], len(x), "", progress=False)[0]


@pytest.mark.slow
def test_a_set_against_itself_scores_zero(judge, garments):
    a = features(judge, garments[0])
    scores = metrics.fid_kid(a, a)
    assert abs(scores["fid"]) < 1e-6
    # KID's unbiased estimator is slightly negative for a set against itself (its cross term
    # includes k(x, x)); next to a real difference it is nothing.
    noisy = features(judge, (garments[0] + 0.5 * torch.randn(garments[0].shape)).clamp(-1, 1))
    assert abs(scores["kid"]) < 0.05 * metrics.fid_kid(a, noisy)["kid"]


@pytest.mark.slow
@pytest.mark.parametrize("degrade, levels", [
    ("blur", [1, 3, 5, 7]),
    ("noise", [0.0, 0.2, 0.4, 0.8]),
])
def test_scores_grow_as_images_are_degraded(judge, garments, degrade, levels):
    reference, images_ = features(judge, garments[0]), garments[1]
    noise = torch.randn(images_.shape, generator=torch.Generator().manual_seed(0))
    fids, kids = [], []
    for level in levels:
        x = blur(images_, level) if degrade == "blur" else (images_ + level * noise).clamp(-1, 1)
        scores = metrics.fid_kid(reference, features(judge, x))
        fids.append(scores["fid"])
        kids.append(scores["kid"])
    assert fids == sorted(fids) and fids[-1] > 5 * fids[0], fids
    assert kids == sorted(kids) and kids[-1] > kids[0], kids


@pytest.mark.slow
def test_bootstrap_spread_is_small_but_not_zero(judge, garments):
    a, b = features(judge, garments[0]), features(judge, garments[1])
    std = metrics.bootstrap_fid_std(a, b, seed=0)
    assert 0 < std < metrics.fid_kid(a, b)["fid"]
    assert metrics.bootstrap_fid_std(a, b, seed=0) == std  # same seed, same number


def test_real_test_accuracy_through_evals_path_equals_the_classifiers(tiny_classifier):
    ckpt = checkpoint.load(tiny_classifier)
    family, config, modules = load_modules(ckpt)
    test = data.load("fake", "test")
    direct = Classifier().evaluate(modules, config, images.to_float(test.images), test.labels)["accuracy"]
    judge = metrics.load_judge("fake", str(tiny_classifier))
    _, predicted = judge.embed(metrics._batches(test.images, 50), len(test), "", progress=False)
    via_eval = metrics.class_accuracy(predicted, test.labels, test.class_names)
    assert via_eval["accuracy"] == pytest.approx(direct, abs=1e-12)
    per_class = [v for v in via_eval["per_class_accuracy"].values()]
    counts = torch.bincount(test.labels, minlength=10).tolist()
    assert sum(a * c for a, c in zip(per_class, counts)) / len(test) == pytest.approx(direct)


def test_the_feature_network_loads_without_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    judge = metrics.load_judge("mnist")
    assert judge.num_features == 256 and judge.test_accuracy > 0.98


def test_eval_end_to_end_same_seed_same_numbers(tiny_cgan, tiny_classifier, tmp_path: Path, capsys):
    from test_cli import run

    outputs = []
    for name in ("a.json", "b.json"):
        status, out, err = run(capsys, "eval", tiny_cgan, "-n", 64, "--classifier", tiny_classifier,
                               "--json", tmp_path / name, "-q")
        assert status == 0, err
        outputs.append(json.loads((tmp_path / name).read_text()))
    a, b = outputs
    assert a == b
    assert {"fid", "kid", "accuracy", "real_fid", "fid_std", "per_class_accuracy"} <= a.keys()
    assert a["n"] == 64 and a["n_test"] == 160 and a["real_fid"] >= 0 and a["fid"] > 0
    assert "| FID vs test split" in out and "class accuracy" in out


def test_eval_bad_input(tiny_cgan, tiny_classifier, tmp_path: Path, capsys, monkeypatch):
    from test_cli import run

    status, _, err = run(capsys, "eval", tiny_cgan, "-n", 10, "--classifier", tiny_classifier)
    assert status == 1 and "needs at least 32 images" in err
    status, _, err = run(capsys, "eval", tiny_cgan, "-n", 64)  # no shipped classifier for 'fake'
    assert status == 1 and "genfast train classifier --data fake" in err
    status, _, err = run(capsys, "eval", tiny_cgan, "-n", 600, "--classifier", "classifier-fashion-mnist")
    assert status == 1 and "trained on 'fashion-mnist', the model on 'fake'" in err
    monkeypatch.setenv("GENFAST_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "none")
    status, _, err = run(capsys, "eval", "cgan-mnist", "-n", 600)
    assert status == 1 and "data set 'mnist' not found" in err and "genfast data download mnist" in err
    assert err.count("\n") == 1


def test_per_class_accuracy_on_hand_made_predictions():
    wanted = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1])
    scores = metrics.class_accuracy(predicted, wanted, ("a", "b", "c"))
    assert scores["accuracy"] == 4 / 8
    assert scores["per_class_accuracy"] == {"a": 0.75, "b": 0.5, "c": 0.0}


@pytest.mark.slow
def test_kid_depends_on_its_seed_and_fid_does_not(judge, garments):
    a, b = features(judge, garments[0][:300]), features(judge, garments[1])
    one, other = metrics.fid_kid(a, b, seed=0), metrics.fid_kid(a, b, seed=1)
    assert one["fid"] == other["fid"] and one["kid"] != other["kid"]
    assert metrics.fid_kid(a, b, seed=0) == one


@pytest.mark.slow
def test_eval_real_accuracy_equals_the_judges_recorded_accuracy():
    if data.find("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed")
    result = metrics.evaluate(genfast.load("cgan-fashion-mnist"), n=600, progress=False)
    assert result["real_accuracy"] == pytest.approx(result["classifier_test_accuracy"], abs=1e-9)
    assert 0.5 < result["accuracy"] <= 1  # the shipped cGAN's samples are mostly of the asked class


def test_the_judge_keeps_every_feature_alive_and_reports_the_dead_ones(tiny_classifier):
    ckpt = checkpoint.load(tiny_classifier)
    family, config, modules = load_modules(ckpt)
    test = data.load("fake", "test")
    x = images.to_float(test.images)
    assert config.feature_norm and ckpt.extra["test"]["dead_features"] == 0.0  # BatchNorm keeps all 16 alive
    with torch.no_grad():
        modules["classifier"].fc.bias[:4] = -1e6  # four units no image can wake
    assert family.evaluate(modules, config, x, test.labels)["dead_features"] == 4 / 16


def test_a_judge_saved_before_feature_norm_loads_as_it_was(tmp_path: Path):
    """A config without the key (every judge saved before it) builds the layer without BatchNorm."""
    from genfast.config import from_dict
    from genfast.families.classifier import ClassifierConfig, ClassifierNet

    old = checkpoint.load(genfast.shipped()["classifier-mnist"])
    config = {k: v for k, v in old.config.items() if k != "feature_norm"}
    net = ClassifierNet(from_dict(ClassifierConfig, config | {"feature_norm": False}))
    path = tmp_path / "old.safetensors"
    checkpoint.save(checkpoint.Checkpoint(family="classifier", config=config, dataset=old.dataset, step=1,
                                          modules={"classifier": net.state_dict()}), path)
    judge = metrics.load_judge("mnist", str(path))
    assert isinstance(judge.net.feature_norm, torch.nn.Identity)


def brightness_sampler(obedient: bool = True) -> genfast.Sampler:
    """A stand-in text model of Fashion-MNIST that draws a grey square, lighter for a prompt with a
    "light" word and darker for a "dark" one (or the other way round when not obedient); no other
    word changes its images."""
    from genfast import corpus

    words = corpus.ADJECTIVES["fashion-mnist"]["brightness"]
    light, dark = [w.train + w.held_out for w in (words["high"], words["low"])]

    def encode(prompt: str) -> torch.Tensor:
        said = set(prompt.replace(",", " ").split())
        direction = 1.0 if said & set(light) else -1.0 if said & set(dark) else 0.0
        return torch.tensor([[direction if obedient else -direction]])

    def draw(noise: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        intensity = 0.6 + 0.2 * condition[:, 0] + 0.02 * noise[:, 0].tanh()  # each image its own grey
        pixels = torch.full((len(noise), 1, 28, 28), -1.0)
        pixels[:, :, 7:21, 7:21] = (2 * intensity - 1)[:, None, None, None]
        return pixels

    return genfast.Sampler(draw, noise_shape=(1,), image_shape=(1, 28, 28),
                           class_names=data.DATASETS["fashion-mnist"].class_names, info={"dataset": "fashion-mnist"},
                           encode_prompt=encode)


class SeesClassZero:
    """A judge that calls every image class 0: the accuracy of each kind of prompt is then the share of
    its prompts that are of class 0."""

    def embed(self, batches, total, desc, progress=True):
        pixels = torch.cat(list(batches))
        return torch.zeros(len(pixels), 1), torch.zeros(len(pixels), dtype=torch.long)


def test_attribute_agreement_follows_the_words_the_images_obey(monkeypatch):
    from genfast import attributes

    gaps = {name: torch.ones(10) for name in attributes.ATTRIBUTES} | {"brightness": torch.full((10,), 0.1)}
    thresholds = attributes.Thresholds(low={name: torch.zeros(10) for name in gaps}, high=gaps)
    monkeypatch.setattr(attributes, "training_thresholds", lambda dataset: thresholds)  # no data set needed
    monkeypatch.setattr(metrics, "load_judge", lambda *args: SeesClassZero())

    result = metrics.prompt_accuracy(brightness_sampler(), per_prompt=3, progress=False)
    kinds = ("train_phrasings", "held_out_phrasings", "corpus_train", "corpus_held_out", "corpus_train_attributes",
             "corpus_held_out_attributes")
    assert [len(result[k]["per_prompt"]) for k in kinds] == [50, 10, 20, 20, 80, 80]
    assert [result[k]["accuracy"] for k in kinds] == pytest.approx([0.1] * 6)  # one class in ten
    train_words = {p for per_class in corpus.class_prompts("fashion-mnist", "train") for p in per_class}
    assert set(result["corpus_train"]["per_prompt"]) <= train_words  # the training split's own prompts
    assert not set(result["corpus_held_out"]["per_prompt"]) & train_words
    train_pairs = {p for pair in result["attribute_agreement_train"]["pairs"] for p in (pair["low"], pair["high"])}
    assert train_pairs <= {p for label in range(10) for p in corpus.phrasings("fashion-mnist", label, "train")}
    assert result["attribute_agreement_train"]["per_attribute"]["brightness"]["agreement"] == 1.0
    agreement = result["attribute_agreement_held_out"]
    assert {name: a["agreement"] for name, a in agreement["per_attribute"].items()} == {
        "area": 0.5, "width": 0.5, "brightness": 1.0, "texture": 0.5}  # the other words change nothing: ties
    assert agreement["agreement"] == (10 * 1.0 + 30 * 0.5) / 40
    assert agreement["per_attribute"]["brightness"]["shift"] == pytest.approx(0.4 / 0.1, rel=1e-4)
    assert agreement["per_attribute"]["area"]["shift"] == 0
    pair = next(p for p in agreement["pairs"] if p["attribute"] == "brightness")
    assert pair["high_mean"] - pair["low_mean"] == pytest.approx(0.4, abs=1e-4)

    contrary = metrics.prompt_accuracy(brightness_sampler(obedient=False), per_prompt=3, progress=False)
    assert contrary["attribute_agreement_held_out"]["per_attribute"]["brightness"]["agreement"] == 0.0
    # The same seed judges the same prompts; another seed picks others.
    assert contrary["corpus_held_out"]["per_prompt"].keys() == result["corpus_held_out"]["per_prompt"].keys()
    other = metrics.prompt_accuracy(brightness_sampler(), per_prompt=3, seed=1, progress=False)
    assert other["corpus_held_out"]["per_prompt"].keys() != result["corpus_held_out"]["per_prompt"].keys()
