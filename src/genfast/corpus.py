"""Captions grounded in the pixels: many phrasings per class, with attribute words that are true of the image.

A text-conditioned model learns what its prompts mean from the captions it is trained
on. Five hand-written phrasings per class (text.CAPTIONS) teach it five strings; this
corpus teaches it a class's many names and the look of each image: a caption is made
from the image's label and from its measured attributes (attributes.py), so "a dark
dress" is said of dresses in the darker third of the training dresses, and never of
the others.

A caption is a sentence template filled with a noun for the class and at most
MAX_ADJECTIVES attribute words, each true of the image:

- nouns: per data set and class, synonyms (t-shirt, tee, top, ...; for digits the word
  and the numeral, bare or as "digit 7", "number seven");
- adjectives: per data set and attribute, words for its lower third ("dark", "thin") and
  its upper third ("light", "thick"); an image in the middle third gets no word for it.
  Fashion-MNIST speaks of size (area), width, brightness and texture; MNIST of width,
  stroke thickness and slant (its digits were scaled to a 20-pixel box, so nine in ten
  are exactly 20 pixels tall: height words would be noise; its ink is near white
  everywhere and has no texture);
- templates: short and long, adjectives before the noun ("a dark dress", joined by
  spaces) or after it ("a dress that is dark and wide", joined by commas and "and").

Every list has two parts. The *held-out* part (nouns, adjectives and templates) is
written here once, is never used for a training caption (tests/test_corpus.py checks
it over many seeds), and makes the evaluation prompts (metrics.prompt_accuracy): a
held-out prompt is a held-out template filled with a held-out noun and held-out
adjectives, so it tests the conditioning's generalisation through the language model,
not recall. The held-out words were chosen as ones a user might type ("a parka", "a
black dress", "a chunky seven"), and none of them is in text.CAPTIONS either, so the
shipped models, trained on those, are judged on new phrasings too.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import torch

from genfast import attributes
from genfast.errors import GenfastError

SPLITS = ("train", "held_out")
MAX_ADJECTIVES = 2  # longer lists read like inventories (and would make the phrasings too many to list)
ADJECTIVE_RATE = 0.5  # the chance that a caption names each attribute the image has a word for


@dataclass(frozen=True)
class Words:
    """The words of one slot: those training captions use, and those kept for evaluation."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def of(self, split: str) -> tuple[str, ...]:
        return self.train if split == "train" else self.held_out


def _digit_nouns(digit: int, word: str) -> Words:
    return Words(train=(word, str(digit), f"digit {word}", f"digit {digit}", f"number {word}", f"number {digit}"),
                 held_out=(f"numeral {word}", f"numeral {digit}", f"figure {word}"))


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

NOUNS: dict[str, tuple[Words, ...]] = {
    "fashion-mnist": (
        Words(("t-shirt", "tee", "top", "tank top", "short-sleeved tee", "crop top"),
              ("tee shirt", "singlet", "camisole")),
        Words(("pair of trousers", "pair of pants", "pair of slacks", "pair of jeans", "pair of leggings",
               "pair of long trousers"),
              ("pair of chinos", "pair of sweatpants", "pair of breeches")),
        Words(("pullover", "sweater", "jumper", "knitted jumper", "long-sleeved sweater", "sweatshirt"),
              ("cardigan", "hoodie", "turtleneck")),
        Words(("dress", "summer dress", "gown", "frock", "sundress", "woman's dress"),
              ("evening gown", "cocktail dress", "pinafore")),
        Words(("coat", "jacket", "winter coat", "overcoat", "trench coat", "coat with buttons"),
              ("parka", "anorak", "blazer")),
        Words(("sandal", "pair of sandals", "flip-flop", "strappy sandal", "open summer shoe", "slide sandal"),
              ("beach sandal", "open-toed shoe", "gladiator sandal")),
        Words(("shirt", "button-up shirt", "collared shirt", "blouse", "dress shirt", "long-sleeved shirt"),
              ("flannel shirt", "tunic", "oxford shirt")),
        Words(("sneaker", "trainer", "sports shoe", "running shoe", "canvas sneaker", "low-top shoe"),
              ("tennis shoe", "plimsoll", "athletic shoe")),
        Words(("bag", "handbag", "purse", "tote bag", "shoulder bag", "leather bag"),
              ("backpack", "satchel", "clutch")),
        Words(("ankle boot", "boot", "short boot", "leather boot", "heeled boot", "chelsea boot"),
              ("cowboy boot", "bootie", "combat boot")),
    ),
    "mnist": tuple(_digit_nouns(digit, word) for digit, word in enumerate(DIGIT_WORDS)),
}
DATASETS = tuple(NOUNS)  # the data sets the corpus speaks of

