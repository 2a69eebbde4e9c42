"""The seed's DCGAN for 28x28 images, and its class-conditional variant (cGAN).

Generator, as in the seed: Dense -> BatchNorm -> LeakyReLU -> reshape to
128x7x7 -> ConvTranspose 64 -> BatchNorm -> LeakyReLU -> ConvTranspose 1 -> tanh.
Discriminator, as in the seed: three stride-2 3x3 convolutions (32, 64, 128) with
LeakyReLU (BatchNorm on the last two), flatten, Dense 1. Loss: the non-saturating
GAN loss of Goodfellow et al. (2014), discriminator step first, then generator.

What was wrong in the seed's TensorFlow listing, and fixed here:
- `ConvTranspose2D` is not a Keras layer (the name is `Conv2DTranspose`);
- the Dense output goes into the transposed convolutions without the reshape to
  128x7x7 that they need (the listing reshapes only at the very end);
- the last layer is a LeakyReLU, so pixels are unbounded; the data is scaled to
  [-1, 1], so the output needs tanh;
- `for batch in x_train` walks single images, not batches (and calls
  `generator.predict` per image); here training takes shuffled mini-batches;
- the Dense layer has `activation='relu'` before its BatchNorm and LeakyReLU, so
  the LeakyReLU never sees a negative input; here it is linear, as in DCGAN;
- the combined model is compiled without freezing the discriminator, so the
  "generator" step also trains D towards calling fakes real; here the G step
  updates G alone;
- D ends in a sigmoid fed to binary cross-entropy; here D returns logits and the
  loss is BCE-with-logits, the same function without the float overflow.

The cGAN (Mirza & Osindero, 2014, in convolutional form) conditions the
generator by concatenating a learned class embedding to z, and the discriminator
by stacking the label as one-hot planes beside the image's pixels. A projection
discriminator (Miyato & Koyama, 2018) was tried first: without spectral norm it
collapsed each class to a single image within a few thousand steps on both data
sets, so it is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast.config import require
from genfast.distributed import unwrap
from genfast.errors import GenfastError
from genfast.families.base import Family, Sampler, TrainedConfig


@dataclass
class GANConfig(TrainedConfig):
    z_dim: int = 100
    hidden_channels: int = 128   # channels of the (size/4)^2 map the Dense layer makes (the seed's 128x7x7)
    conv_channels: int = 64      # the first transposed convolution's output (the seed's 64)
    disc_channels: int = 32      # the discriminator's first convolution; then x2, x4 (the seed's 32, 64, 128)
    leaky_slope: float = 0.2
    class_embed_dim: int = 32    # cGAN: size of the class embedding concatenated to z
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999


PRESETS: dict[str, dict[str, Any]] = {
    # Radford et al. (2016)'s DCGAN optimiser settings on the seed's architecture.
    "default": {},
    # The seed's own choices: Adam(1e-4) with Keras' default betas.
    "seed": {"lr_g": 1e-4, "lr_d": 1e-4, "beta1": 0.9, "batch_size": 64},
    # A few thousand parameters: for tests and smoke runs.
    "tiny": {"z_dim": 8, "hidden_channels": 8, "conv_channels": 4, "disc_channels": 4, "class_embed_dim": 4,
             "batch_size": 32},
}


class Generator(nn.Module):
    def __init__(self, c: GANConfig):
        super().__init__()
        self.base = c.image_size // 4
        self.hidden_channels = c.hidden_channels
        self.slope = c.leaky_slope
        self.embed = nn.Embedding(c.num_classes, c.class_embed_dim) if c.conditional else None
        in_dim = c.z_dim + (c.class_embed_dim if c.conditional else 0)
        self.fc = nn.Linear(in_dim, c.hidden_channels * self.base**2, bias=False)  # bias is redundant before BN
        self.bn0 = nn.BatchNorm1d(c.hidden_channels * self.base**2)
        self.up1 = nn.ConvTranspose2d(c.hidden_channels, c.conv_channels, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c.conv_channels)
        self.up2 = nn.ConvTranspose2d(c.conv_channels, c.channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = F.leaky_relu(self.bn0(self.fc(z)), self.slope)
        x = x.view(-1, self.hidden_channels, self.base, self.base)
        x = F.leaky_relu(self.bn1(self.up1(x)), self.slope)
        return torch.tanh(self.up2(x))


class Discriminator(nn.Module):
    def __init__(self, c: GANConfig):
        super().__init__()
        d = c.disc_channels
        self.slope = c.leaky_slope
        self.num_classes = c.num_classes
        self.conditional = c.conditional
        self.conv1 = nn.Conv2d(c.channels + (c.num_classes if c.conditional else 0), d, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(d, 2 * d, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * d)
        self.conv3 = nn.Conv2d(2 * d, 4 * d, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * d)
        side = c.image_size
        for _ in range(3):
            side = (side + 1) // 2  # 28 -> 14 -> 7 -> 4
        features = 4 * d * side * side
        self.out = nn.Linear(features, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:  # the label as one-hot planes beside the pixels
            planes = F.one_hot(labels, self.num_classes).to(images.dtype)[:, :, None, None]
            images = torch.cat([images, planes.expand(-1, -1, *images.shape[2:])], dim=1)
        x = F.leaky_relu(self.conv1(images), self.slope)
        x = F.leaky_relu(self.bn2(self.conv2(x)), self.slope)
        x = F.leaky_relu(self.bn3(self.conv3(x)), self.slope)
        return self.out(x.flatten(1)).squeeze(1)


class GAN(Family):
    name = "gan"
    config_class = GANConfig
    presets = PRESETS
    generative = True
    optimizer_keys = ("lr_g", "lr_d", "beta1", "beta2")

    def model_name(self, config: GANConfig) -> str:
        return "cgan" if config.conditional else "gan"

    def build(self, config: GANConfig) -> dict[str, nn.Module]:
        require(config, positive=("z_dim", "hidden_channels", "conv_channels", "disc_channels", "class_embed_dim",
                                  "batch_size", "image_size"),
                unit=("beta1", "beta2"), non_negative=("leaky_slope", "lr_g", "lr_d"))  # lr 0 freezes a network
        if config.image_size % 4:
            raise GenfastError(f"image_size must be a multiple of 4 for the DCGAN, got {config.image_size}")
        if config.conditional and config.num_classes < 2:
            raise GenfastError("a conditional GAN needs a labelled data set with at least 2 classes")
        return {"generator": Generator(config), "discriminator": Discriminator(config)}

    def optimizers(self, modules: dict[str, nn.Module], config: GANConfig) -> dict[str, torch.optim.Optimizer]:
        betas = (config.beta1, config.beta2)
        return {
            "generator": torch.optim.Adam(modules["generator"].parameters(), lr=config.lr_g, betas=betas),
            "discriminator": torch.optim.Adam(modules["discriminator"].parameters(), lr=config.lr_d, betas=betas),
        }

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: GANConfig) -> dict[str, float]:
        G, D = modules["generator"], modules["discriminator"]
        opt_g, opt_d = optimizers["generator"], optimizers["discriminator"]
        if not config.conditional:
            labels = None
        z = torch.randn(images.shape[0], config.z_dim, generator=generator, device=generator.device)
        fake = G(z, labels)

        # Discriminator: real -> 1, fake -> 0. Real and fake go through separately, as in
        # DCGAN, so each BatchNorm batch holds one kind only.
        d_real, d_fake = D(images, labels), D(fake.detach(), labels)
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # Generator, non-saturating: maximise log D(G(z)). D is frozen so this step
        # neither updates it nor spends time on its weight gradients (and, run by several
        # processes, is called bare: it has no gradients to average).
        D.requires_grad_(False)
        d_gen = unwrap(D)(fake, labels)
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)

        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "d_real": torch.sigmoid(d_real).mean().item(), "d_fake": torch.sigmoid(d_fake).mean().item()}

    def sampler(self, modules: dict[str, nn.Module], config: GANConfig, class_names: tuple[str, ...]) -> Sampler:
        return Sampler.from_module(modules["generator"], noise_shape=(config.z_dim,),
                                   image_shape=(config.channels, config.image_size, config.image_size),
                                   class_names=class_names if config.conditional else ())

    def inference_modules(self) -> tuple[str, ...]:
        return ("generator",)
