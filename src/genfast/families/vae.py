"""A convolutional VAE for 28x28 images, and its class-conditional variant (CVAE).

Encoder: two stride-2 4x4 convolutions (32, 64) with LeakyReLU, then a Dense layer
to the mean and log-variance of a diagonal Gaussian q(z|x). Decoder: the mirror
image, built like the DCGAN generator (Dense -> 64x7x7 -> two transposed
convolutions), so that both families' samplers have the same shape and cost.
Loss: the negative ELBO (Kingma & Welling, 2014), a reconstruction term plus
beta times KL(q(z|x) || N(0, I)) (beta-VAE, Higgins et al., 2017), summed over
pixels and latents and averaged over the batch.

The likelihood is Bernoulli by default (pixels scaled to [0, 1] as targets of a
cross-entropy with the decoder's logits; the usual choice for MNIST-like data),
or Gaussian with a fixed sigma. The CVAE (Sohn et al., 2015) gives the label to
both halves: one-hot planes beside the encoder's pixels, a one-hot vector beside
the decoder's z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genfast.config import require
from genfast.errors import GenfastError
from genfast.families.base import Family, Sampler, TrainedConfig


@dataclass
class VAEConfig(TrainedConfig):
    z_dim: int = 32
    conv_channels: int = 32      # the encoder's first / the decoder's last hidden convolution
    hidden_channels: int = 64    # the encoder's second / the decoder's (size/4)^2 map
    likelihood: str = "bernoulli"  # bernoulli | gaussian
    sigma: float = 0.1           # gaussian likelihood: the fixed pixel standard deviation, in [-1, 1] units
    beta: float = 1.0            # weight of the KL term
    lr: float = 1e-3


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"z_dim": 4, "conv_channels": 4, "hidden_channels": 8, "batch_size": 32},
}


def _one_hot(labels: torch.Tensor | None, num_classes: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if labels is None else F.one_hot(labels, num_classes).to(dtype)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        self.num_classes = c.num_classes if c.conditional else 0
        self.conv1 = nn.Conv2d(c.channels + self.num_classes, c.conv_channels, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c.conv_channels, c.hidden_channels, 4, stride=2, padding=1)
        self.fc = nn.Linear(c.hidden_channels * (c.image_size // 4) ** 2, 2 * c.z_dim)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """-> (mu, logvar) of q(z | x, y)."""
        if self.num_classes:
            planes = _one_hot(labels, self.num_classes, images.dtype)[:, :, None, None]
            images = torch.cat([images, planes.expand(-1, -1, *images.shape[2:])], dim=1)
        x = F.leaky_relu(self.conv1(images), 0.2)
        x = F.leaky_relu(self.conv2(x), 0.2)
        mu, logvar = self.fc(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        self.num_classes = c.num_classes if c.conditional else 0
        self.base = c.image_size // 4
        self.hidden_channels = c.hidden_channels
        self.fc = nn.Linear(c.z_dim + self.num_classes, c.hidden_channels * self.base**2)
        self.up1 = nn.ConvTranspose2d(c.hidden_channels, c.conv_channels, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(c.conv_channels, c.channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-> per-pixel logits (Bernoulli) or pre-tanh means (Gaussian)."""
        if self.num_classes:
            z = torch.cat([z, _one_hot(labels, self.num_classes, z.dtype)], dim=1)
        x = F.relu(self.fc(z)).view(-1, self.hidden_channels, self.base, self.base)
        x = F.relu(self.up1(x))
        return self.up2(x)


