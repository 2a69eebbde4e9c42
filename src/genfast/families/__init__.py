"""The family registry: the one place that maps a name to a model family."""

from __future__ import annotations

from genfast.errors import GenfastError
from genfast.families.base import Family, Sampler
from genfast.families.gan import GAN

FAMILIES: dict[str, Family] = {"gan": GAN()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise GenfastError(f"unknown model family '{name}'; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "Sampler", "get_family"]