# Per data set, the attributes that have words, in the order they are said (size, shape, colour, pattern),
# each with the words of its lower third ("low") and upper third ("high").
ADJECTIVES: dict[str, dict[str, dict[str, Words]]] = {
    "fashion-mnist": {
        "area": {"low": Words(("small", "little", "compact"), ("tiny", "petite")),
                 "high": Words(("large", "big", "oversized"), ("huge", "bulky"))},
        "width": {"low": Words(("narrow", "slim", "slender"), ("skinny", "tapered")),
                  "high": Words(("wide", "broad", "boxy"), ("roomy", "loose-fitting"))},
        "brightness": {"low": Words(("dark", "dim", "deep-coloured"), ("black", "charcoal")),
                       "high": Words(("light", "bright", "pale"), ("white", "ivory"))},
        "texture": {"low": Words(("plain", "smooth", "simple"), ("solid-coloured", "unadorned")),
                    "high": Words(("patterned", "textured", "detailed"), ("printed", "ornate"))},
    },
    "mnist": {
        "width": {"low": Words(("narrow", "condensed", "compressed"), ("squeezed", "cramped")),
                  "high": Words(("wide", "broad", "stretched"), ("sprawling", "expanded"))},
        "thickness": {"low": Words(("thin", "fine", "light-stroked"), ("delicate", "hairline")),
                      "high": Words(("thick", "bold", "heavy"), ("chunky", "fat"))},
        "slant": {"low": Words(("upright", "straight", "vertical"), ("unslanted", "perpendicular")),
                  "high": Words(("slanted", "italic", "leaning"), ("tilted", "sloping"))},
    },
}

