"""The caption corpus: held-out words never leak into training, words are true of the image, seeds repeat."""

import functools
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genfast import attributes, corpus
from genfast.errors import GenfastError
from genfast.families.ar import text

DATASETS = corpus.DATASETS


def phrase(*alternatives: str) -> re.Pattern:
    """Any of `alternatives` as a whole phrase: "boot" is not in "bootie", "light" not in "light-stroked"."""
    either = "|".join(re.escape(a) for a in alternatives)
    return re.compile(rf"(?<![\w-])(?:{either})(?![\w-])", re.IGNORECASE)


def template_pattern(*templates: str) -> re.Pattern:
    """Any of `templates` as a regex over lines of captions: slots match anything, articles either form."""
    def one(template: str) -> str:
        parts = re.split(r"(\{noun\}|\{adjectives\})", template)
        return "".join("[^\n]+" if p in ("{noun}", "{adjectives}") else re.sub(r"\ban?\b", "an?", re.escape(p))
                       for p in parts)
    return re.compile("^(?:" + "|".join(one(t) for t in templates) + ")$", re.IGNORECASE | re.MULTILINE)


def held_out_words(dataset: str) -> list[str]:
    nouns = [n for words in corpus.NOUNS[dataset] for n in words.held_out]
    adjectives = [a for levels in corpus.ADJECTIVES[dataset].values() for w in levels.values() for a in w.held_out]
    return nouns + adjectives


def every_word(dataset: str) -> list[str]:
    return [a for levels in corpus.ADJECTIVES[dataset].values() for w in levels.values() for a in w.train + w.held_out]


def level_words(dataset: str, name: str, level: str) -> list[str]:
    words = corpus.ADJECTIVES[dataset][name][level]
    return list(words.train + words.held_out)


@functools.cache
def phrasing_set(dataset: str, label: int, split: str) -> frozenset[str]:
    return frozenset(corpus.phrasings(dataset, label, split))


