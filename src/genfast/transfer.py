"""Style transfer (`genfast transfer`): keep an image's style, change what it shows.

Two kinds of model do it, each in its own way:

- **A CVAE** (family `vae`, conditional; Sohn et al., 2015). Its encoder's posterior mean
  of an image under the image's own class is what the class does not say: its style
  (stroke, slant, brightness, size). Decoded under another class, it is that style in
  the other class. The image's own class, which the encoder needs, is the one under which
  the CVAE explains the image best (the lowest negative ELBO: the model as its own
  classifier), unless it is known (the samples of a model of the same classes).
- **A token model** (family `ar`): the checkpoint's VQ-VAE encodes the image into its grid
  of tokens, and the model re-generates the grid under the new condition, a class or a
  prompt, keeping a share of the source's tokens that `strength` sets (as in SDEdit, Meng
  et al., 2022: 0 is the tokenizer's round trip of the image, 1 a plain sample, image i of
  `genfast sample` for that condition and seed, whatever the source: noise row i is source
  i's). What is kept is what agrees with the target, on both kinds of token model:
  - a causal model decodes the whole grid in raster order with each source token's
    probability multiplied by strength ** -FAVOUR_POWER (decoders.favoured_kv): the source's
    token stays wherever the target finds it likely enough, and is re-made where it does not.
    (Keeping a raster prefix instead, the first (1 - strength) of the tokens, keeps the top
    of the source whatever it shows, and reached a worse balance of target and style at
    every strength: BENCHMARKS.md, "Style transfer".)
  - a masked (MaskGIT) model keeps the (1 - strength) share of the source's tokens that it
    finds most likely under the new condition and fills the other positions in its usual
    steps (decoders.continue_parallel).
  - a next-scale (VAR) model favours the source's tokens as the causal model does, scale
    by scale, coarse to fine (decoders.favoured_scales): a coarse token the target does not
    find likely is re-made, and the finer scales are drawn over the new coarse layout.

Sources are image files (of the model's size, `images.read_image`), folders of them, or a
model's own samples (what `genfast sample MODEL -n N --seed S` writes, in its PNG pixels).
Everything is checked before any work, so a bad input is one line and writes nothing.
The quality of both kinds is measured by benchmarks/transfer_quality.py (BENCHMARKS.md,
"Style transfer").
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from genfast import checkpoint, images, pretrained
from genfast import config as configlib
from genfast.data import IMAGE_SUFFIXES
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import Sampler, get_family
from genfast.families.ar import decoders
from genfast.families.ar.family import options_of
from genfast.families.vae import kl_to_standard_normal, reconstruction_nll, to_pixels

# How a token model re-generates unless told otherwise, chosen by measurement (BENCHMARKS.md,
# "Style transfer": the target's accuracy against the style kept, at every strength), per objective,
# since the two keep tokens in different ways (module docstring); and classifier-free guidance,
# which pulls the new tokens to the target against the context of the kept ones (without it, the
# kept ones decide the class).
DEFAULT_STRENGTH = {"causal": 0.4, "masked": 0.7, "scales": 0.45}
# A causal or next-scale model's favour of the source's tokens at strength s is s ** -FAVOUR_POWER: 10
# spreads the useful range (favours of ~10 to ~1e7, BENCHMARKS.md) over strengths 0.2 to 0.8.
FAVOUR_POWER = 10
DEFAULT_CFG = 5.0
# A token model transfers with constant guidance and one temperature at every scale, whatever
# its header sets for sampling (a next-scale model's cfg_schedule and last_scale_temperature):
# guidance ramped up from 1 would leave the coarse scales, where the class is decided, without
# the target's pull, and the strengths above were measured without either.
TRANSFER_SAMPLING = {"cfg_schedule": "constant", "last_scale_temperature": None}
DEFAULT_SAMPLES = 10  # sources taken from a model, unless -n says how many
CHECKPOINT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Target:
    """What the sources are to become: a class, or a text model's prompt."""

    label: str                 # the class's name or the prompt, as the user gave it
    condition: torch.Tensor    # the model's condition for one image: a class index (), or a prompt embedding (D,)
    class_index: int | None    # the class it is (None for a prompt)


@dataclass
class Sources:
    """The images to transfer, as uint8 pixels (N, C, H, W), and where they came from."""

    pixels: torch.Tensor
    names: list[str]                  # for output files: a file's stem, or "sample-000003"
    origins: list[str]                # for --json: the file, or "sample 3 of MODEL, seed S"
    labels: torch.Tensor | None = None  # their classes, where known (a conditional model's samples)


