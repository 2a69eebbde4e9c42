"""Loading a checkpoint into a sampler, and the small models shipped in the package.

Shipped models live in `genfast/models/NAME.safetensors`, named
`<variant>-<data set>` (`gan-fashion-mnist`, `cgan-mnist`, ...). They are slim:
only the modules a sampler needs, stored in fp16 to keep the package light, and
loaded back as fp32.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from genfast import checkpoint, config as configlib
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import Sampler, get_family


def models_dir() -> Path:
    return Path(str(resources.files("genfast") / "models"))


def shipped(generative: bool | None = None) -> dict[str, Path]:
    """Name -> path of every shipped checkpoint, sorted by name; `generative` filters
    to the image generators (True) or to the classifiers (False)."""
    models = {p.name.removesuffix(".safetensors"): p for p in sorted(models_dir().glob("*.safetensors"))}
    if generative is None:
        return models
    return {name: path for name, path in models.items()
            if get_family(checkpoint.read_header(path)["family"]).generative == generative}


def resolve(name_or_path: str | Path) -> Path:
    """A shipped model's name or a checkpoint path -> the file to read."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    models = shipped()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    if path.suffix or path.parent != Path("."):
        raise GenfastError(f"checkpoint {path} not found")
    raise GenfastError(f"'{name_or_path}' is neither a checkpoint file nor a shipped model; "
                       f"shipped models: {', '.join(models) or 'none'} (see 'genfast models')")


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
    path = resolve(name_or_path)
    ckpt = checkpoint.load(path)
    family, config, modules = load_modules(ckpt, resolve_device(device))
    if not family.generative:
        raise GenfastError(f"{name_or_path} is a {family.name}, which does not generate images; "
                           f"give a gan, vae or ar checkpoint")
    settings = {key: value for key, value in settings.items() if value is not None}
    allowed = getattr(family, "sampling_keys", ())
    if unknown := [key for key in settings if key not in allowed]:
        raise GenfastError(f"{', '.join(unknown)} do(es) not apply to a {family.name} model"
                           + (f"; it takes {', '.join(allowed)}" if allowed else ""))
    config = configlib.override(config, settings)
    if hasattr(family, "check_sampling"):
        family.check_sampling(config)
    sampler = family.sampler(modules, config, tuple(ckpt.dataset.get("class_names", ())))
    sampler.info = {"family": ckpt.family, "model": family.model_name(config), "dataset": ckpt.dataset["name"],
                    "step": ckpt.step, "path": str(path)}
    return sampler


def slim(src: Path, dst: Path, half: bool = True) -> Path:
    """Write an inference-only copy of a training checkpoint (no optimizer, no discriminator)."""
    ckpt = checkpoint.load(src)
    family = get_family(ckpt.family)
    ckpt.modules = {n: s for n, s in ckpt.modules.items() if n in family.inference_modules()}
    ckpt.optimizers = {}
    checkpoint.save(ckpt, dst, half=half)
    return dst
