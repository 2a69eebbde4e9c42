"""The `clip` family: images and text in one space, as CLIP (Radford et al., 2021) trains them, with the
text side frozen: MiniLM's sentence embeddings (families/ar/text.py) under one trained linear layer.
(LiT, Zhai et al. 2022, locks the image tower; here the language model is the part that knows more.)

- Image tower: the captioner's image reader (families/captioner.py: the data set's judge, frozen, and
  a trained convolution over its map), its tokens flattened, then two linear layers to `embed_dim`.
- Text head: a linear layer from MiniLM's 384 dimensions to `embed_dim`. Every prompt, in any
  phrasing, has a MiniLM embedding, so it has a place in this space: that is what makes the CLIP
  score (metrics.clip_score) work for arbitrary prompts, not only those naming a class.
- Loss: the symmetric InfoNCE loss over the cosine similarities of a batch's images and captions,
  times a learned scale (CLIP's: from 1/0.07, at most 100). A caption is a positive for every image of
  the batch it is true of (the same class, and each attribute word it says true of the image), not
  only for the image it was drawn for: a batch holds many images of one class and third, whose
  captions are no negatives of each other.
- Captions: MiniLM embeds a few dozen captions a second on one CPU core, far too slow for every
  step, so the captions are drawn and embedded once when a run starts (text.CaptionPool, the text
  models' pool): `pool_per_cell` corpus captions for every cell (class, third of each attribute),
  3,240 for Fashion-MNIST, with what each caption's words say of each attribute. A step gives each
  image a random caption of its cell. The pool is drawn from the run's seed, so a resumed run
  rebuilds the same one; checkpoints do not keep it. A data set without a corpus has one cell per
  class, captioned with its class names' generic phrasings.

Scores (`evaluate`, at every checkpoint and in `genfast eval`): zero-shot class accuracy on the test
split, each image labelled with the class whose prompts' mean embedding is nearest (the corpus's
class-only prompts, of the training split and of the held-out one), and attribute agreement: for
the corpus's held-out pairs ("a snapshot of a black dress" / "... white dress"), the share of test
images of that class in the attribute's lower or upper third that are nearer the pair's prompt of
their third (0.5: chance); `attribute_agreement_train`, the same over pairs of the training
split's words (those the text head was trained on: held-out words reach it through MiniLM only).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast import attributes, caption_scores, corpus
from genfast import config as configlib
from genfast.config import require
from genfast.distributed import unwrap
from genfast.errors import GenfastError
from genfast.families.ar import text
from genfast.families.base import Family, TrainedConfig
from genfast.families.captioner import ImageReader, attribute_names, judge_weights

MAX_SCALE = 100.0           # CLIP's bound on the logit scale
TRAIN_PROMPTS_PER_CLASS = 8  # training-split class prompts embedded per class for zero-shot labels (of 120)


@dataclass
class CLIPConfig(TrainedConfig):
    # Filled in when training starts, from the data set:
    dataset: str = ""
    class_names: tuple[str, ...] = ()
    pool_per_cell: int = 4       # captions embedded per (class, attribute thirds) cell when training starts
    classifier: str = ""         # the judge whose convolutions read the images (default: classifier-<data set>)
    classifier_config: str = ""  # that judge's config as JSON: filled in when training starts
    width: int = 64              # of each of the image reader's tokens
    hidden: int = 256
    embed_dim: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_size: int = 256        # InfoNCE's negatives are the batch's other captions: more is better
    conditional: bool = True     # always labelled: captions are made from the labels


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"width": 8, "hidden": 16, "embed_dim": 16, "batch_size": 32, "pool_per_cell": 2, "warmup_steps": 0},
}


def said_by(pool: text.CaptionPool, config: CLIPConfig) -> torch.Tensor:
    """(classes, cells, per_cell, A) int8: the level each pooled caption's words say of each attribute,
    -1 or +1, and 0 where it says none (caption_scores.read)."""
    said = [[[[dict(caption_scores.read(config.dataset, config.class_names, caption).words).get(name, 0)
               for name in pool.names] for caption in cell] for cell in per_class] for per_class in pool.captions]
    return torch.tensor(said, dtype=torch.int8).view(*pool.embeddings.shape[:3], len(pool.names))


class ImageTower(nn.Module):
    """[-1, 1] images -> (B, embed_dim) unit vectors."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.reader = ImageReader(c, c.width)
        self.head = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(c.width * self.reader.tokens, c.hidden),
                                  nn.ReLU(), nn.Linear(c.hidden, c.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.reader(images)), dim=-1)


