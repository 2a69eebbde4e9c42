"""Pixels in and out: [-1, 1] tensors <-> uint8, grids, PNG files.

Every write goes to a temporary file beside the target and is renamed into place,
so an interrupted or failed write never leaves half a file where a good one was.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genfast.errors import GenfastError
from genfast.fileio import atomic_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, C, H, W)."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> [-1, 1] float32, the range every family trains on."""
    return images.float() / 127.5 - 1


def digests(rows: torch.Tensor) -> list[bytes]:
    """A 16-byte hash of each row (image, noise vector) of `rows`: equal rows, equal hashes;
    how duplicates are counted without keeping the rows."""
    flat = rows.detach().cpu().contiguous().reshape(len(rows), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (rows*H, cols*W, C) array, images row by row."""
    n, c, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    pixels = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def _pil(array: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a grayscale or RGB Pillow image."""
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


NAME_MAX = 255  # bytes in a file name, on Linux's file systems
MAX_GRID = 10_000  # images in one PNG grid: 100 x 100 tiles, 6000 x 6000 pixels at the usual scale


def writable_target(path: Path) -> Path:
    """Make sure `path`'s folder exists and can be written, before any long work."""
    path = check_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # not ensure_dir: the user named a file, so the error names the file
        raise GenfastError(f"cannot write {path}: {e.strerror}; choose another output path") from None
    if not os.access(path.parent, os.W_OK):
        raise GenfastError(f"cannot write {path}: folder {path.parent} is not writable; choose another output path")
    if path.is_dir():
        raise GenfastError(f"cannot write {path}: it is a folder; give a file name")
    return path


def check_name(path: Path) -> Path:
    """A name the file system can take (asking it about a longer one is already an error)."""
    if len(Path(path).name.encode()) > NAME_MAX:
        raise GenfastError(f"cannot write {Path(path).name[:40]}...: a file name may have at most {NAME_MAX} bytes; "
                           f"choose a shorter one")
    return Path(path)


def save_png(array: np.ndarray, path: Path, scale: int = 1, durable: bool = True) -> None:
    """Write a (H, W, C) uint8 array as a PNG, atomically; `scale` enlarges with nearest pixels."""
    path = writable_target(path)
    image = _pil(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    try:
        with atomic_path(path, durable) as tmp:
            image.save(tmp, format="PNG")
    except OSError as e:
        raise GenfastError(f"cannot write {path}: {e.strerror}; choose another output path") from None


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, scale: int = 2) -> None:
    """[-1, 1] images -> one PNG grid (enlarged so 28x28 images are easy to look at)."""
    save_png(make_grid(to_uint8(images), nrow), path, scale=scale)


def save_each(pixels: torch.Tensor, paths: list[Path]) -> None:
    """uint8 (N, C, H, W) -> one PNG per image at `paths` (bulk output: no fsync each)."""
    for array, path in zip(pixels.permute(0, 2, 3, 1).numpy(), paths):
        save_png(array, path, durable=False)


def png_bytes(array: np.ndarray) -> bytes:
    """A (H, W, C) uint8 array as the bytes of a PNG file (what a server sends)."""
    buffer = io.BytesIO()
    _pil(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_image(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file (PNG, JPEG, ...) -> uint8 (C, H, W) of `shape`, the size a model takes:
    it is not resized, since a model's input is its own size (a grid or a photo is refused,
    not squeezed). A grey image fills every channel of a colour model; a colour image for a
    grey model is refused. Anything else is one line naming the file."""
    channels, height, width = shape
    try:
        with warnings.catch_warnings():  # Pillow's warnings about a file's quirks are not for users
            warnings.simplefilter("ignore")
            with Image.open(path) as image:  # the header only: the size is known before anything is decoded
                if image.size != (width, height):
                    raise GenfastError(f"image {path} is {image.width}x{image.height}; the model takes {width}x"
                                       f"{height} images: crop or resize it to that first")
                rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GenfastError(f"cannot read {path} as an image ({e}); give PNG files or a folder of them") from None
    grey = bool((rgb == rgb[..., :1]).all())
    if channels == 1 and not grey:
        raise GenfastError(f"image {path} is in colour; the model takes greyscale images: convert it to grey first")
    pixels = rgb[..., :1] if channels == 1 else rgb
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