# {noun} is the class's noun; {adjectives} the attribute words. Every "a" is an article, made "an" where
# the next word needs it.
_PLAIN_SHARED = Words(
    train=("{noun}", "a {noun}", "a photo of a {noun}", "an image of a {noun}", "a picture of a {noun}",
           "a grayscale image of a {noun}", "a low-resolution picture of a {noun}", "this is a {noun}",
           "there is a {noun}", "a drawing of a {noun}", "an example of a {noun}", "show me a {noun}",
           "draw a {noun}", "generate a {noun}", "a {noun} in the centre of the frame", "a 28x28 image of a {noun}",
           "a close-up of a {noun}"),
    held_out=("a snapshot of a {noun}", "here is a {noun}", "please make a {noun}", "a rendering of a {noun}",
              "a thumbnail of a {noun}"),
)
_DESCRIBED_SHARED = Words(
    train=("a {adjectives} {noun}", "{adjectives} {noun}", "a photo of a {adjectives} {noun}",
           "an image showing a {adjectives} {noun}", "a picture of a {adjectives} {noun}", "draw a {adjectives} {noun}",
           "generate a {adjectives} {noun}", "this is a {adjectives} {noun}", "a {noun} that is {adjectives}",
           "{noun}, {adjectives}", "a photo of a {noun} that looks {adjectives}",
           "an image of a {noun} which is {adjectives}", "a {noun}: {adjectives}", "a {noun}, rather {adjectives}"),
    held_out=("a snapshot of a {adjectives} {noun}", "here is a {adjectives} {noun}",
              "please make a {noun} that appears {adjectives}", "a rendering of a {noun} that seems {adjectives}",
              "a thumbnail showing a {adjectives} {noun}"),
)
TEMPLATES: dict[str, dict[str, Words]] = {
    "fashion-mnist": {
        "plain": Words(_PLAIN_SHARED.train + ("a product photo of a {noun}", "a catalogue picture of a {noun}",
                                              "a fashion item: a {noun}"),
                       _PLAIN_SHARED.held_out + ("an online shop photo of a {noun}",)),
        "described": Words(_DESCRIBED_SHARED.train + ("a product photo of a {adjectives} {noun}",
                                                      "a catalogue picture of a {noun} that is {adjectives}"),
                           _DESCRIBED_SHARED.held_out + ("an online shop photo of a {adjectives} {noun}",)),
    },
    "mnist": {
        "plain": Words(_PLAIN_SHARED.train + ("a handwritten {noun}", "a {noun} written by hand",
                                              "a hand-drawn {noun}"),
                       _PLAIN_SHARED.held_out + ("a {noun} scribbled on paper",)),
        "described": Words(_DESCRIBED_SHARED.train + ("a {adjectives} handwritten {noun}",
                                                      "a {noun} written by hand, {adjectives}"),
                           _DESCRIBED_SHARED.held_out + ("a {adjectives} {noun} scribbled on paper",)),
    },
}

_LEVEL_NAMES = {-1: "low", 1: "high"}
_ARTICLE = re.compile(r"\b([Aa])n? (?=(\S+))")  # an article and, looked at but kept, the word after it
_VOWEL_SOUND = re.compile(r"[aeio]|u(?!ni|s[aeiu])|8|11|18")  # "an oversized", "an unadorned", "an 8"; "a uniform"


def covers(dataset: str, class_names: tuple[str, ...]) -> bool:
    """Whether the corpus speaks of this data set (and of as many classes as it has)."""
    return dataset in DATASETS and len(NOUNS[dataset]) == len(class_names)


