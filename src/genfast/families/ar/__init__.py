"""LLM image generation, one folder: the transformer (model.py), its decoding strategies
(decoders.py), the sampler's network they run in (generator.py), the VQ-VAE tokenizer, of
one scale or several (tokenizer.py), the MiniLM text side (text.py) and the family that
trains them (family.py)."""

from genfast.families.ar.decoders import DECODERS
from genfast.families.ar.family import AR
from genfast.families.ar.model import ARConfig, ARNet
from genfast.families.ar.tokenizer import VQVAE, VQVAEConfig, VQVAENet

__all__ = ["AR", "ARConfig", "ARNet", "DECODERS", "VQVAE", "VQVAEConfig", "VQVAENet"]
