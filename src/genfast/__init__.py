"""genfast: train image generative models, then generate images as fast as the hardware allows.

    import genfast
    sampler = genfast.load("cgan-fashion-mnist")       # a shipped model or a checkpoint path
    images = sampler.generate(16, seed=0, class_index=7)  # (16, 1, 28, 28) in [-1, 1]
"""

from genfast.errors import GenfastError
from genfast.families import FAMILIES, Sampler
from genfast.pretrained import load, shipped
from genfast.train import TrainOptions, train

__version__ = "0.1.0"
__all__ = ["FAMILIES", "GenfastError", "Sampler", "TrainOptions", "load", "shipped", "train", "__version__"]