@dataclass
class Result:
    sources: Sources
    targets: list[Target]
    images: torch.Tensor              # (N, T, C, H, W) in [-1, 1]: source i under target j
    source_classes: list[str] | None  # the class each source was read as (CVAE), else None
    strength: float | None            # token models: how much was re-generated
    seed: int


class Transfer(ABC):
    """A checkpoint loaded for style transfer: its sampler (classes, prompts, noise, own
    samples) and the networks the transfer runs."""

    def __init__(self, name: str, dataset: str, config, modules: dict[str, torch.nn.Module], sampler: Sampler):
        self.name, self.dataset, self.config, self.modules, self.sampler = name, dataset, config, modules, sampler

    def targets(self, wanted: list[str]) -> list[Target]:
        """--to values -> targets: class names or indices, several joined by commas allowed."""
        names = self.sampler.class_names
        indices = [self.sampler.class_index(item.strip()) for value in wanted for item in value.split(",")]
        return [Target(names[i], torch.tensor(i), i) for i in indices]

    @abstractmethod
    def checked_strength(self, strength: float | None) -> float | None:
        """The strength the transfer runs at, given --strength (None: not given), or None for a
        model that takes none."""

    @abstractmethod
    def apply(self, pixels: torch.Tensor, labels: torch.Tensor | None, targets: list[Target], strength: float | None,
              seed: int, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of sources (uint8; sources start.. of the job) at a checked strength -> (its
        images under each target (B, T, C, H, W), the class each source was read as, or None)."""

    def run(self, sources: Sources, targets: list[Target], strength: float | None = None, seed: int = 0,
            batch_size: int = 256) -> Result:
        """Every source under every target, a batch of sources at a time."""
        strength = self.checked_strength(strength)
        made, classes = [], []
        for start in range(0, len(sources.pixels), batch_size):
            labels = None if sources.labels is None else sources.labels[start:start + batch_size]
            batch, read_as = self.apply(sources.pixels[start:start + batch_size], labels, targets, strength, seed,
                                        start)
            made.append(batch.cpu())
            classes += [] if read_as is None else [self.sampler.class_names[i] for i in read_as.tolist()]
        return Result(sources, targets, torch.cat(made), classes or None, strength, seed)


class LatentTransfer(Transfer):
    """A CVAE: the posterior mean under the source's class, decoded under the target's."""

    def checked_strength(self, strength: float | None) -> None:
        if strength is not None:
            raise GenfastError(f"--strength is how much of a token model's grid is re-generated; {self.name} is a "
                               "CVAE, which keeps the whole latent: drop --strength")

    @torch.inference_mode()
    def apply(self, pixels, labels, targets, strength, seed, start):
        encoder, decoder = self.modules["encoder"].eval(), self.modules["decoder"].eval()
        x = images.to_float(pixels).to(self.sampler.device)
        labels = self.own_classes(x) if labels is None else labels.to(x.device)
        style, _ = encoder(x, labels)
        made = [to_pixels(decoder(style, target.condition.to(x.device).expand(len(x))), self.config.likelihood)
                for target in targets]
        return torch.stack(made, 1), labels.cpu()

    def own_classes(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's class as the CVAE explains it best: the lowest negative ELBO, at the
        posterior mean (no sampling, so the same images always read the same)."""
        classes = self.sampler.num_classes
        rows = x.repeat_interleave(classes, 0)
        labels = torch.arange(classes, device=x.device).repeat(len(x))
        mean, logvar = self.modules["encoder"](rows, labels)
        decoded = self.modules["decoder"](mean, labels)
        negative_elbo = reconstruction_nll(decoded, rows, self.config) + kl_to_standard_normal(mean, logvar)
        return negative_elbo.view(len(x), classes).argmin(1)


class TokenTransfer(Transfer):
    """A token model: the source's tokens, (1 - strength) of them kept, the rest re-generated."""

    def __init__(self, *args):
        super().__init__(*args)
        self.tokenizer, self.net = self.modules["tokenizer"].eval(), self.modules["gpt"].eval()
        self.options = options_of(self.config)

    def targets(self, wanted: list[str]) -> list[Target]:
        if not self.config.text:
            return super().targets(wanted)
        for prompt in wanted:  # an empty prompt would be the unconditional model: no target at all
            if not prompt.strip():
                raise GenfastError(f"--to {prompt!r} is an empty prompt; say what the images should become "
                                   "(e.g. --to \"a sandal\")")
        return [Target(prompt, self.sampler.prompt_condition(prompt, 1)[0], None) for prompt in wanted]

    def checked_strength(self, strength: float | None) -> float:
        if strength is None:
            return DEFAULT_STRENGTH[self.config.objective]
        if not 0 <= strength <= 1:  # written so, NaN fails too
            raise GenfastError(f"--strength is how much of the grid is re-generated, from 0 (the source's own tokens) "
                               f"to 1 (a new image); got {strength:g}")
        return strength

    @torch.inference_mode()
    def apply(self, pixels, labels, targets, strength, seed, start):
        device = self.sampler.device
        tokens = self.tokenizer.encode(images.to_float(pixels).to(device))
        # Gaussian noise -> uniforms, as the sampler draws them: row i is image start + i of the seed.
        uniforms = torch.special.ndtr(self.sampler.noise(len(tokens), seed, start).to(device))
        made = []
        for target in targets:
            prefix = self.net.prefix(target.condition.to(device).expand(len(tokens), *target.condition.shape))
            made.append(self.tokenizer.decode(self.remake(prefix, tokens, strength, uniforms)))
        return torch.stack(made, 1), None

    def remake(self, prefix: torch.Tensor, tokens: torch.Tensor, strength: float,
               uniforms: torch.Tensor) -> torch.Tensor:
        """`tokens` re-generated under `prefix` at `strength` (module docstring)."""
        if strength == 0:  # the source itself (a causal model's favour would be infinite)
            return tokens
        network = decoders.Network(self.net, tokenizer=self.tokenizer)
        favoured = {"causal": decoders.favoured_kv, "scales": decoders.favoured_scales}.get(self.config.objective)
        if favoured is not None:
            return favoured(network, prefix, tokens, strength ** -FAVOUR_POWER, uniforms, self.options)[0]
        kept = round((1 - strength) * self.net.sequence_length)
        masked = ~self.likely_positions(prefix, tokens, kept)
        return decoders.continue_parallel(network, prefix, tokens, masked, uniforms, self.options)[0]

    def likely_positions(self, prefix: torch.Tensor, tokens: torch.Tensor, kept: int) -> torch.Tensor:
        """(B, T) True at the `kept` positions whose source token the masked model finds most
        likely under the new condition, every position masked (the condition's say alone)."""
        logits = self.net(prefix, torch.full_like(tokens, self.net.mask_token))[:, self.net.prefix_tokens:]
        likelihood = logits.log_softmax(-1).gather(2, tokens[..., None]).squeeze(2)
        best = likelihood.argsort(1, descending=True)[:, :kept]
        return torch.zeros_like(tokens, dtype=torch.bool).scatter(1, best, True)


KINDS: dict[str, type[Transfer]] = {"vae": LatentTransfer, "ar": TokenTransfer}


def load(name_or_path: str | Path, device: str = "cpu", cfg: float | None = None) -> Transfer:
    """A shipped model's name or a checkpoint -> its transfer (a token model's guidance: `cfg`,
    else DEFAULT_CFG); a model that cannot transfer (unconditional, or of a family without an
    encoder) is one line saying which can."""
    path = checkpoint.resolve(name_or_path)
    ckpt = checkpoint.load(path)
    family = get_family(ckpt.family)
    if ckpt.family not in KINDS:
        raise GenfastError(f"{name_or_path} is a {ckpt.family} model, which cannot read an image's style; give a CVAE "
                           "(cvae-...) or a token model (ar-..., ar-text-..., maskgit-text-..., var-...)")
    config = configlib.from_dict(family.config_class, ckpt.config)
    if not config.conditional:
        raise GenfastError(f"{name_or_path} is an unconditional {family.model_name(config)}: there is no other "
                           "class or prompt to decode an image under; give a conditional model (cvae-..., ar-..., "
                           "ar-text-..., var-...)")
    if ckpt.family == "ar":
        config = dataclasses.replace(configlib.override(config, {"cfg": DEFAULT_CFG if cfg is None else cfg}),
                                     **TRANSFER_SAMPLING)
        family.check_sampling(config)
    elif cfg is not None:
        raise GenfastError(f"--cfg (classifier-free guidance) applies to token models; {name_or_path} is a CVAE")
    _, _, modules = pretrained.load_modules(ckpt, resolve_device(device))
    sampler = family.sampler(modules, config, pretrained.class_names_of(ckpt, config))
    return KINDS[ckpt.family](str(name_or_path), ckpt.dataset["name"], config, modules, sampler)


def read_sources(inputs: list[str], model: Transfer, n: int | None = None, seed: int = 0) -> Sources:
    """Image files, folders of them and models (their own samples: n each, of `seed`) -> the
    sources, checked against what `model` takes; no input at all: the model's own samples."""
    if n is not None and not any(_names_a_model(text) for text in inputs or [model.name]):
        raise GenfastError("-n is the number of a model's samples to transfer; the sources given are image files, "
                           "which are all transferred: drop -n")
    parts = [_model_samples(text, model, n or DEFAULT_SAMPLES, seed) if _names_a_model(text) else _files(text, model)
             for text in inputs or [model.name]]
    labelled = all(part.labels is not None for part in parts)
    return Sources(torch.cat([part.pixels for part in parts]), _unique([name for p in parts for name in p.names]),
                   [origin for part in parts for origin in part.origins],
                   torch.cat([part.labels for part in parts]) if labelled else None)


def _names_a_model(text: str) -> bool:
    """A source that names a model rather than images: a checkpoint file, or a shipped name."""
    path = Path(text)
    if path.exists():
        return path.is_file() and path.suffix == CHECKPOINT_SUFFIX
    if text in checkpoint.shipped_paths() or path.suffix == CHECKPOINT_SUFFIX:
        return True
    raise GenfastError(f"{text}: no such file or folder, nor a shipped model; give PNG files, folders of them, or a "
                       "model (see 'genfast models')")


def _files(text: str, model: Transfer) -> Sources:
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise GenfastError(f"folder {path} holds no PNG or JPEG images; give a folder of the images to transfer")
    else:
        files = [path]
    pixels = torch.stack([images.read_image(file, model.sampler.image_shape) for file in files])
    return Sources(pixels, [file.stem for file in files], [str(file) for file in files])


def _model_samples(text: str, model: Transfer, n: int, seed: int) -> Sources:
    """n samples of a model, as `genfast sample` writes them (in PNG pixels), with their
    classes where the model has the transferring model's classes."""
    source = pretrained.load(text, device=str(model.sampler.device))
    if source.info["dataset"] != model.dataset or source.image_shape != model.sampler.image_shape:
        raise GenfastError(f"{text} makes images of {source.info['dataset']}, and {model.name} was trained on "
                           f"{model.dataset}; give sources of {model.dataset} (files, or one of its models)")
    pixels = images.to_uint8(source.generate(n, seed))
    labels = source.labels(n) if source.class_names == model.sampler.class_names else None
    return Sources(pixels, [f"sample-{i:06d}" for i in range(n)], [f"sample {i} of {text}, seed {seed}"
                                                                   for i in range(n)], labels)


def _unique(names: list[str]) -> list[str]:
    """Names made distinct (a second "a" becomes "a-2"), so no output file overwrites another."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _slug(label: str) -> str:
    """A target's label as part of a file name: letters, digits and dashes."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")[:60] or "target"


def save_grid(result: Result, path: Path) -> None:
    """One PNG: a row per source, the source in the first column, then one column per target."""
    sources = images.to_float(result.sources.pixels)[:, None]
    images.save_grid(torch.cat([sources, result.images], 1).flatten(0, 1), path, nrow=1 + len(result.targets))


def save_folder(result: Result, folder: Path) -> list[list[Path]]:
    """One PNG per output, source i under target j at folder/<source>-to-<target>.png; their paths."""
    targets = _unique([_slug(target.label) for target in result.targets])
    paths = [[folder / f"{source}-to-{target}.png" for target in targets] for source in result.sources.names]
    images.save_each(images.to_uint8(result.images.flatten(0, 1)), [path for row in paths for path in row])
    return paths


def listing(result: Result, model: Transfer, grid_path: Path | None, paths: list[list[Path]] | None) -> dict:
    """What was made, for --json: the model, the settings, each target, and per source its
    origin, the class it was read as (CVAE) and its outputs (files, or cells of the grid)."""
    sources = []
    for i, origin in enumerate(result.sources.origins):
        entry = {"source": origin, "outputs": [str(p) for p in paths[i]] if paths else
                 [{"row": i, "column": 1 + j} for j in range(len(result.targets))]}
        if result.source_classes:
            entry["read_as"] = result.source_classes[i]
        sources.append(entry)
    return {"model": model.name, "dataset": model.dataset, "strength": result.strength, "seed": result.seed,
            "targets": [{"to": target.label, "class": target.class_index} for target in result.targets],
            "grid": str(grid_path) if grid_path else None, "sources": sources}