class TextHead(nn.Module):
    """MiniLM embeddings (B, 384) -> (B, embed_dim) unit vectors, and the logit scale of the loss."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.project = nn.Linear(text.EMBEDDING_DIM, c.embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(embeddings), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)


def image_embeddings(modules: dict[str, nn.Module], images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """[-1, 1] images -> (N, embed_dim) unit vectors, in eval mode, on the CPU."""
    tower = modules["image"]
    was_training = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    with torch.inference_mode():
        embedded = torch.cat([tower(images[i:i + batch_size].to(device)).cpu()
                              for i in range(0, len(images), batch_size)])
    tower.train(was_training)
    return embedded


def text_embeddings(modules: dict[str, nn.Module], prompts: list[str]) -> torch.Tensor:
    """Prompts, in any words -> (N, embed_dim) unit vectors (MiniLM, then the text head), on the CPU."""
    head = modules["text"]
    with torch.inference_mode():
        return head(text.encoder()(prompts).to(head.log_scale.device)).cpu()


def _class_prompts(config: CLIPConfig) -> dict[str, list[list[str]]]:
    """Per split, per class, the class-only prompts zero-shot labels are made with."""
    if not corpus.covers(config.dataset, config.class_names):
        return {"train": text.captions(config.dataset, config.class_names)}
    rng = random.Random("genfast-clip-class-prompts")
    train = [rng.sample(prompts, min(TRAIN_PROMPTS_PER_CLASS, len(prompts)))
             for prompts in corpus.class_prompts(config.dataset, "train")]
    return {"train": train, "held_out": corpus.class_prompts(config.dataset, "held_out")}


def zero_shot_labels(modules: dict[str, nn.Module], embedded_images: torch.Tensor,
                     prompts: list[list[str]]) -> torch.Tensor:
    """Each image's class: the one whose prompts' mean embedding is nearest."""
    classes = torch.stack([F.normalize(text_embeddings(modules, per_class).mean(0), dim=0) for per_class in prompts])
    return (embedded_images @ classes.T).argmax(1)


class CLIP(Family):
    name = "clip"
    generative = False
    config_class = CLIPConfig
    presets = PRESETS
    optimizer_keys = ("lr", "weight_decay")

    def model_name(self, config: CLIPConfig) -> str:
        return "clip"

    def prepare(self, config: CLIPConfig, train_set) -> tuple[CLIPConfig, dict[str, dict[str, torch.Tensor]]]:
        """Before a new run: the data set's name and classes, and the judge its image reader starts from."""
        changes, judge = judge_weights(config, train_set)
        config = configlib.override(config, changes | {"dataset": train_set.name, "class_names": train_set.class_names})
        return config, {"image": {f"reader.judge.{key}": value for key, value in judge.items()}}

    def start_run(self, modules: dict[str, nn.Module], config: CLIPConfig, train_set, seed: int) -> None:
        """The run's caption pool, drawn from its seed and embedded by MiniLM, and what each caption
        says (said_by), held by the text head for train_step."""
        head = unwrap(modules["text"])
        pool = text.CaptionPool.build(config.dataset, config.class_names, train_set.images, train_set.labels,
                                      config.pool_per_cell, seed).to(head.log_scale.device)
        head.caption_pool, head.said = pool, said_by(pool, config).to(head.log_scale.device)

    def build(self, config: CLIPConfig) -> dict[str, nn.Module]:
        require(config, positive=("width", "hidden", "embed_dim", "batch_size", "lr", "pool_per_cell"),
                non_negative=("weight_decay",))
        if not config.conditional or config.num_classes < 2:
            raise GenfastError("a clip model needs a labelled data set with at least 2 classes: its captions name "
                               "the class")
        return {"image": ImageTower(config), "text": TextHead(config)}

    def optimizers(self, modules: dict[str, nn.Module], config: CLIPConfig) -> dict[str, torch.optim.Optimizer]:
        return {name: torch.optim.AdamW([p for p in modules[name].parameters() if p.requires_grad],  # not the judge's
                                        lr=config.lr, weight_decay=config.weight_decay)
                for name in ("image", "text")}

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: CLIPConfig) -> dict[str, float]:
        head, device = unwrap(modules["text"]), images.device
        levels = head.caption_pool.levels(images, labels).to(device)
        index = head.caption_pool.pick(labels, levels, generator)
        image, caption = modules["image"](images), modules["text"](head.caption_pool.embeddings[index])
        logits = head.scale() * image @ caption.T
        # true[i, j]: caption j is true of image i (its class, and every word it says of an attribute).
        said = head.said[index][None]
        true = (labels[:, None] == labels[None]) & ((said == 0) | (said == levels[:, None])).all(-1)
        loss = (_soft_cross_entropy(logits, true) + _soft_cross_entropy(logits.T, true.T)) / 2
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        retrieved = true[torch.arange(len(images), device=device), logits.argmax(1)].float().mean()
        return {"loss": loss.item(), "retrieval_accuracy": retrieved.item(),
                "scale": unwrap(modules["text"]).scale().item()}

    def evaluate(self, modules: dict[str, nn.Module], config: CLIPConfig, images: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, float]:
        """Zero-shot class accuracy and attribute agreement on a held-out split (module docstring)."""
        embedded = image_embeddings(modules, images)
        scores = {f"zero_shot_accuracy{'' if split == 'train' else '_held_out'}":
                  float((zero_shot_labels(modules, embedded, prompts) == labels).double().mean())
                  for split, prompts in _class_prompts(config).items()}
        if attribute_names(config):
            scores |= _agreement(modules, config, embedded, images, labels, "held_out")
            scores["attribute_agreement_train"] = _agreement(modules, config, embedded, images, labels,
                                                             "train")["attribute_agreement"]
        return scores

    def inference_modules(self) -> tuple[str, ...]:
        return ("image", "text")

    def describe(self, config: CLIPConfig, test: dict[str, float]) -> str:
        summary = f"images and MiniLM text in {config.embed_dim} dimensions, {config.dataset}"
        shown = {"zero_shot_accuracy_held_out": "held-out zero-shot accuracy",
                 "attribute_agreement": "attribute agreement"}
        scores = [f"{label} {test[key]:.3f}" for key, label in shown.items() if key in test]
        return summary + (", test " + ", ".join(scores) if scores else "")