def check(dataset: str, split: str = "train") -> None:
    """A data set the corpus speaks of, and a split it has."""
    if dataset not in DATASETS:
        raise GenfastError(f"no caption corpus for data set '{dataset}'; it has one for: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise GenfastError(f"unknown corpus split '{split}'; choose one of: {', '.join(SPLITS)}")


def _with_articles(text: str) -> str:
    """Every article "a" made "an" before a vowel sound, and "an" made "a" before any other."""
    def fix(match: re.Match) -> str:
        word = match.group(2).lower()
        article = "an" if _VOWEL_SOUND.match(word) and not word.startswith("one") else "a"  # "a one"
        return (article.capitalize() if match.group(1) == "A" else article) + " "
    return _ARTICLE.sub(fix, text)


def _fill(template: str, noun: str, words: list[str]) -> str:
    """A template filled: adjectives before the noun joined by spaces, after it by commas and "and"."""
    if words and template.index("{adjectives}") > template.index("{noun}"):
        said = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    else:
        said = " ".join(words)
    return _with_articles(template.format(noun=noun, adjectives=said))


def caption(dataset: str, label: int, levels: dict[str, int], rng: random.Random, split: str = "train") -> str:
    """One caption of an image of class `label` whose attributes are at `levels` ({name: -1, 0 or +1},
    from attributes.Thresholds.levels): each attribute off the middle is named with probability
    ADJECTIVE_RATE (at most MAX_ADJECTIVES of them), in words of `split`, drawn from `rng`."""
    check(dataset, split)
    if not 0 <= label < len(NOUNS[dataset]):
        raise GenfastError(f"class {label} is not one of {dataset}'s (0 to {len(NOUNS[dataset]) - 1})")
    said = [name for name in ADJECTIVES[dataset] if levels.get(name, 0) != 0 and rng.random() < ADJECTIVE_RATE]
    if len(said) > MAX_ADJECTIVES:
        kept = set(rng.sample(said, MAX_ADJECTIVES))
        said = [name for name in said if name in kept]
    words = [rng.choice(ADJECTIVES[dataset][name][_LEVEL_NAMES[int(levels[name])]].of(split)) for name in said]
    noun = rng.choice(NOUNS[dataset][label].of(split))
    template = rng.choice(TEMPLATES[dataset]["described" if words else "plain"].of(split))
    return _fill(template, noun, words)


def captions_for(dataset: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, split: str = "train",
                 thresholds: attributes.Thresholds | None = None) -> list[str]:
    """A caption for each image: its label's noun and words for its measured attributes, against the
    training split's per-class thresholds (or `thresholds`); the same seed, the same captions."""
    check(dataset, split)
    if thresholds is None:
        thresholds = attributes.training_thresholds(dataset)
    levels = thresholds.levels(attributes.measure(images), labels)
    rng = random.Random(f"genfast-captions-{seed}")  # a str seed: the same stream on every platform and Python
    names = list(ADJECTIVES[dataset])
    rows = torch.stack([levels[name] for name in names], 1).tolist() if len(labels) else []
    return [caption(dataset, int(label), dict(zip(names, row)), rng, split)
            for label, row in zip(torch.as_tensor(labels).tolist(), rows)]


def _adjective_phrases(dataset: str, split: str) -> list[list[str]]:
    """Every list of at most MAX_ADJECTIVES attribute words a caption can say, in speaking order."""
    options = [[w for level in ADJECTIVES[dataset][name].values() for w in level.of(split)]
               for name in ADJECTIVES[dataset]]
    phrases = []
    for count in range(1, MAX_ADJECTIVES + 1):
        for chosen in itertools.combinations(options, count):
            phrases.extend(list(words) for words in itertools.product(*chosen))
    return phrases


def phrasings(dataset: str, label: int, split: str = "train") -> list[str]:
    """Every distinct caption the corpus can make of class `label` in `split`, sorted."""
    check(dataset, split)
    nouns, templates = NOUNS[dataset][label].of(split), TEMPLATES[dataset]
    found = {_fill(t, noun, []) for t in templates["plain"].of(split) for noun in nouns}
    found.update(_fill(t, noun, words) for t in templates["described"].of(split) for noun in nouns
                 for words in _adjective_phrases(dataset, split))
    return sorted(found)


def class_prompts(dataset: str, split: str = "held_out") -> list[list[str]]:
    """Per class, every caption of `split` that names the class alone (no attribute word)."""
    check(dataset, split)
    return [sorted({_fill(t, noun, []) for t in TEMPLATES[dataset]["plain"].of(split) for noun in nouns.of(split)})
            for nouns in NOUNS[dataset]]


@dataclass(frozen=True)
class AttributePair:
    """Two prompts for one class that differ in one attribute word only: its low word, then its high."""

    label: int
    attribute: str
    low: str
    high: str


def attribute_pairs(dataset: str, seed: int = 0, split: str = "held_out") -> list[AttributePair]:
    """For every class and every attribute with words, one pair of prompts of `split` (template, noun
    and the two words drawn by `seed`): "a snapshot of a black dress" / "a snapshot of a white dress"."""
    check(dataset, split)
    rng = random.Random(f"genfast-attribute-pairs-{seed}")
    pairs = []
    for label, nouns in enumerate(NOUNS[dataset]):
        for name, levels in ADJECTIVES[dataset].items():
            template, noun = rng.choice(TEMPLATES[dataset]["described"].of(split)), rng.choice(nouns.of(split))
            low, high = (_fill(template, noun, [rng.choice(levels[level].of(split))]) for level in ("low", "high"))
            pairs.append(AttributePair(label, name, low, high))
    return pairs
