"""What a caption says, read back through the corpus's words, and how well captions describe their images.

A caption is judged against the image it describes (captioner's `genfast eval`, and the
captioner's held-out scores at every checkpoint):

- its class is the class of the corpus noun it names (corpus.NOUNS, both splits). Nouns are
  matched longest first and as whole words (a hyphen belongs to the word), so "a dress shirt" is a
  shirt and "a t-shirt" is no shirt; a caption naming nouns of two classes, or none, has no class;
- its attribute words (corpus.ADJECTIVES, both splits) are compared with the image's measured
  levels (attributes.py): a word is right when the image is in the third of its class the word
  speaks of ("dark": the darker third), wrong otherwise, the middle third included;
- its wording is compared with REFERENCES captions the corpus makes of the same image, in the
  training split's phrasings (what a captioner learns to write), by BLEU-4 and ROUGE-L through
  torchmetrics. Corpus captions draw their template, noun and words at random, so even a perfect
  captioner scores well below 1: `corpus_bleu4` and `corpus_rouge_l`, one more corpus caption of
  each image scored against the same references, give the scale.

A data set the corpus does not speak of (`fake`, a folder) is captioned with its class names
(text.captions' generic phrasings): its captions are read for the class name alone, and
referenced against every phrasing of the class.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from genfast import attributes, corpus
from genfast.families.ar import text

REFERENCES = 5  # corpus captions per image that a caption's wording is compared with


@dataclass(frozen=True)
class Said:
    """What one caption says: a class (-1 for none, or nouns of two classes) and its attribute words,
    each as (attribute, level: -1 for the lower third's word, +1 for the upper third's)."""

    label: int
    words: tuple[tuple[str, int], ...]


@functools.cache
def _vocabulary(dataset: str, class_names: tuple[str, ...]) -> tuple[re.Pattern, dict[str, tuple]]:
    """One pattern that finds every noun and attribute word, longest first, and what each phrase means:
    ("noun", label) or ("word", attribute, level)."""
    meaning: dict[str, tuple] = {}
    if corpus.covers(dataset, class_names):
        for label, nouns in enumerate(corpus.NOUNS[dataset]):
            meaning |= {noun: ("noun", label) for noun in nouns.train + nouns.held_out}
        for name, levels in corpus.ADJECTIVES[dataset].items():
            for level, words in levels.items():
                meaning |= {word: ("word", name, -1 if level == "low" else 1) for word in words.train + words.held_out}
    else:
        meaning = {name.lower(): ("noun", label) for label, name in enumerate(class_names)}
    phrases = sorted(meaning, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, phrases)) + r")(?![\w-])")
    return pattern, meaning


def read(dataset: str, class_names: tuple[str, ...], caption: str) -> Said:
    """The class and the attribute words of a caption, as the corpus's words mean them."""
    pattern, meaning = _vocabulary(dataset, tuple(class_names))
    found = [meaning[match.group(0)] for match in pattern.finditer(caption.lower())]
    labels = {m[1] for m in found if m[0] == "noun"}
    return Said(labels.pop() if len(labels) == 1 else -1, tuple((m[1], m[2]) for m in found if m[0] == "word"))


def references(dataset: str, class_names: tuple[str, ...], images: torch.Tensor, labels: torch.Tensor,
               count: int = REFERENCES, seed: int = 0,
               thresholds: attributes.Thresholds | None = None) -> list[list[str]]:
    """`count` corpus captions of each image (seeds seed .. seed + count - 1), in the training split's
    words; for a data set without a corpus, every generic phrasing of the image's class."""
    if not corpus.covers(dataset, class_names):
        phrasings = text.captions(dataset, class_names)
        return [list(phrasings[label]) for label in labels.tolist()]
    drawn = [corpus.captions_for(dataset, images, labels, seed + k, "train", thresholds) for k in range(count)]
    return [list(row) for row in zip(*drawn)]


def scores(dataset: str, class_names: tuple[str, ...], captions: list[str], images: torch.Tensor,
           labels: torch.Tensor, thresholds: attributes.Thresholds | None = None,
           refs: list[list[str]] | None = None) -> dict[str, float]:
    """Every score of `captions` of `images` (uint8, or floats in [-1, 1]) of classes `labels`, as plain
    floats (the trainer logs each): class_accuracy; for corpus data sets attribute_accuracy (the share
    of attribute words said that are true; absent when none is said), one <attribute>_accuracy each,
    attribute_words (words said per caption); bleu4 and rouge_l against `refs` (default: `references`),
    and for corpus data sets corpus_bleu4 and corpus_rouge_l, their scale (module docstring)."""
    from torchmetrics.text import BLEUScore, ROUGEScore  # a few seconds to import: only when scoring

    labels = torch.as_tensor(labels)
    said = [read(dataset, class_names, caption) for caption in captions]
    result = {"class_accuracy": sum(s.label == label for s, label in zip(said, labels.tolist())) / len(said)}
    corpus_data = corpus.covers(dataset, class_names)
    if corpus_data:
        thresholds = thresholds or attributes.training_thresholds(dataset)
        true_levels = thresholds.levels(attributes.measure(images), labels)
        right = {name: [] for name in corpus.ADJECTIVES[dataset]}
        for index, s in enumerate(said):
            for name, level in s.words:
                right[name].append(int(true_levels[name][index]) == level)
        judged = [r for per_attribute in right.values() for r in per_attribute]
        if judged:
            result["attribute_accuracy"] = sum(judged) / len(judged)
        result |= {f"{name}_accuracy": sum(r) / len(r) for name, r in right.items() if r}
        result["attribute_words"] = len(judged) / len(said)
    refs = refs if refs is not None else references(dataset, class_names, images, labels, thresholds=thresholds)
    bleu, rouge = BLEUScore(n_gram=4), ROUGEScore(rouge_keys="rougeL")
    result["bleu4"] = float(bleu(captions, refs))
    result["rouge_l"] = float(rouge(captions, refs)["rougeL_fmeasure"])
    if corpus_data:  # one more corpus caption of each image, beside the references: the scale
        drawn = corpus.captions_for(dataset, images, labels, REFERENCES, "train", thresholds)
        result["corpus_bleu4"] = float(BLEUScore(n_gram=4)(drawn, refs))
        result["corpus_rouge_l"] = float(ROUGEScore(rouge_keys="rougeL")(drawn, refs)["rougeL_fmeasure"])
    return result
