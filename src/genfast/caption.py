"""`genfast caption`: images in, one caption each out, written by a captioner (families/captioner.py).

The images are PNG or JPEG files, a folder of them, or a generator (a shipped name or a checkpoint)
whose own samples are captioned, so that a user can read what a generator makes: `-n` samples of
`--seed`, as `genfast sample` makes them (a conditional model's cycle through its classes, a text
model's `--prompt`), each shown beside what it was asked for.

The captioner is `--model`, or the shipped `captioner-<data set>` of the generator's data set; image
files are captioned by the default data set's (captioner-fashion-mnist) unless told otherwise. A
captioner reads images of its own data set and size only: a generator of another data set, or a file
of another size, is one line saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from genfast import checkpoint, images, pretrained
from genfast.data import IMAGE_SUFFIXES
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families.captioner import Captioner, CaptionerConfig
from genfast.train import DEFAULT_DATA

DEFAULT_SAMPLES = 10  # a generator's samples captioned when -n is not given


@dataclass
class Captioned:
    """One image's caption: the image's name (its file, or sample-NNNNNN), what a generator's sample was
    asked for (its class or prompt; None for a file or an unconditional model's sample), the caption."""

    image: str
    asked: str | None
    caption: str


@dataclass
class LoadedCaptioner:
    name: str
    family: Captioner
    config: CaptionerConfig
    modules: dict[str, torch.nn.Module]

    @property
    def dataset(self) -> str:
        return self.config.dataset

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def caption(self, pixels: torch.Tensor, temperature: float = 0.0, seed: int = 0,
                batch_size: int = 256) -> list[str]:
        """uint8 images (N, C, H, W) -> their captions (greedy, or drawn at `temperature` by `seed`)."""
        generator = torch.Generator().manual_seed(seed)
        return self.family.caption(self.modules, self.config, images.to_float(pixels), temperature, generator,
                                   batch_size)


def load_captioner(name_or_path: str | Path, device: str = "cpu") -> LoadedCaptioner:
    ckpt = checkpoint.load(name_or_path)
    family, config, modules = pretrained.load_modules(ckpt, resolve_device(device))
    if not isinstance(family, Captioner):
        raise GenfastError(f"{name_or_path} is a {ckpt.family} model, not a captioner; give a captioner "
                           f"(captioner-fashion-mnist, captioner-mnist, or one trained with 'genfast train captioner')")
    return LoadedCaptioner(str(name_or_path), family, config, modules)


def default_captioner(dataset: str) -> str:
    """The shipped captioner of a data set."""
    name = f"captioner-{dataset}"
    if name not in checkpoint.shipped_paths():
        raise GenfastError(f"no shipped captioner reads {dataset} images; train one with 'genfast train captioner "
                           f"--data {dataset} --out DIR' and pass --model DIR/checkpoint.safetensors")
    return name


def image_files(source: str) -> list[Path] | None:
    """The image files a source names (a file, or a folder's PNG and JPEG files, sorted), or None when
    it names a model (a checkpoint file or a shipped name)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise GenfastError(f"folder {path} holds no PNG or JPEG images; give a folder of the images to caption")
        return files
    if path.is_file():
        return None if path.suffix == ".safetensors" else [path]
    if source in checkpoint.shipped_paths() or path.suffix == ".safetensors":
        return None
    raise GenfastError(f"{source}: no such file or folder, nor a shipped model; give a PNG file, a folder of them, "
                       "or a generator (see 'genfast models')")


def caption(source: str, n: int | None = None, seed: int = 0, model: str | None = None, prompt: str | None = None,
            temperature: float = 0.0, device: str = "cpu", batch_size: int = 256) -> list[Captioned]:
    """The captions of what `source` names (module docstring), in order."""
    if not temperature >= 0:  # so written, NaN fails too
        raise GenfastError(f"--temperature must be 0 (the likeliest caption) or more, got {temperature:g}")
    files = image_files(source)
    if files is not None:
        if n is not None or prompt is not None:
            raise GenfastError("-n and --prompt choose a generator's samples; image files are all captioned as "
                               "they are: drop them")
        captioner = load_captioner(model or default_captioner(DEFAULT_DATA), device)
        pixels = torch.stack([images.read_image(file, captioner.image_shape) for file in files])
        return [Captioned(str(file), None, text)
                for file, text in zip(files, captioner.caption(pixels, temperature, seed, batch_size))]
    return _samples(source, n or DEFAULT_SAMPLES, seed, model, prompt, temperature, device, batch_size)


def _samples(source: str, n: int, seed: int, model: str | None, prompt: str | None, temperature: float,
             device: str, batch_size: int) -> list[Captioned]:
    """A generator's first n samples of `seed` (of `prompt`), each with its caption and what it was asked for."""
    sampler = pretrained.load(source, device=device)
    dataset = sampler.info["dataset"]
    captioner = load_captioner(model or default_captioner(dataset), device)
    if captioner.dataset != dataset or captioner.image_shape != sampler.image_shape:
        raise GenfastError(f"{source} makes {dataset} images, and the captioner {captioner.name} reads "
                           f"{captioner.dataset} images; give a captioner of {dataset} (--model)")
    condition = None if prompt is None else sampler.prompt_condition(prompt, n)
    pixels = images.to_uint8(sampler.generate(n, seed, batch_size=batch_size, condition=condition))
    if prompt is not None:
        asked = [prompt] * n
    elif sampler.conditional:
        asked = [sampler.class_names[label] for label in sampler.labels(n).tolist()]
    else:
        asked = [None] * n
    texts = captioner.caption(pixels, temperature, seed, batch_size)
    return [Captioned(f"sample-{i:06d}", what, text) for i, (what, text) in enumerate(zip(asked, texts))]
