"""Loading a checkpoint into a sampler, and the small models shipped in the package.

Shipped models live in `genfast/models/NAME.safetensors`, named
`<variant>-<data set>` (`gan-fashion-mnist`, `cgan-mnist`, ...). They are slim:
only the modules a sampler needs, stored in fp16 to keep the package light, and
loaded back as fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genfast import checkpoint, data, images
from genfast import config as configlib
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import Sampler, get_family
from genfast.families.base import class_index


def shipped(generative: bool | None = None) -> dict[str, Path]:
    """Name -> path of every shipped checkpoint, sorted by name; `generative` filters
    to the image generators (True) or to the others (False: classifiers, tokenizers)."""
    models = checkpoint.shipped_paths()
    if generative is None:
        return models
    return {name: path for name, path in models.items()
            if get_family(checkpoint.read_header(path)["family"]).generative == generative}


def describe(name_or_path: str | Path) -> str:
    """One line for `genfast models`: family, data set, what it is, step, size (header only)."""
    path = checkpoint.resolve(name_or_path)
    header = checkpoint.read_header(path)
    family = get_family(header["family"])
    summary = family.describe(configlib.from_dict(family.config_class, header["config"]),
                              header["extra"].get("test", {}))
    return (f"{header['family']}\t{header['dataset']['name']}\t{summary}\tstep {header['step']}"
            f"\t{path.stat().st_size / 1e6:.1f} MB")


def load_weights(modules: dict[str, torch.nn.Module], states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load each module's state; a missing module or a shape that does not fit is one clear error."""
    for name, module in modules.items():
        if name not in states:
            raise GenfastError(f"checkpoint lacks the '{name}' weights; it is incomplete, retrain it")
        try:
            module.load_state_dict(states[name])
        except RuntimeError as e:
            raise GenfastError(f"checkpoint weights do not fit its config ({str(e).splitlines()[0]}); "
                               f"the file is damaged or was edited") from None


def load_modules(ckpt: checkpoint.Checkpoint, device: str | torch.device = "cpu"):
    """Rebuild a checkpoint's family, config and the networks it holds (the inference ones at least)."""
    family = get_family(ckpt.family)
    config = configlib.from_dict(family.config_class, ckpt.config)
    modules = {name: module for name, module in family.build(config).items()
               if name in ckpt.modules or name in family.inference_modules()}
    load_weights(modules, ckpt.modules)
    return family, config, {name: module.to(device) for name, module in modules.items()}


def load(name_or_path: str | Path, device: str = "cpu", **settings) -> Sampler:
    """A shipped model's name or a checkpoint path -> its eager fp32 sampler on `device`.

    `settings` change how the family samples (its `sampling_keys`: for ar, decode, cfg,
    temperature, ...); None leaves the checkpoint's own value."""
    path = checkpoint.resolve(name_or_path)
    ckpt = checkpoint.load(path)
    family, config, modules = load_modules(ckpt, resolve_device(device))
    if not family.generative:
        raise GenfastError(f"{name_or_path} is a {family.name}, which does not generate images; "
                           f"give a gan, vae or ar checkpoint")
    settings = {key: value for key, value in settings.items() if value is not None}
    allowed = family.sampling_keys
    if unknown := [key for key in settings if key not in allowed]:
        raise GenfastError(f"{', '.join(unknown)} do(es) not apply to a {family.name} model"
                           + (f"; it takes {', '.join(allowed)}" if allowed else ""))
    config = configlib.override(config, settings)
    family.check_sampling(config)
    sampler = family.sampler(modules, config, tuple(ckpt.dataset.get("class_names", ())))
    sampler.info = {"family": ckpt.family, "model": family.model_name(config), "dataset": ckpt.dataset["name"],
                    "step": ckpt.step, "path": str(path)}
    return sampler


def reconstructions(name_or_path: str | Path, n: int, seed: int = 0, class_name: str | int | None = None,
                    device: str = "cpu") -> torch.Tensor:
    """n real test images (of one class, if given), picked by `seed`, each row of ten followed
    by a row of their reconstructions through the model's encoder (vae, vqvae): what
    `sample --reconstruct` shows. Needs the model's data set."""
    ckpt = checkpoint.load(name_or_path)
    family, config, modules = load_modules(ckpt, resolve_device(device))
    if not family.reconstructs:
        raise GenfastError(f"--reconstruct needs a model with an encoder (vae, vqvae); {name_or_path} is a "
                           f"{family.name}")
    index = None if class_name is None else class_index(tuple(ckpt.dataset.get("class_names", ())), class_name)
    test = data.load(ckpt.dataset["name"], "test", image_size=config.image_size, channels=config.channels)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    if index is not None:
        pick = pick[test.labels[pick] == index]
    pick = pick[:n]
    originals = images.to_float(test.images[pick])
    rebuilt = family.reconstruct(modules, config, originals, test.labels[pick])
    # Pad to whole rows of ten (blank tiles), so originals and reconstructions always alternate by row.
    blank = torch.full((-len(pick) % 10, *originals.shape[1:]), -1.0)
    originals, rebuilt = torch.cat([originals, blank]), torch.cat([rebuilt, blank])
    return torch.cat([t for start in range(0, len(originals), 10)
                      for t in (originals[start:start + 10], rebuilt[start:start + 10])])


def slim(src: Path, dst: Path, half: bool = True) -> Path:
    """Write an inference-only copy of a training checkpoint (no optimizer, no discriminator)."""
    ckpt = checkpoint.load(src)
    family = get_family(ckpt.family)
    ckpt.modules = {n: s for n, s in ckpt.modules.items() if n in family.inference_modules()}
    ckpt.optimizers = {}
    checkpoint.save(ckpt, dst, half=half)
    return dst