def to_pixels(decoded: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Decoder output -> the likelihood's mean, as [-1, 1] pixels."""
    return torch.sigmoid(decoded) * 2 - 1 if likelihood == "bernoulli" else torch.tanh(decoded)


class DecoderPixels(nn.Module):
    """The decoder followed by its likelihood's mean: what a VAE sampler runs."""

    def __init__(self, decoder: Decoder, likelihood: str):
        super().__init__()
        self.decoder = decoder
        self.likelihood = likelihood

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return to_pixels(self.decoder(z, labels), self.likelihood)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, in closed form."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1)


def reconstruction_nll(decoded: torch.Tensor, images: torch.Tensor, c: VAEConfig) -> torch.Tensor:
    """-log p(x | z) per example (up to the Gaussian's constant), summed over pixels."""
    if c.likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(decoded, (images + 1) / 2, reduction="none")
    else:
        nll = (torch.tanh(decoded) - images).pow(2) / (2 * c.sigma**2)
    return nll.flatten(1).sum(dim=1)


class VAE(Family):
    name = "vae"
    config_class = VAEConfig
    presets = PRESETS
    generative = True
    reconstructs = True
    optimizer_keys = ("lr",)

    def model_name(self, config: VAEConfig) -> str:
        return "cvae" if config.conditional else "vae"

    def build(self, config: VAEConfig) -> dict[str, nn.Module]:
        require(config, positive=("z_dim", "conv_channels", "hidden_channels", "sigma", "batch_size", "lr",
                                  "image_size"), non_negative=("beta",))
        if config.image_size % 4:
            raise GenfastError(f"image_size must be a multiple of 4 for the VAE, got {config.image_size}")
        if config.likelihood not in ("bernoulli", "gaussian"):
            raise GenfastError(f"likelihood must be 'bernoulli' or 'gaussian', got '{config.likelihood}'")
        if config.conditional and config.num_classes < 2:
            raise GenfastError("a conditional VAE needs a labelled data set with at least 2 classes")
        return {"encoder": Encoder(config), "decoder": Decoder(config)}

    def optimizers(self, modules: dict[str, nn.Module], config: VAEConfig) -> dict[str, torch.optim.Optimizer]:
        # One optimizer over both halves: the ELBO trains them together.
        params = [*modules["encoder"].parameters(), *modules["decoder"].parameters()]
        return {"vae": torch.optim.Adam(params, lr=config.lr)}

    def elbo_terms(self, modules: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None,
                   generator: torch.Generator, config: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction NLL, KL) per example, with z drawn by the reparameterisation trick."""
        mu, logvar = modules["encoder"](images, labels)
        eps = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        decoded = modules["decoder"](z, labels)
        return reconstruction_nll(decoded, images, config), kl_to_standard_normal(mu, logvar)

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: VAEConfig) -> dict[str, float]:
        if not config.conditional:
            labels = None
        rec, kl = self.elbo_terms(modules, images, labels, generator, config)
        loss = (rec + config.beta * kl).mean()
        optimizers["vae"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["vae"].step()
        logged = {"loss": loss.item(), "reconstruction": rec.mean().item(), "kl": kl.mean().item()}
        if config.likelihood == "bernoulli":  # a true likelihood (the Gaussian's drops its constant)
            logged["bits_per_pixel"] = (rec + kl).mean().item() / (math.prod(images.shape[1:]) * math.log(2))
        return logged

    def sampler(self, modules: dict[str, nn.Module], config: VAEConfig, class_names: tuple[str, ...]) -> Sampler:
        return Sampler.from_module(DecoderPixels(modules["decoder"], config.likelihood), noise_shape=(config.z_dim,),
                                   image_shape=(config.channels, config.image_size, config.image_size),
                                   class_names=class_names if config.conditional else ())

    @torch.inference_mode()
    def reconstruct(self, modules: dict[str, nn.Module], config: VAEConfig, images: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
        """[-1, 1] images -> their reconstructions through the posterior mean."""
        encoder, decoder = modules["encoder"].eval(), modules["decoder"].eval()
        device = next(decoder.parameters()).device
        labels = labels.to(device) if config.conditional else None
        mu, _ = encoder(images.to(device), labels)
        return to_pixels(decoder(mu, labels), config.likelihood).cpu()

    def inference_modules(self) -> tuple[str, ...]:
        # The encoder stays in shipped checkpoints: `sample --reconstruct` needs it, and it is small.
        return ("encoder", "decoder")
