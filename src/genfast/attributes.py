"""What an image looks like, in numbers measured from its pixels: the ground the caption corpus stands on.

A caption that says "a dark dress" or "a thick seven" is only worth training on if the
dress is dark and the seven is thick, so the words come from measurements, not from the
label alone. Every measure here is a plain number per image, computed for a whole batch
at once in pure torch (60,000 28x28 images in about 5 s on two CPU cores), for uint8 images
(0..255) or float images in [-1, 1] (what every sampler makes). The words describe the
image as displayed: high pixel values are light. (Fashion-MNIST negated its product
photos, so a "light" garment here is dark cloth in the shop; the words follow the pixels.)

A pixel is *foreground* (ink, cloth) when its intensity in [0, 1] is above FOREGROUND.

| attribute | what it is | unit |
| --- | --- | --- |
| brightness | mean intensity of the foreground pixels | 0 (black) .. 1 (white) |
| area | share of the image's pixels that are foreground | 0 .. 1 |
| height | rows spanned by the foreground's bounding box, over the image height | 0 .. 1 |
| width | the bounding box's width over its height (aspect ratio) | > 1: wider than tall |
| texture | mean absolute intensity step between neighbouring pixels inside the foreground | intensity per pixel |
| thickness | stroke width: 4 x the mean distance of foreground pixels to the background | pixels |
| slant | horizontal shift per unit of height from second moments, mu11 / mu02 | > 0: leaning right |

- *texture* is measured on the foreground eroded by one pixel, so an object's outline
  (the step from cloth to background, which every image has) does not count; seams,
  prints and stripes inside it do. It is not divided by the brightness: that contrast
  is tied to brightness more tightly (within a Fashion-MNIST class, r about -0.65 against
  -0.35 for the plain step), light cloth being often white all over.
- *thickness*: a long stroke of width w has its pixels' distances to the edge spread
  evenly over 0 .. w/2, whose mean is w/4, so 4 x the mean distance is w, whatever the
  stroke's length, curvature or the number of strokes (a skeleton's length, the other
  classic denominator, is fragile on 28x28 digits: spurs and breaks change it by a lot).
  The distance is counted by eroding the foreground again and again, alternating the
  4-neighbour (plus) and 8-neighbour (square) erosions: their alternation is the
  octagonal distance, within about 8% of the Euclidean one in every direction, where
  either alone is off by up to 41% on diagonal strokes. (A thin diagonal stroke is a
  staircase on a 28x28 grid, and measures up to a pixel wider than it was drawn.)
- *slant* is the shear the classic MNIST deskew removes: with x to the right and y up,
  mu11 / mu02 is how far the ink moves right per pixel up (intensity-weighted moments of
  the foreground); "/" is positive, "\\" negative, upright 0.

Words ("dark", "thick", ...) are given by a class's own spread, not by fixed numbers: a
thick one is thick for a one. `thresholds` takes the 1/3 and 2/3 quantiles of each
attribute per class (the lower third gets the "low" word, the upper third the "high"
word, the middle third none), and `training_thresholds` does so over a data set's
training split, once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genfast import data
from genfast.errors import GenfastError

ATTRIBUTES = ("brightness", "area", "height", "width", "texture", "thickness", "slant")
FOREGROUND = 0.2  # intensity (in [0, 1]) above which a pixel is foreground: above the faint haze of anti-aliasing
QUANTILES = (1 / 3, 2 / 3)  # below the first: the attribute's "low" word; above the second: its "high" word
CHUNK = 8192  # images measured at once: bounds the memory of the erosions (a few float copies of a chunk)


def intensities(images: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float ([-1, 1]) images (N, C, H, W) -> (N, H, W) float intensities in [0, 1]
    (channels averaged)."""
    if images.dim() != 4:
        raise GenfastError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else ((x.float() + 1) / 2).clamp(0, 1)
    return x.mean(1)


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every attribute of every image: {name: (N,) float tensor}, in the order of ATTRIBUTES."""
    x = intensities(images)
    parts = [_measure(x[start:start + CHUNK]) for start in range(0, len(x), CHUNK)]
    return {name: torch.cat([p[name] for p in parts]) if parts else torch.zeros(0) for name in ATTRIBUTES}


def _measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
    foreground = x > FOREGROUND
    mask, interior = foreground.float(), _erode(foreground, square=True).float()
    ink = mask.sum((1, 2))
    height_px, width_px = _extent(foreground.any(2)), _extent(foreground.any(1))
    return {
        "brightness": _masked_mean(x, mask),
        "area": ink / mask[0].numel() if len(x) else ink,
        "height": height_px / x.shape[1],
        "width": width_px / height_px.clamp_min(1),
        "texture": _masked_mean(_steps(x), interior),
        "thickness": 4 * (_masked_mean(_depth(foreground), mask) - 0.5).clamp_min(0),
        "slant": _slant(x * mask),
    }


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over each image's mask (0 where the mask is empty)."""
    return (values * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    """(N, L) bool lines holding foreground -> the span from the first to the last, in pixels (0 if none)."""
    length = occupied.shape[1]
    first = occupied.int().argmax(1)
    last = length - 1 - occupied.flip(1).int().argmax(1)
    return torch.where(occupied.any(1), last - first + 1, 0).float()


def _erode(mask: torch.Tensor, square: bool) -> torch.Tensor:
    """(N, H, W) bool: a pixel stays foreground if all its 8 (square) or 4 (plus) neighbours are; outside the
    image is background. Shifted ANDs of bool tensors: several times faster than a min-pool of floats."""
    padded = F.pad(mask, (1, 1, 1, 1))
    if square:  # separable: three across, then three down
        across = padded[:, :, :-2] & padded[:, :, 1:-1] & padded[:, :, 2:]
        return across[:, :-2] & across[:, 1:-1] & across[:, 2:]
    return (padded[:, 1:-1, 1:-1] & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
            & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])


