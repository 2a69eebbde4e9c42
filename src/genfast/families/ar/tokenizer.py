"""The VQ-VAE image tokenizer: a 28x28 image <-> a 7x7 grid of codes from a learned codebook.

The first stage of the `ar` family (van den Oord et al., 2017, "Neural Discrete
Representation Learning"). A convolutional encoder downsamples by 4 to a grid of
`code_dim`-vectors; each is replaced by its nearest codebook entry (its token);
the decoder turns the grid of entries back into pixels. Gradients pass the
quantiser straight through; a commitment loss keeps the encoder near its codes.

Codebook collapse (most codes never chosen, so the transformer gets a tiny
vocabulary) is handled the two ways that work in practice: the codebook follows
the encoder outputs assigned to it by exponential moving averages rather than by
gradient (the paper's appendix; as in Sonnet's VectorQuantizerEMA), and a code
whose usage falls below `dead_threshold` is restarted on a random encoder output
of the current batch (Dhariwal et al., 2020, Jukebox). The trainer logs codebook
usage and perplexity; `evaluate` reports reconstruction error and usage on the
test split at every checkpoint.

Multi-scale (`scales`, e.g. 1,2,3,5,7; Tian et al., 2024, "Visual Autoregressive
Modeling", VAR): the encoder's grid is quantised coarse to fine instead of once. At
each scale, what the coarser scales left (the grid minus their accumulated
contribution) is area-downsampled to that scale's side and quantised with the one
shared codebook (so the EMA and the dead-code restarts above cover every scale); the
codes are upsampled back to the grid (bicubic) and passed through a light residual
convolution of the scale's own (VAR's phi), which is that scale's contribution. The
decoder reads the sum of all contributions; the tokens are every scale's, coarse
first, each read row by row (1 + 4 + 9 + 25 + 49 = 88 for 1,2,3,5,7). The next-scale
transformer (model.py, objective `scales`) predicts them a scale at a time. No
`scales` (the default) is the single quantisation of the grid above, unchanged.

Trained with `genfast train vqvae`; not an image generator by itself (the `ar`
family's transformer makes its tokens), so it ships as a tokenizer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from genfast import distributed
from genfast.config import require
from genfast.distributed import unwrap
from genfast.errors import GenfastError
from genfast.families.base import Family, TrainedConfig


@dataclass
class VQVAEConfig(TrainedConfig):
    hidden_channels: int = 64    # the encoder's first convolution; the second has twice as many
    code_dim: int = 32           # size of a codebook vector
    codebook_size: int = 256     # the transformer's vocabulary
    commitment: float = 0.25     # beta of the commitment loss (the paper's value)
    ema_decay: float = 0.99
    dead_threshold: float = 0.03  # restart a code whose EMA count per batch falls below this
    lr: float = 1e-3
    scales: tuple[int, ...] = ()  # multi-scale: each scale's side, coarse to fine, the last the grid's (1,2,3,5,7)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"hidden_channels": 8, "code_dim": 4, "codebook_size": 16, "batch_size": 32},
}


class Encoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        h = c.hidden_channels
        self.net = nn.Sequential(
            nn.Conv2d(c.channels, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, 2 * h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * h, 2 * h, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * h, c.code_dim, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, code_dim, H/4, W/4)


class Decoder(nn.Module):
    def __init__(self, c: VQVAEConfig):
        super().__init__()
        h = c.hidden_channels
        self.net = nn.Sequential(
            nn.Conv2d(c.code_dim, 2 * h, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * h, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h, c.channels, 4, stride=2, padding=1), nn.Tanh())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(codes)


class Quantizer(nn.Module):
    """Nearest-neighbour lookup into a codebook kept by exponential moving averages."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.decay, self.dead_threshold = c.ema_decay, c.dead_threshold
        self.register_buffer("codebook", torch.randn(c.codebook_size, c.code_dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(c.codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())

    def tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) index of the nearest code (squared Euclidean distance)."""
        distances = (vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ self.codebook.T
                     + self.codebook.pow(2).sum(1)[None])
        return distances.argmin(1)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator) -> None:
        """One EMA step of the codebook towards the vectors assigned to each code, then
        restart the dead codes on random vectors of this batch."""
        one_hot = F.one_hot(tokens, len(self.codebook)).type(vectors.dtype)
        # Several training processes: the statistics of the global batch (summed over the
        # processes), so every process keeps the same codebook a single one would. A dead
        # code is restarted from each process's own batch; DDP then hands every process
        # rank 0's buffers at the next forward pass.
        counts, sums = distributed.sum_over_ranks(torch.cat([one_hot.sum(0)[:, None], one_hot.T @ vectors], 1)).split(
            [1, vectors.shape[1]], 1)
        self.ema_count.mul_(self.decay).add_(counts[:, 0], alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a rarely used code from dividing by ~0.
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + len(self.codebook) * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count[:, None])
        dead = self.ema_count < self.dead_threshold
        if dead.any():
            pick = torch.randint(len(vectors), (int(dead.sum()),), generator=generator, device=generator.device)
            self.codebook[dead] = vectors[pick.to(vectors.device)]
            self.ema_sum[dead] = self.codebook[dead]
            self.ema_count[dead] = 1.0


class Phi(nn.Module):
    """A scale's light residual convolution (VAR's phi): halfway between the upsampled codes
    and a 3x3 convolution of them, so a scale can sharpen what bicubic upsampling blurred
    while starting close to the codes themselves."""

    def __init__(self, code_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(code_dim, code_dim, 3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return 0.5 * codes + 0.5 * self.conv(codes)


class TrainingPass(NamedTuple):
    """What the training pass gives the loss and the codebook's EMA."""

    rebuilt: torch.Tensor     # reconstructions, through the straight-through estimator
    vectors: torch.Tensor     # (N, code_dim) what each token quantised (detached): the EMA's inputs
    tokens: torch.Tensor      # (N,) their codes
    commitment: torch.Tensor  # pulls the encoder to its quantisation
    fit: torch.Tensor | None  # pulls the scales' convolutions (phi) to the encoder's grid; None: single-scale


