"""Config dataclasses: named presets, TOML files and `key=value` overrides.

Every family keeps its hyperparameters in one dataclass. A run's config is built
in layers, each overriding the one before: the dataclass defaults, a named
preset, a TOML file, then `key=value` pairs from the command line. An unknown key
is an error that names it and lists the valid ones, so a typo never silently
trains with the default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from genfast.errors import GenfastError

C = TypeVar("C")


def field_names(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a TOML value or a command-line string into the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # `int | None`: None or the inner type
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, inner[0], key)
    if origin is tuple:
        parts = value.split(",") if isinstance(value, str) else list(value)
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(p.strip() if isinstance(p, str) else p, item_type, key) for p in parts)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (ValueError, TypeError):
        raise GenfastError(f"config key '{key}' wants a {annotation.__name__}, got {value!r}") from None
    raise TypeError(f"config field '{key}' has an unsupported type {annotation!r}")


def override(config: C, values: dict[str, Any]) -> C:
    """Return a copy of `config` with `values` applied; unknown keys are an error."""
    hints = typing.get_type_hints(type(config))
    valid = field_names(type(config))
    changes = {}
    for key, value in values.items():
        if key not in valid:
            raise GenfastError(
                f"unknown config key '{key}' for {type(config).__name__}; valid keys: {', '.join(valid)}"
            )
        changes[key] = _coerce(value, hints[key], key)
    return dataclasses.replace(config, **changes)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """`["lr=0.001", "z_dim=64"]` -> `{"lr": "0.001", "z_dim": "64"}`."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GenfastError(f"expected key=value, got '{pair}'")
        values[key.strip()] = value.strip()
    return values


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise GenfastError(f"config file {path} not found") from None
    except OSError as e:
        raise GenfastError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise GenfastError(f"config file {path} is not valid TOML: {e}") from None


def layered_values(presets: dict[str, dict[str, Any]], preset: str = "default", toml_path: Path | None = None,
                   pairs: list[str] = ()) -> dict[str, Any]:
    """The values a user asked for, merged: preset <- TOML file <- key=value pairs."""
    if preset not in presets:
        raise GenfastError(f"unknown preset '{preset}'; choose one of: {', '.join(presets)}")
    values = dict(presets[preset])
    if toml_path is not None:
        values.update(load_toml(toml_path))
    values.update(parse_pairs(list(pairs)))
    return values


def require(config: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
            unit: tuple[str, ...] = ()) -> None:
    """Range checks a family runs before building, so a bad value is one clear error, not a crash."""
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (unit, lambda v: 0 <= v < 1, "in [0, 1)")]
    for keys, ok, wanted in rules:
        for key in keys:
            value = getattr(config, key)
            if not (math.isfinite(value) and ok(value)):
                raise GenfastError(f"config key '{key}' must be {wanted}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(config_cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config saved in a checkpoint header (JSON turns tuples into lists)."""
    return override(config_cls(), values)