def _depth(mask: torch.Tensor) -> torch.Tensor:
    """Each foreground pixel's distance to the background, in pixels (1 on the edge; 0 off the foreground),
    by octagonal erosion."""
    depth, layer = mask.to(torch.uint8), mask
    for step in range(max(mask.shape[1:]) // 2 + 1):
        layer = _erode(layer, square=step % 2 == 1)
        if not layer.any():
            break
        depth += layer
    return depth.float()


def _steps(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute intensity step from each pixel to its right and lower neighbours."""
    right = (x[:, :, 1:] - x[:, :, :-1]).abs()
    down = (x[:, 1:, :] - x[:, :-1, :]).abs()
    return (F.pad(right, (0, 1)) + F.pad(down, (0, 0, 0, 1))) / 2


def _slant(weights: torch.Tensor) -> torch.Tensor:
    """mu11 / mu02 of the intensity-weighted pixels, with x to the right and y up (0 for an empty image)."""
    _, height, width = weights.shape
    y = -torch.arange(height, dtype=weights.dtype)[:, None]
    x = torch.arange(width, dtype=weights.dtype)[None, :]
    total = weights.sum((1, 2)).clamp_min(1e-8)
    mean_x = (weights * x).sum((1, 2)) / total
    mean_y = (weights * y).sum((1, 2)) / total
    dx = x - mean_x[:, None, None]
    dy = y - mean_y[:, None, None]
    mu11 = (weights * dx * dy).sum((1, 2)) / total
    mu02 = (weights * dy * dy).sum((1, 2)) / total
    return torch.where(mu02 > 1e-8, mu11 / mu02.clamp_min(1e-8), 0.0)


@dataclass(frozen=True)
class Thresholds:
    """Per attribute, the per-class values below which an image is "low" and above which it is "high"."""

    low: dict[str, torch.Tensor]   # name -> (num_classes,)
    high: dict[str, torch.Tensor]  # name -> (num_classes,)

    def levels(self, measured: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: (N,) int8}: -1 in the class's lower third, +1 in its upper third, 0 between."""
        labels = torch.as_tensor(labels).long()
        return {name: ((values > self.high[name][labels]).to(torch.int8)
                       - (values < self.low[name][labels]).to(torch.int8))
                for name, values in measured.items() if name in self.low}

    def as_dict(self) -> dict[str, dict[str, list[float]]]:
        """JSON-able: {name: {"low": [per class], "high": [per class]}}."""
        return {name: {"low": self.low[name].tolist(), "high": self.high[name].tolist()} for name in self.low}


def thresholds(measured: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> Thresholds:
    """The QUANTILES of each attribute within each class (a class with no image gets +-inf: no words)."""
    labels = torch.as_tensor(labels).long()
    low, high = {}, {}
    for name, values in measured.items():
        per_class = torch.full((2, num_classes), float("nan"))
        for index in range(num_classes):
            mine = values[labels == index].double()
            if len(mine):
                per_class[:, index] = torch.quantile(mine, torch.tensor(QUANTILES, dtype=torch.float64)).float()
        low[name] = per_class[0].nan_to_num(float("-inf"))
        high[name] = per_class[1].nan_to_num(float("inf"))
    return Thresholds(low, high)


def training_thresholds(dataset: str) -> Thresholds:
    """The thresholds of a data set's training split, measured once per process and data folder (a few
    seconds for 60,000 images)."""
    return _thresholds_of(dataset, str(data.find(dataset)))


@functools.cache
def _thresholds_of(dataset: str, folder: str) -> Thresholds:
    train = data.load(dataset, "train")
    if train.labels is None:
        raise GenfastError(f"data set '{dataset}' has no labels, and attribute words are relative to a class")
    return thresholds(measure(train.images), train.labels, train.num_classes)
