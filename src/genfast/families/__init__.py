"""The family registry: the one place that maps a name to a model family.

A new family subclasses families.base.Family and gets one entry here; the trainer,
the loader, the CLI (its `train` choices), metrics and the server find it through
`get_family`.
"""

from __future__ import annotations

from genfast.errors import GenfastError
from genfast.families.ar import AR, VQVAE
from genfast.families.base import Family, Sampler
from genfast.families.captioner import Captioner
from genfast.families.classifier import Classifier
from genfast.families.clip import CLIP
from genfast.families.gan import GAN
from genfast.families.vae import VAE

# The generative families, the tokenizer `ar` builds on, the classifier that judges them,
# and the models that read images into words or beside them (all trained by the same trainer).
FAMILIES: dict[str, Family] = {"gan": GAN(), "vae": VAE(), "ar": AR(), "vqvae": VQVAE(), "classifier": Classifier(),
                               "captioner": Captioner(), "clip": CLIP()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise GenfastError(f"unknown model family '{name}'; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "Sampler", "get_family"]
