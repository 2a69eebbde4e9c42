"""A small CNN classifier per data set: the yardstick of every generative model.

It is trained through the same trainer as the generative families (`genfast train
classifier`) and serves two purposes in `genfast eval`: its penultimate layer is
the feature space of FID and KID (no Inception weights exist offline, and a
network trained on the very data set is the more sensitive judge of it anyway),
and its predictions give the class accuracy of conditional samples.

Architecture: two blocks of two 3x3 convolutions (32, then 64 channels) with
BatchNorm, ReLU and 2x2 max-pooling, a Dense layer of 256 features (the FID
space) with BatchNorm and ReLU, dropout, and the class logits. Training augments
with random shifts of up to two pixels, which is what takes a CNN of this size past
99% on MNIST.

The feature layer's BatchNorm is what keeps that space alive: without it, weight
decay and ReLU let a unit that went negative on every image stay there (no gradient
reaches it), and the first shipped Fashion-MNIST judge had 127 of its 256 features
zero on every test image, so FID's covariance had rank 129. With it every unit is
centred on the batch, active for part of the images, and trained. `evaluate` reports
the share of dead features on the held-out split (`genfast models` shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast.config import require
from genfast.errors import GenfastError
from genfast.families.base import Family, TrainedConfig


@dataclass
class ClassifierConfig(TrainedConfig):
    channels_1: int = 32
    channels_2: int = 64
    features: int = 256          # width of the penultimate layer: the FID/KID feature space
    # BatchNorm on that layer (see above). Every preset sets it; False is for checkpoints
    # saved before it existed (their config lacks the key), so they load as they were.
    feature_norm: bool = False
    dropout: float = 0.3
    max_shift: int = 2           # augmentation: random translation in pixels (0 = off)
    lr: float = 1e-3
    weight_decay: float = 5e-4
    conditional: bool = True     # always labelled: the trainer then checks the data set has labels


PRESETS: dict[str, dict[str, Any]] = {
    "default": {"feature_norm": True},
    "tiny": {"channels_1": 4, "channels_2": 8, "features": 16, "batch_size": 32, "feature_norm": True},
}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2))


class ClassifierNet(nn.Module):
    def __init__(self, c: ClassifierConfig):
        super().__init__()
        self.body = nn.Sequential(_block(c.channels, c.channels_1), _block(c.channels_1, c.channels_2))
        self.fc = nn.Linear(c.channels_2 * (c.image_size // 4) ** 2, c.features)
        self.feature_norm = nn.BatchNorm1d(c.features) if c.feature_norm else nn.Identity()
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.features, c.num_classes)
        self.num_features = c.features  # what torchmetrics' feature= modules announce

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the penultimate layer (after its ReLU)."""
        return self.features_of(self.body(images))

    def features_of(self, maps: torch.Tensor) -> torch.Tensor:
        """The penultimate layer from the convolutions' map (`body`'s output), for a reader of both."""
        return F.relu(self.feature_norm(self.fc(maps.flatten(1))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


def dead_share(active: torch.Tensor) -> float:
    """The share of feature units never active (`active`: one bool per unit)."""
    return 1 - float(active.double().mean())


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift whole pixels, filling with background (-1)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=generator.device)
              .to(images.device))
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


class Classifier(Family):
    name = "classifier"
    generative = False
    config_class = ClassifierConfig
    presets = PRESETS
    optimizer_keys = ("lr", "weight_decay")

    def model_name(self, config: ClassifierConfig) -> str:
        return "classifier"

    def build(self, config: ClassifierConfig) -> dict[str, nn.Module]:
        require(config, positive=("channels_1", "channels_2", "features", "batch_size", "image_size"),
                non_negative=("lr", "weight_decay", "max_shift"), unit=("dropout",))
        if config.image_size % 4:
            raise GenfastError(f"image_size must be a multiple of 4 for the classifier, got {config.image_size}")
        if not config.conditional or config.num_classes < 2:
            raise GenfastError("a classifier needs a labelled data set with at least 2 classes")
        return {"classifier": ClassifierNet(config)}

    def optimizers(self, modules: dict[str, nn.Module], config: ClassifierConfig) -> dict[str, torch.optim.Optimizer]:
        return {"classifier": torch.optim.AdamW(modules["classifier"].parameters(), lr=config.lr,
                                                weight_decay=config.weight_decay)}

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: ClassifierConfig) -> dict[str, float]:
        logits = modules["classifier"](random_shift(images, config.max_shift, generator))
        loss = F.cross_entropy(logits, labels)
        optimizers["classifier"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["classifier"].step()
        return {"loss": loss.item(), "train_accuracy": (logits.argmax(1) == labels).float().mean().item()}

    @torch.inference_mode()
    def evaluate(self, modules: dict[str, nn.Module], config: ClassifierConfig, images: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, float]:
        """Accuracy on a held-out split ([-1, 1] images), in eval mode, and the share of
        feature units that are zero on every one of its images; the trainer logs both."""
        net = modules["classifier"].eval()
        device = next(net.parameters()).device
        correct, active = 0, torch.zeros(net.num_features, dtype=torch.bool)
        for i in range(0, len(images), 1000):
            features = net.features(images[i:i + 1000].to(device))
            correct += int((net.head(features).argmax(1).cpu() == labels[i:i + 1000]).sum())
            active |= (features != 0).any(0).cpu()
        net.train()
        return {"accuracy": correct / len(images), "dead_features": dead_share(active)}

    def inference_modules(self) -> tuple[str, ...]:
        return ("classifier",)

    def describe(self, config: ClassifierConfig, test: dict[str, float]) -> str:
        summary = super().describe(config, test)
        if "accuracy" in test:  # its held-out accuracy, and how much of its feature space lives
            summary += f", test accuracy {test['accuracy']:.4f}"
            if "dead_features" in test:
                summary += f", {test['dead_features']:.0%} of features dead"
        return summary
