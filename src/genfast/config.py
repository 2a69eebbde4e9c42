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


# An int field holds what torch and a checkpoint's int64 can: anything wider is no number
# a config can use (the family checks the range it needs, within that).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
SHOWN_CHARS = 60  # of a bad value in an error: a stranger's file may hold megabytes in one value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _accepts(value: Any, annotation: type, from_text: bool) -> bool:
    """Whether a value of this Python type may stand for a field of type `annotation`."""
    if isinstance(value, bool):  # a subclass of int: without this, `batch_size = true` trains with 1
        return annotation is bool
    if isinstance(value, str):
        return annotation is str or from_text
    if annotation is float:
        return isinstance(value, int | float)
    if annotation is int:
        return isinstance(value, int) or (from_text and isinstance(value, float))  # TOML's `z_dim = 64.0`
    return annotation is bool and from_text and isinstance(value, int)  # 1 and 0, as on the command line


def _coerce(value: Any, annotation: Any, key: str, from_text: bool = True) -> Any:
    """Turn a TOML value or a command-line string into the field's declared type.

    from_text=False is for JSON written by `to_dict`: a value must already have its
    field's JSON type there (a string is no number, 1 is no bool)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # `int | None`: None or the inner type
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (from_text and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, inner[0], key, from_text)
    if origin is tuple:
        if from_text and isinstance(value, str):
            parts = value.split(",")
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            raise GenfastError(f"config key '{key}' wants a list, got {_shown(value)}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(p.strip() if isinstance(p, str) else p, item_type, key, from_text) for p in parts)
    if annotation not in (bool, int, float, str):
        raise TypeError(f"config field '{key}' has an unsupported type {annotation!r}")
    try:
        if not _accepts(value, annotation, from_text):
            raise ValueError(value)
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        converted = annotation(value)
        if annotation is int and not INT_MIN <= converted <= INT_MAX:
            raise ValueError(value)
        return converted
    except (ValueError, OverflowError):  # OverflowError: float(10**400)
        raise GenfastError(f"config key '{key}' wants a {annotation.__name__}, got {_shown(value)}") from None


def override(config: C, values: dict[str, Any]) -> C:
    """Return a copy of `config` with `values` applied; unknown keys are an error."""
    return _replace(config, values, from_text=True)


def _replace(config: C, values: dict[str, Any], from_text: bool) -> C:
    hints = typing.get_type_hints(type(config))
    valid = field_names(type(config))
    changes = {}
    for key, value in values.items():
        if key not in valid:
            raise GenfastError(
                f"unknown config key {_shown(key)} for {type(config).__name__}; valid keys: {', '.join(valid)}"
            )
        changes[key] = _coerce(value, hints[key], key, from_text)
    return dataclasses.replace(config, **changes)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """`["lr=0.001", "z_dim=64"]` -> `{"lr": "0.001", "z_dim": "64"}`."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GenfastError(f"expected key=value, got {_shown(pair)}")
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
    except UnicodeDecodeError as e:  # before ValueError, which it is
        raise GenfastError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                           f"{e.start}); TOML files are UTF-8, save it as such") from None
    except ValueError as e:  # TOMLDecodeError, or an integer literal of thousands of digits
        raise GenfastError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib reads nested arrays and tables recursively
        raise GenfastError(f"config file {path} nests arrays or tables too deeply; flatten it") from None


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
    """Rebuild a config saved in a checkpoint header (JSON turns tuples into lists).

    Such a header may come from anyone, so each value must have its field's JSON type:
    the strings that `override` parses from a command line are refused here."""
    if not isinstance(values, dict):
        raise GenfastError(f"a saved {config_cls.__name__} must be a JSON object of its keys, got {_shown(values)}")
    return _replace(config_cls(), values, from_text=False)
