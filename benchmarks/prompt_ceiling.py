"""How well MiniLM's sentence embedding alone tells the class of a held-out prompt: the ceiling of
held-out prompt accuracy for a text model that sees prompts only through that embedding.

A text-conditioned model reads a prompt as its all-MiniLM-L6-v2 embedding (families/ar/text.py).
If the embeddings of a held-out noun's prompts lie among another class's training captions ("a
parka" near the sandals), no amount of training on the corpus brings the model there: its
conditioning is a function of the embedding. This script fits a linear classifier (softmax
regression) on the embeddings of the corpus's training captions, drawn like a training run draws
them (corpus.caption over random attribute levels), and reports its accuracy on the class-only
prompts of the held-out split, on the ones `genfast eval` judges (metrics.prompt_accuracy, seed 0),
and per held-out noun; and the nearest training noun of each held-out noun. A generator's
held-out prompt accuracy is at most this times the judge's own accuracy.

    python benchmarks/prompt_ceiling.py --data fashion-mnist mnist
"""

from __future__ import annotations

import argparse
import random
import re

import torch
import torch.nn.functional as F

from genfast import corpus, metrics
from genfast.families.ar import text


def embed(prompts: list[str]) -> torch.Tensor:
    return torch.cat([text.encoder()(prompts[start:start + 512]) for start in range(0, len(prompts), 512)])


def training_captions(dataset: str, per_class: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Distinct training captions, each of a class and random attribute levels, as a run draws them."""
    rng = random.Random(f"prompt-ceiling-{seed}")
    names = list(corpus.ADJECTIVES[dataset])
    drawn = {(corpus.caption(dataset, label, {n: rng.choice((-1, 0, 1)) for n in names}, rng), label)
             for label in range(len(corpus.NOUNS[dataset])) for _ in range(per_class)}
    captions = sorted(drawn)
    return [c for c, _ in captions], torch.tensor([label for _, label in captions])


@torch.enable_grad()  # inside report's no_grad
def fit(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 500) -> torch.nn.Linear:
    """Softmax regression on unit embeddings (full batch, Adam, a little weight decay)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(probe(features * 10), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


@torch.no_grad()
def report(dataset: str, per_class: int) -> None:
    captions, labels = training_captions(dataset, per_class, seed=0)
    classes = len(corpus.NOUNS[dataset])
    probe = fit(embed(captions), labels, classes)
    held_out = [(label, p) for label, prompts in enumerate(corpus.class_prompts(dataset, "held_out")) for p in prompts]
    predicted = probe(embed([p for _, p in held_out]) * 10).argmax(1)
    truth = torch.tensor([label for label, _ in held_out])
    print(f"{dataset}: a linear read-out of MiniLM, fit on {len(captions)} training captions, tells the class of "
          f"{(predicted == truth).double().mean():.3f} of the {len(held_out)} held-out class prompts")
    pick = random.Random("genfast-eval-prompts-0")  # the prompts `genfast eval` judges (seed 0)
    judged = {p for prompts in corpus.class_prompts(dataset, "held_out")
              for p in pick.sample(prompts, metrics.CORPUS_PROMPTS_PER_CLASS)}
    mine = torch.tensor([p in judged for _, p in held_out])
    print(f"  on the {int(mine.sum())} that eval judges: {(predicted == truth)[mine].double().mean():.3f}")
    train_nouns = [(label, n) for label, words in enumerate(corpus.NOUNS[dataset]) for n in words.train]
    near = embed([n for _, n in train_nouns])
    for label, words in enumerate(corpus.NOUNS[dataset]):
        for noun in words.held_out:
            rows = torch.tensor([re.search(rf"\b{re.escape(noun)}\b", p) is not None for _, p in held_out])
            right = (predicted == truth)[rows].double().mean()
            nearest = train_nouns[int((embed([noun]) @ near.T).argmax())]
            print(f"  {noun!r} (class {label}): read-out right on {right:.2f} of its prompts; nearest training "
                  f"noun {nearest[1]!r} (class {nearest[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(corpus.DATASETS), choices=corpus.DATASETS)
    parser.add_argument("--per-class", type=int, default=600, help="training captions drawn per class")
    args = parser.parse_args()
    for dataset in args.data:
        report(dataset, args.per_class)


if __name__ == "__main__":
    main()