def scale_sides(c: VQVAEConfig) -> tuple[int, ...]:
    """The side of each scale's grid, coarse to fine; a single-scale tokenizer has one, the grid's."""
    return c.scales or (c.image_size // 4,)


def resized(grid: torch.Tensor, side: int) -> torch.Tensor:
    """A grid (B, D, H, W) area-downsampled to (B, D, side, side): each cell the mean of the cells it covers."""
    return grid if grid.shape[-1] == side else F.interpolate(grid, size=(side, side), mode="area")


class VQVAENet(nn.Module):
    """images <-> token grids; `encode` and `decode` are what the `ar` family uses, and a
    multi-scale tokenizer's `scale_input` and `contribution` what next-scale decoding uses."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = Encoder(c), Quantizer(c), Decoder(c)
        self.grid, self.sides = c.image_size // 4, scale_sides(c)
        self.phis = nn.ModuleList(Phi(c.code_dim) for _ in self.sides) if c.scales else None
        ends = [0, *itertools.accumulate(side * side for side in self.sides)]
        self.spans = [slice(start, end) for start, end in zip(ends, ends[1:])]  # each scale's tokens
        self.tokens_per_image = ends[-1]

    def forward(self, images: torch.Tensor) -> TrainingPass:
        """The training pass. The losses average over the scales, each partial sum held to
        the encoder's grid (VAR's), so coarse scales learn to say what they can alone."""
        z = self.encoder(images)
        target = z.detach()
        vectors, tokens, sums = zip(*self.quantized_scales(target))
        commitment = sum(F.mse_loss(z, partial.detach()) for partial in sums) / len(sums)
        fit = None if self.phis is None else sum(F.mse_loss(partial, target) for partial in sums) / len(sums)
        straight_through = z + (sums[-1] - z).detach()
        return TrainingPass(self.decoder(straight_through), torch.cat(vectors),
                            torch.cat([scale_tokens.flatten() for scale_tokens in tokens]), commitment, fit)

    def quantized_scales(self, target: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Quantise an encoder grid (B, code_dim, grid, grid) coarse to fine: per scale, the
        vectors it quantised (N, code_dim), their tokens (B, side * side) and the
        contributions so far (B, code_dim, grid, grid). Tokens are chosen on detached
        vectors (a nearest neighbour has no gradient); the contributions keep phi's."""
        accumulated = torch.zeros_like(target)
        for scale, side in enumerate(self.sides):
            rest = resized(target - accumulated.detach(), side)
            vectors = rest.permute(0, 2, 3, 1).reshape(-1, rest.shape[1])
            tokens = self.quantizer.tokens(vectors).view(len(target), -1)
            accumulated = accumulated + self.contribution(tokens, scale)
            yield vectors, tokens, accumulated

    def contribution(self, tokens: torch.Tensor, scale: int) -> torch.Tensor:
        """One scale's tokens (B, side * side) -> their part of the grid (B, code_dim, grid, grid)."""
        side = self.sides[scale]
        codes = self.quantizer.codebook[tokens].view(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
        if side != self.grid:
            codes = F.interpolate(codes, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        return codes if self.phis is None else self.phis[scale](codes)

    def empty_grid(self, batch: int) -> torch.Tensor:
        """The sum of no scale's contributions, (batch, code_dim, grid, grid): where next-scale decoding starts."""
        codebook = self.quantizer.codebook
        return codebook.new_zeros(batch, codebook.shape[1], self.grid, self.grid)

    def scale_input(self, accumulated: torch.Tensor, scale: int) -> torch.Tensor:
        """What the next-scale transformer reads at a scale's positions: the coarser scales'
        accumulated grid, area-downsampled to this scale's side, (B, side * side, code_dim)."""
        return resized(accumulated, self.sides[scale]).flatten(2).transpose(1, 2)

    def next_scale_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every scale's input from a whole sequence of tokens (B, tokens_per_image) (VAR's teacher
        forcing): (B, tokens_per_image, code_dim), scale k's from the tokens of scales < k."""
        accumulated, inputs = self.empty_grid(len(tokens)), []
        for scale, span in enumerate(self.spans):
            inputs.append(self.scale_input(accumulated, scale))
            accumulated = accumulated + self.contribution(tokens[:, span], scale)
        return torch.cat(inputs, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, tokens_per_image) tokens, coarse scale first, each row by row."""
        return torch.cat([tokens for _, tokens, _ in self.quantized_scales(self.encoder(images))], 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, tokens_per_image) tokens -> (B, C, H, W) in [-1, 1], from the sum of the scales' contributions."""
        return self.decoder(sum(self.contribution(tokens[:, span], scale) for scale, span in enumerate(self.spans)))


def usage(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of the codebook used, and the perplexity of the code distribution (the
    effective number of codes: codebook_size when all are used equally)."""
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


class VQVAE(Family):
    name = "vqvae"
    config_class = VQVAEConfig
    presets = PRESETS
    generative = False
    reconstructs = True
    optimizer_keys = ("lr",)

    def model_name(self, config: VQVAEConfig) -> str:
        return "vqvae-multiscale" if config.scales else "vqvae"

    def build(self, config: VQVAEConfig) -> dict[str, nn.Module]:
        require(config, positive=("hidden_channels", "code_dim", "codebook_size", "batch_size", "lr", "image_size"),
                non_negative=("commitment", "dead_threshold"), unit=("ema_decay",))
        if config.image_size % 4:
            raise GenfastError(f"image_size must be a multiple of 4 for the VQ-VAE, got {config.image_size}")
        if config.codebook_size < 2:
            raise GenfastError(f"codebook_size must be at least 2, got {config.codebook_size}")
        grid, sides = config.image_size // 4, config.scales
        if sides and (sides[-1] != grid or sides[0] < 1 or any(a >= b for a, b in zip(sides, sides[1:]))):
            raise GenfastError(f"scales must grow from 1 or more to the grid's side ({grid} for {config.image_size}x"
                               f"{config.image_size} images), e.g. 1,2,3,5,{grid}; got {','.join(map(str, sides))}")
        return {"vqvae": VQVAENet(config)}

    def optimizers(self, modules: dict[str, nn.Module], config: VQVAEConfig) -> dict[str, torch.optim.Optimizer]:
        # The codebook is a buffer (EMA), so the optimizer sees the encoder and decoder only.
        return {"vqvae": torch.optim.Adam(modules["vqvae"].parameters(), lr=config.lr)}

    def train_step(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                   images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   config: VQVAEConfig) -> dict[str, float]:
        trained = modules["vqvae"](images)
        reconstruction = F.mse_loss(trained.rebuilt, images)
        loss = reconstruction + config.commitment * trained.commitment
        logged = {"reconstruction_mse": reconstruction.item(), "commitment": trained.commitment.item()}
        if trained.fit is not None:  # multi-scale: the scales' convolutions learn by gradient, the codebook by EMA
            loss = loss + trained.fit
            logged["phi_fit"] = trained.fit.item()
        optimizers["vqvae"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["vqvae"].step()
        unwrap(modules["vqvae"]).quantizer.update(trained.vectors.float(), trained.tokens, generator)
        return {"loss": loss.item()} | logged | usage(trained.tokens, config.codebook_size)

    @torch.inference_mode()
    def evaluate(self, modules: dict[str, nn.Module], config: VQVAEConfig, images: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, float]:
        """Reconstruction error and codebook use on a held-out split; the trainer logs them."""
        net = modules["vqvae"].eval()
        device = next(net.parameters()).device
        errors, tokens = [], []
        for start in range(0, len(images), 1000):
            batch = images[start:start + 1000].to(device)
            t = net.encode(batch)
            errors.append(F.mse_loss(net.decode(t), batch, reduction="sum").item())
            tokens.append(t.cpu())
        net.train()
        mse = sum(errors) / images.numel()
        return {"reconstruction_mse": mse, "psnr_db": 10 * math.log10(4 / mse)} | usage(torch.cat(tokens),
                                                                                       config.codebook_size)

    @torch.inference_mode()
    def reconstruct(self, modules: dict[str, nn.Module], config: VQVAEConfig, images: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
        """[-1, 1] images -> tokens -> images: what `sample --reconstruct` shows."""
        net = modules["vqvae"].eval()
        device = next(net.parameters()).device
        return net.decode(net.encode(images.to(device))).cpu()

    def inference_modules(self) -> tuple[str, ...]:
        return ("vqvae",)

    def describe(self, config: VQVAEConfig, test: dict[str, float]) -> str:
        summary = f"tokenizer, {config.codebook_size} codes"
        if config.scales:
            summary += f" over scales {','.join(map(str, config.scales))}"
        if "psnr_db" in test:  # how well it reconstructs held-out images
            summary += f", test PSNR {test['psnr_db']:.1f} dB, {test['codebook_usage']:.0%} of codes used"
        return summary