def upright_stroke(width: int) -> torch.Tensor:
    """A "one": a vertical bar `width` pixels wide and 18 tall."""
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    x[0, 0, 5:23, 14 - width // 2:14 - width // 2 + width] = 255
    return x


@pytest.fixture(scope="module")
def train_phrasings():
    return {ds: [corpus.phrasings(ds, label, "train") for label in range(10)] for ds in DATASETS}


@pytest.mark.parametrize("dataset", DATASETS)
def test_no_training_phrasing_says_a_held_out_word_or_template(dataset, train_phrasings):
    """Exhaustive: every caption a training run can see (test_every_caption_is_one_of_its_phrasings)."""
    said = "\n".join(p for per_class in train_phrasings[dataset] for p in per_class)
    assert phrase(*held_out_words(dataset)).search(said) is None
    held_out_templates = [t for kind in corpus.TEMPLATES[dataset].values() for t in kind.held_out]
    assert template_pattern(*held_out_templates).search(said) is None
    # (and the patterns do find what they look for: every held-out phrasing)
    held_out = corpus.phrasings(dataset, 0, "held_out")
    assert all(template_pattern(*held_out_templates).search(p) for p in held_out)
    assert all(phrase(*held_out_words(dataset)).search(p) for p in held_out)


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_class_has_hundreds_of_distinct_training_phrasings(dataset, train_phrasings):
    counts = [len(set(per_class)) for per_class in train_phrasings[dataset]]
    assert min(counts) >= 300, counts
    # and no phrasing is shared by two classes: a caption names its class
    seen = [set(per_class) for per_class in train_phrasings[dataset]]
    assert not any(a & b for i, a in enumerate(seen) for b in seen[i + 1:])


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_splits_share_no_word_and_the_fixed_text_says_no_attribute(dataset):
    for slots in [*corpus.NOUNS[dataset], *corpus.TEMPLATES[dataset].values(),
                  *(w for levels in corpus.ADJECTIVES[dataset].values() for w in levels.values())]:
        assert slots.train and slots.held_out and not set(slots.train) & set(slots.held_out)
    adjectives = every_word(dataset)
    assert len(adjectives) == len(set(adjectives))  # one word, one attribute and direction
    fixed = [t for kind in corpus.TEMPLATES[dataset].values() for t in kind.train + kind.held_out]
    fixed += [n for words in corpus.NOUNS[dataset] for n in words.train + words.held_out]
    # an attribute word comes from a measurement, never from a template or a noun
    assert not [f for f in fixed if phrase(*adjectives).search(f)]


def test_the_shipped_models_never_saw_a_held_out_word():
    for dataset in DATASETS:
        seen = "\n".join(c for per_class in text.CAPTIONS[dataset] for c in per_class)
        assert phrase(*held_out_words(dataset)).search(seen) is None


levels_of = st.fixed_dictionaries({name: st.sampled_from([-1, 0, 1]) for name in attributes.ATTRIBUTES})


@settings(max_examples=300, deadline=None)
@given(dataset=st.sampled_from(DATASETS), label=st.integers(0, 9), levels=levels_of, seed=st.integers(0, 2**32),
       split=st.sampled_from(corpus.SPLITS))
def test_every_caption_is_one_of_its_phrasings_and_its_words_are_true(dataset, label, levels, seed, split):
    caption = corpus.caption(dataset, label, levels, random.Random(seed), split)
    assert caption in phrasing_set(dataset, label, split)
    for name in corpus.ADJECTIVES[dataset]:
        for level, sign in (("low", -1), ("high", 1)):
            if phrase(*level_words(dataset, name, level)).search(caption):
                assert levels[name] == sign, (caption, name, levels)
    if all(v == 0 for v in levels.values()):
        assert caption in set(corpus.class_prompts(dataset, split)[label])


def test_words_are_said_of_some_images_and_at_most_two_at_once():
    rng = random.Random(0)
    everything = {name: 1 for name in attributes.ATTRIBUTES}
    captions = [corpus.caption("fashion-mnist", 3, everything, rng) for _ in range(400)]
    counts = [sum(bool(phrase(*level_words("fashion-mnist", name, "high")).search(c))
                  for name in corpus.ADJECTIVES["fashion-mnist"]) for c in captions]
    assert max(counts) == corpus.MAX_ADJECTIVES and 0 in counts  # some captions name the class alone
    assert 0.5 < sum(c > 0 for c in counts) / len(counts) < 0.95


def digits_of_two_thicknesses():
    """Twenty "ones": upright strokes 2 pixels wide (even) and 6 (odd), with the thresholds of a population
    of ones from 2 to 6 pixels wide (whose thirds end near 3.3 and 4.7 pixels)."""
    population = torch.cat([upright_stroke(w) for w in (2, 3, 4, 5, 6)])
    found = attributes.thresholds(attributes.measure(population), torch.ones(5, dtype=torch.long), 10)
    pixels = torch.cat([upright_stroke(2 if i % 2 == 0 else 6) for i in range(20)])
    return pixels, torch.ones(20, dtype=torch.long), found


def test_a_thickness_word_only_for_a_digit_in_the_thick_range():
    pixels, labels, found = digits_of_two_thicknesses()
    levels = found.levels(attributes.measure(pixels), labels)["thickness"]
    assert levels.tolist() == [-1, 1] * 10
    thick, thin = level_words("mnist", "thickness", "high"), level_words("mnist", "thickness", "low")
    said = {"thick": 0, "thin": 0}
    for seed in range(10):
        for i, caption in enumerate(corpus.captions_for("mnist", pixels, labels, seed, thresholds=found)):
            says_thick, says_thin = bool(phrase(*thick).search(caption)), bool(phrase(*thin).search(caption))
            assert not (says_thick and i % 2 == 0) and not (says_thin and i % 2 == 1), caption
            said["thick"] += says_thick
            said["thin"] += says_thin
    assert said["thick"] > 20 and said["thin"] > 20  # and they are said, about half the time


def test_the_same_seed_gives_the_same_captions():
    pixels, labels, found = digits_of_two_thicknesses()
    first = corpus.captions_for("mnist", pixels, labels, seed=7, thresholds=found)
    assert corpus.captions_for("mnist", pixels, labels, seed=7, thresholds=found) == first
    assert corpus.captions_for("mnist", pixels, labels, seed=8, thresholds=found) != first
    assert corpus.captions_for("mnist", pixels[:0], labels[:0], seed=7, thresholds=found) == []


@pytest.mark.parametrize("dataset", DATASETS)
def test_attribute_pairs_differ_in_one_held_out_word_of_each_direction(dataset):
    pairs = corpus.attribute_pairs(dataset, seed=0)
    assert len(pairs) == 10 * len(corpus.ADJECTIVES[dataset])
    assert corpus.attribute_pairs(dataset, seed=0) == pairs
    held_out = set(corpus.phrasings(dataset, 0, "held_out"))
    for pair in pairs:
        low, high = pair.low.split(), pair.high.split()
        assert len(low) == len(high), pair
        differing = [(a, b) for a, b in zip(low, high) if a != b and {a, b} != {"a", "an"}]  # an article may follow
        assert len(differing) == 1, pair
        low_word, high_word = differing[0]
        assert low_word.rstrip(",") in corpus.ADJECTIVES[dataset][pair.attribute]["low"].held_out
        assert high_word.rstrip(",") in corpus.ADJECTIVES[dataset][pair.attribute]["high"].held_out
        if pair.label == 0:
            assert {pair.low, pair.high} <= held_out


def test_class_prompts_name_the_class_alone():
    prompts = corpus.class_prompts("fashion-mnist")
    assert len(prompts) == 10 and all(len(p) == 18 for p in prompts)  # 6 held-out templates x 3 nouns
    assert "a snapshot of a parka" in prompts[4]
    assert not any(phrase(*every_word("fashion-mnist")).search(p) for per_class in prompts for p in per_class)


def test_articles_follow_the_next_word():
    fill = corpus._fill
    assert fill("a {noun}", "8", []) == "an 8" and fill("a {noun}", "eight", []) == "an eight"
    assert fill("a {noun}", "one", []) == "a one" and fill("a {noun}", "7", []) == "a 7"
    assert fill("a {adjectives} {noun}", "seven", ["upright"]) == "an upright seven"
    assert fill("a {noun} that is {adjectives}", "anorak", ["thick", "wide", "slanted"]) == \
        "an anorak that is thick, wide and slanted"
    assert fill("a {adjectives} {noun}", "coat", ["unadorned"]) == "an unadorned coat"


def test_bad_input_is_one_clear_error():
    with pytest.raises(GenfastError, match="no caption corpus for data set 'fake'; it has one for: fashion-mnist"):
        corpus.phrasings("fake", 0)
    with pytest.raises(GenfastError, match="unknown corpus split 'test'"):
        corpus.class_prompts("mnist", "test")
    with pytest.raises(GenfastError, match="class 10 is not one of mnist's"):
        corpus.caption("mnist", 10, {}, random.Random(0))