def _soft_cross_entropy(logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against the uniform distribution over its true columns."""
    return F.cross_entropy(logits, true.float() / true.sum(1, keepdim=True))


def _agreement(modules: dict[str, nn.Module], config: CLIPConfig, embedded: torch.Tensor, images: torch.Tensor,
               labels: torch.Tensor, split: str) -> dict[str, float]:
    """attribute_agreement, overall and per attribute (<name>_agreement), over the corpus's pairs of `split`."""
    pairs = corpus.attribute_pairs(config.dataset, 0, split)
    prompts = text_embeddings(modules, [prompt for pair in pairs for prompt in (pair.low, pair.high)])
    levels = attributes.training_thresholds(config.dataset).levels(attributes.measure(images), labels)
    right: dict[str, list[torch.Tensor]] = {}
    for pair, low, high in zip(pairs, prompts[0::2], prompts[1::2]):
        mine = (labels == pair.label) & (levels[pair.attribute] != 0)
        says = torch.where(embedded[mine] @ high > embedded[mine] @ low, 1, -1)
        right.setdefault(pair.attribute, []).append(says == levels[pair.attribute][mine])
    every = torch.cat([r for per_attribute in right.values() for r in per_attribute])
    return {"attribute_agreement": float(every.double().mean())} | {
        f"{name}_agreement": float(torch.cat(r).double().mean()) for name, r in right.items()}
