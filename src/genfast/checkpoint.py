"""Checkpoints: safetensors weights plus a JSON header, written atomically.

A file holds flat tensors named `model.<module>.<param>` and, for training
checkpoints, `optim.<module>.<index>.<key>` (Adam's moments and step counts).
Everything else (family, config, data set, step, optimizer hyperparameters) is one
JSON document in the safetensors metadata under the key "genfast". Loading never
unpickles, so a checkpoint from a stranger cannot run code.

Wherever a checkpoint is read, a shipped model's name (`gan-fashion-mnist`, the files
in `genfast/models/`) works as well as a path: `resolve` is the one place that decides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from genfast.errors import GenfastError
from genfast.fileio import atomic_path

FORMAT = "genfast-checkpoint"
FORMAT_VERSION = 1
HEADER_FIELDS = {"family": str, "config": dict, "dataset": dict, "step": int, "optimizers": dict, "extra": dict}


@dataclass
class Checkpoint:
    """What a checkpoint file holds, as Python objects."""

    family: str
    config: dict[str, Any]
    dataset: dict[str, Any]  # name, class_names, image_shape
    step: int
    modules: dict[str, dict[str, torch.Tensor]]  # module name -> state_dict
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name -> optimizer state_dict
    extra: dict[str, Any] = field(default_factory=dict)  # free JSON: training options, timings, ...

    @property
    def inference_only(self) -> bool:
        return not self.optimizers


def _flatten_optimizer(name: str, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move an optimizer state_dict's tensors into `tensors`; return the JSON-able rest."""
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, _, slot = key[len(prefix):].partition(".")
            state.setdefault(int(index), {})[slot] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save(checkpoint: Checkpoint, path: Path, half: bool = False) -> None:
    """Write atomically (see fileio).

    `half` stores floating-point weights as fp16 (for the small shipped models);
    they are loaded back as fp32.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for module, state in checkpoint.modules.items():
        for key, value in state.items():
            value = value.detach().cpu().contiguous()
            if half and value.is_floating_point():
                value = value.half()
            tensors[f"model.{module}.{key}"] = value
    optim_meta = {name: _flatten_optimizer(name, state, tensors) for name, state in checkpoint.optimizers.items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": checkpoint.family,
        "config": checkpoint.config,
        "dataset": checkpoint.dataset,
        "step": checkpoint.step,
        "optimizers": optim_meta,
        "extra": checkpoint.extra,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"genfast": json.dumps(header)})
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise GenfastError(f"cannot write checkpoint {path}: {reason}; the previous file, if any, is "
                           "unchanged") from None


def shipped_paths() -> dict[str, Path]:
    """Name -> path of every checkpoint shipped in the package, sorted by name."""
    folder = Path(str(resources.files("genfast") / "models"))
    return {p.name.removesuffix(".safetensors"): p for p in sorted(folder.glob("*.safetensors"))}


def resolve(name_or_path: str | Path) -> Path:
    """A checkpoint path, or a shipped model's name -> the file to read."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    models = shipped_paths()
    if str(name_or_path) in models:
        return models[str(name_or_path)]
    if path.suffix or path.parent != Path("."):
        raise GenfastError(f"checkpoint {path} not found")
    raise GenfastError(f"'{name_or_path}' is neither a checkpoint file nor a shipped model; "
                       f"shipped models: {', '.join(models) or 'none'} (see 'genfast models')")


def read_header(name_or_path: str | Path) -> dict[str, Any]:
    """The JSON header alone, without reading the weights."""
    path = resolve(name_or_path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise GenfastError(f"checkpoint {path} is corrupt or truncated ({e}); retrain it or copy it again") from None
    if "genfast" not in metadata:
        raise GenfastError(f"{path} is a safetensors file but not a genfast checkpoint (no 'genfast' header)")
    try:
        header = json.loads(metadata["genfast"])
    except json.JSONDecodeError:
        raise GenfastError(f"checkpoint {path} has a corrupt header; retrain it or copy it again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise GenfastError(f"{path} has a 'genfast' header that is not a genfast checkpoint header; "
                           f"the file is damaged or was edited")
    if not isinstance(header.get("format_version"), int) or header["format_version"] > FORMAT_VERSION:
        raise GenfastError(f"checkpoint {path} has format v{header.get('format_version')}; "
                           f"this genfast reads v{FORMAT_VERSION}, upgrade genfast")
    for key, kind in HEADER_FIELDS.items():
        if not isinstance(header.get(key), kind):
            raise GenfastError(f"checkpoint {path} has a damaged header (field '{key}'); retrain it or copy it again")
    if not isinstance(header["dataset"].get("name"), str):
        raise GenfastError(f"checkpoint {path} has a damaged header (field 'dataset.name'); retrain it or copy it "
                           "again")
    return header


def load(name_or_path: str | Path) -> Checkpoint:
    """A whole checkpoint (a path or a shipped model's name), its fp16 weights as fp32."""
    path = resolve(name_or_path)
    header = read_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GenfastError(f"checkpoint {path} is corrupt or truncated ({e}); retrain it or copy it again") from None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("model."):
            module, _, name = key[len("model."):].partition(".")
            modules.setdefault(module, {})[name] = value.float() if value.dtype == torch.float16 else value
    try:
        optimizers = {name: _unflatten_optimizer(name, meta, tensors) for name, meta in header["optimizers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise GenfastError(f"checkpoint {path} has damaged optimizer state; retrain it or copy it again") from None
    return Checkpoint(
        family=header["family"], config=header["config"], dataset=header["dataset"], step=header["step"],
        modules=modules, optimizers=optimizers, extra=header["extra"],
    )


def load_part(name: str, family: str, role: str, train_set) -> Checkpoint:
    """A trained model that a new run builds on (ar: its tokenizer; captioner, clip: the judge
    that reads their images): `name`, a checkpoint of `family` for the images of `train_set`.
    A missing one is one line saying how to train it."""
    what = role if role == family else f"{role} ({family})"
    try:
        part = load(name)
    except GenfastError as e:
        raise GenfastError(f"a {train_set.name} model builds on a {what} of its data set and found none "
                           f"({e}); train one with 'genfast train {family} --data {train_set.name} --out DIR' and pass "
                           f"{role}=DIR/checkpoint.safetensors") from None
    if part.family != family:
        raise GenfastError(f"{role}={name} is a '{part.family}' checkpoint, not a {family}")
    if list(part.dataset["image_shape"]) != list(train_set.image_shape):
        raise GenfastError(f"{role} {name} is for {part.dataset['image_shape']} images, the data set has "
                           f"{list(train_set.image_shape)}; give a {family} of this data set")
    return part


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every tensor of a network (names, kinds, shapes and bytes): a retrained or
    replaced checkpoint is another model, whatever its file is called (auto's decisions and
    the onnx engine's kept exports are keyed on it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
