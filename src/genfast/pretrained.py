"""Loading a checkpoint into a sampler, and the small models shipped in the package.

Shipped models live in `genfast/models/NAME.safetensors`, named
`<variant>-<data set>` (`gan-fashion-mnist`, `cgan-mnist`, ...). They are slim:
only the modules a sampler needs, stored in fp16 to keep the package light, and
loaded back as fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genfast import checkpoint, data, images, memory
from genfast import config as configlib
from genfast.devices import resolve_device
from genfast.errors import GenfastError
from genfast.families import Sampler, get_family
from genfast.families.base import Family, check_bounds, class_index


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


def build(family: Family, config, device: str | torch.device = "cpu",
          states: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.nn.Module]:
    """The networks of `config`, built only once they are known to fit: the config within
    its bounds, a skeleton on the meta device (shapes, no memory) within the machine's
    memory and, when `states` (a checkpoint's weights) are given, of exactly their shapes
    and kinds. So a stranger's header costs nothing before it is refused, and a file's
    weights cost what the file does."""
    check_bounds(config)
    try:
        with torch.device("meta"):
            skeleton = family.build(config)
    except (RuntimeError, ValueError, OverflowError, TypeError) as e:  # sizes torch cannot lay out
        raise GenfastError(f"a {family.name} of this config cannot be built ({str(e).splitlines()[0][:120]}); "
                           f"the file is damaged or was edited, or the sizes are too large") from None
    if states is not None:  # a file's weights: they must be what the config builds
        _check_weights(skeleton, states)
    needed = sum(t.numel() * t.element_size() for m in skeleton.values() for t in m.state_dict().values())
    available = memory.available_bytes()
    if available is not None and needed > available:
        raise GenfastError(f"this {family.name} config needs {needed / 2**30:.1f} GiB for its weights alone; "
                           f"this machine has {available / 2**30:.1f} GiB available: choose smaller sizes")
    return {name: module.to(device) for name, module in family.build(config).items()}


def _check_weights(skeleton: dict[str, torch.nn.Module], states: dict[str, dict[str, torch.Tensor]]) -> None:
    """A checkpoint's weights against what the config builds: the same tensors, shapes and
    kinds (floating-point where the network has floating point), and finite."""
    for name, state in states.items():
        if name not in skeleton:
            raise GenfastError(f"checkpoint holds weights of a '{name}' network its family does not have; "
                               f"the file is damaged or was edited")
        expected = skeleton[name].state_dict()
        if missing := sorted(set(expected) - set(state)) or sorted(set(state) - set(expected)):
            raise GenfastError(f"checkpoint weights do not fit its config ('{name}.{missing[0]}' is missing or "
                               f"extra); the file is damaged or was edited")
        for key, tensor in state.items():
            want = expected[key]
            if tensor.shape != want.shape:
                raise GenfastError(f"checkpoint weights do not fit its config ('{name}.{key}' is "
                                   f"{tuple(tensor.shape)}, the config builds {tuple(want.shape)}); the file is "
                                   f"damaged or was edited")
            if want.is_floating_point() and not tensor.is_floating_point():
                raise GenfastError(f"checkpoint weight '{name}.{key}' is {tensor.dtype}, not floating point; "
                                   f"the file is damaged or was edited")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise GenfastError(f"checkpoint weight '{name}.{key}' holds NaN or infinite values: the run "
                                   f"diverged before it was saved, or the file is damaged; use an earlier checkpoint")


def load_weights(modules: dict[str, torch.nn.Module], states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load each module's state (checked by `build` already); a missing module is one clear error."""
    for name, module in modules.items():
        if name not in states:
            raise GenfastError(f"checkpoint lacks the '{name}' weights; it is incomplete, retrain it")
        module.load_state_dict(states[name])


def class_names_of(ckpt: checkpoint.Checkpoint, config) -> tuple[str, ...]:
    """The header's class names, believed only when they are text and as many as the model has classes."""
    names = ckpt.dataset.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and len(n) <= 200 for n in names):
        raise GenfastError("checkpoint has a damaged header (field 'dataset.class_names': a list of names "
                           "wanted); the file is damaged or was edited")
    if config.num_classes and len(names) != config.num_classes:
        raise GenfastError(f"checkpoint names {len(names)} classes for a model of {config.num_classes}; the file "
                           f"is damaged or was edited")
    return tuple(names)


def load_modules(ckpt: checkpoint.Checkpoint, device: str | torch.device = "cpu"):
    """Rebuild a checkpoint's family, config and the networks it holds (the inference ones at least)."""
    family = get_family(ckpt.family)
    config = configlib.from_dict(family.config_class, ckpt.config)
    modules = build(family, config, device, ckpt.modules)
    modules = {name: module for name, module in modules.items()
               if name in ckpt.modules or name in family.inference_modules()}
    load_weights(modules, ckpt.modules)
    return family, config, modules


def with_sampling(family: Family, config, settings: dict):
    """`config` with sampling `settings` (the family's `sampling_keys`, values or their text)
    applied and checked; any other key is one line naming the keys the family takes."""
    allowed = family.sampling_keys
    if unknown := [key for key in settings if key not in allowed]:
        raise GenfastError(f"{', '.join(unknown)} do(es) not apply to a {family.name} model"
                           + (f"; it takes {', '.join(allowed)}" if allowed else ""))
    config = configlib.override(config, settings)
    family.check_sampling(config)
    return config


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
    config = with_sampling(family, config, {key: value for key, value in settings.items() if value is not None})
    sampler = family.sampler(modules, config, class_names_of(ckpt, config))
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
    index = None if class_name is None else class_index(class_names_of(ckpt, config), class_name)
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


def slim(src: Path, dst: Path, half: bool = True, pairs: list[str] = ()) -> Path:
    """Write an inference-only copy of a training checkpoint (no optimizer, no discriminator).

    `pairs` ("key=value", as on a command line) set the copy's own sampling settings
    (the family's `sampling_keys`, what genfast.load(**settings) would change): the defaults
    its users get, chosen after training, with the weights untouched."""
    ckpt = checkpoint.load(src)
    family = get_family(ckpt.family)
    if settings := configlib.parse_pairs(list(pairs)):
        config = with_sampling(family, configlib.from_dict(family.config_class, ckpt.config), settings)
        ckpt.config = configlib.to_dict(config)
        ckpt.extra["set_by_slim"] = settings  # so the header says which settings training did not choose
    ckpt.modules = {n: s for n, s in ckpt.modules.items() if n in family.inference_modules()}
    ckpt.optimizers = {}
    checkpoint.save(ckpt, dst, half=half)
    return dst
