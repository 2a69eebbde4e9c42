"""Hostile inputs to the loaders of data and config, as an audit found them.

An IDX file, a folder of images, a TOML file or the config in a checkpoint's header
may come from anyone. Whatever it holds, the answer is the data it describes or one
GenfastError of one line that names it: never another exception, a raw warning, or
the memory a small file merely claims to need.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
import tracemalloc
import typing
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image, ImageFile

from genfast import config, data
from genfast.errors import GenfastError
from genfast.families.gan import PRESETS, GANConfig

# tmp_path is shared by a test's examples; each example overwrites the one file it uses.
SHARED_TMP = [HealthCheck.function_scoped_fixture]


def idx_bytes(dims: tuple[int, ...], payload: bytes = b"", magic: bytes = b"\0\0\x08") -> bytes:
    return magic + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def assert_one_line_naming(error: GenfastError, *names: str) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 500, message
    for name in names:
        assert name in message, (name, message)


# --- IDX files -----------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("content, message", [
    # numpy's int64 product of 65536^4 wraps to 0, which the empty payload then "matched".
    (idx_bytes((2**16,) * 4), "over the limit"),
    (idx_bytes((2**32 - 1,) * 3), "over the limit"),  # a product past int64
    (idx_bytes((5, 0, 0)), "no pixels"),  # five 0x0 images
    (idx_bytes((), b"\x07"), "0 dimensions"),  # a scalar is no data set
    (idx_bytes((1,) * 70, b"\x07"), "70 dimensions"),  # more than numpy can reshape to
    (idx_bytes((3,), b"\1\2\3\4"), "oversized"),  # one byte past the declared three
], ids=["wraps-to-0", "past-int64", "0x0-images", "0-dims", "70-dims", "oversized"])
def test_idx_header_that_makes_no_sense_is_one_error(tmp_path, gz, content, message):
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(GenfastError, match=message) as err:
        data.read_idx(path)
    assert_one_line_naming(err.value, str(path), "genfast data download mnist")


def gzip_bomb(head: bytes, inflated_mib: int) -> bytes:
    """`head`, then `inflated_mib` MiB of zeros, in about 1 KB per MiB: gzip members of
    1 MiB of zeros each, concatenated, which gzip readers take as one stream."""
    return gzip.compress(head, mtime=0) + gzip.compress(bytes(1 << 20), mtime=0) * inflated_mib


@pytest.mark.parametrize("head, message", [
    (idx_bytes((6144, 1024, 1024)), "6,442,450,944 bytes in all, over the limit"),  # declares 6 GiB
    (idx_bytes((1, 28, 28), bytes(784)), "oversized"),  # declares one image, then keeps going
], ids=["declares-6-GiB", "declares-one-image"])
def test_idx_gzip_bomb_is_refused_before_it_is_inflated(tmp_path, head, message):
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_bomb(head, 256))  # 256 KB that inflate to 256 MiB
    tracemalloc.start()
    try:
        with pytest.raises(GenfastError, match=message):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes allocated to refuse it"


def test_idx_bounds_are_checked_exactly_on_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 1000)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "f.idx"
    path.write_bytes(idx_bytes((10, 10, 10), bytes(1000)))  # both at their limit: fine
    assert data.read_idx(path).shape == (10, 10, 10)
    path.write_bytes(idx_bytes((11, 10, 10), bytes(1100)))
    with pytest.raises(GenfastError, match="1,100 bytes in all, over the limit of 1,000"):
        data.read_idx(path)
    path.write_bytes(idx_bytes((1, 11, 10), bytes(110)))
    with pytest.raises(GenfastError, match="items hold 110 values, over the limit of 100"):
        data.read_idx(path)
    with pytest.raises(GenfastError, match="write_idx.*over the limit"):  # nothing read_idx would refuse is written
        data.write_idx(path, np.zeros((1, 11, 10), np.uint8))


def valid_idx_shape(dims: tuple[int, ...]) -> bool:
    """The rule, restated: 1 to 4 dimensions, non-empty items within the pixel bound, all within the byte bound."""
    item = math.prod(dims[1:])
    return 1 <= len(dims) <= 4 and 0 < item <= data.MAX_IMAGE_PIXELS and dims[0] * item <= data.MAX_IDX_BYTES


@settings(max_examples=200, deadline=None, suppress_health_check=SHARED_TMP)
@given(array=arrays(np.uint8, array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)), gz=st.booleans())
def test_idx_write_then_read_gives_the_array_back_or_one_error(tmp_path, array, gz):
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    try:
        data.write_idx(path, array)
    except GenfastError as e:
        assert not valid_idx_shape(array.shape)
        assert_one_line_naming(e, str(path))
        return
    back = data.read_idx(path)
    assert back.shape == array.shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, array)


@st.composite
def idx_files(draw):
    """(file bytes, dims, payload, well formed): a header of random dims, often a payload of
    exactly their size, sometimes a few bytes more or less, a wrong magic or type, gzip or
    not, the gzip sometimes cut short."""
    dims = tuple(draw(st.lists(st.integers(1, 5) | st.sampled_from([0, 28, 2**16, 2**31, 2**32 - 1])
                               | st.integers(0, 2**32 - 1), max_size=5)))
    size = math.prod(dims)
    length = max(0, (size if size <= 4096 else draw(st.integers(0, 64))) + draw(st.sampled_from([0, 0, 0, -1, 1, 3])))
    payload = draw(st.binary(min_size=length, max_size=length))
    magic = draw(st.sampled_from([b"\0\0\x08"] * 6 + [b"\0\0\x09", b"\1\0\x08", b"\x1f\x8b\x08"]))
    raw = idx_bytes(dims, payload, magic)
    well_formed = magic == b"\0\0\x08" and valid_idx_shape(dims) and len(payload) == size
    if draw(st.booleans()):
        raw = gzip.compress(raw, mtime=0)
        if draw(st.booleans()):  # cut anywhere: a stream that ends early, or a header cut short
            cut = draw(st.integers(0, len(raw)))
            raw, well_formed = raw[:cut], well_formed and cut == len(raw)
    return raw, dims, payload, well_formed


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=SHARED_TMP)
@given(file=idx_files())
def test_idx_random_header_and_payload_is_what_was_written_or_one_error(tmp_path, file):
    raw, dims, payload, well_formed = file
    path = tmp_path / "f.idx"
    path.write_bytes(raw)
    try:
        back = data.read_idx(path)
    except GenfastError as e:
        assert not well_formed
        assert_one_line_naming(e, str(path))
        return
    assert well_formed and back.shape == dims and back.tobytes() == payload


@settings(max_examples=200, deadline=None, suppress_health_check=SHARED_TMP)
@given(gz=st.booleans(), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
       cut=st.integers(0, 10**6))
def test_idx_damaged_anywhere_is_an_array_or_one_error(tmp_path, gz, edits, cut):
    path = tmp_path / ("f.gz" if gz else "f")
    data.write_idx(path, np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    raw = bytearray(path.read_bytes())
    for position, value in edits:
        raw[position % len(raw)] = value
    path.write_bytes(raw[:cut % (len(raw) + 1)])
    try:
        back = data.read_idx(path)
    except GenfastError as e:
        assert_one_line_naming(e, str(path))
    else:
        assert back.dtype == np.uint8 and back.ndim in (1, 2, 3, 4)


# --- folder:PATH ---------------------------------------------------------------------

def blank_png(path: Path, width: int, height: int) -> None:
    """A valid black 1-bit PNG of any size, written without ever holding its pixels:
    rows of zeros compress to almost nothing (12000x12000 is about 20 KB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    rows, z = bytes(1 + (width + 7) // 8) * 1000, zlib.compressobj(9)  # a filter byte, then the packed bits
    idat = b"".join(z.compress(rows) for _ in range(height // 1000))
    idat += z.compress(rows[:(height % 1000) * len(rows) // 1000]) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit per pixel, grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, message", [
    # Over our bound, under Pillow's refusal: it used to decode (1.4 GB) with a raw warning.
    (12000, "12000x12000, 144,000,000 pixels, over the limit of 67,108,864"),
    (20000, r"Image size \(400000000 pixels\).*the limit is 67,108,864"),  # past Pillow's own refusal
])
def test_folder_refuses_a_huge_image_before_decoding_it(tmp_path, monkeypatch, side, message):
    blank_png(tmp_path / "imgs" / "huge.png", side, side)

    def decode(self):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(GenfastError, match=message) as err:
            data.load(f"folder:{tmp_path / 'imgs'}")
    assert_one_line_naming(err.value, "huge.png")
    assert [str(w.message) for w in caught] == []


def test_folder_pixel_bound_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 400)
    for i in range(10):
        Image.new("L", (20, 20), i).save(tmp_path / f"{i}.png")
    assert data.load(f"folder:{tmp_path}").images.shape == (9, 1, 28, 28)  # 20x20 is 400: at the limit
    Image.new("L", (21, 20)).save(tmp_path / "wide.png")
    with pytest.raises(GenfastError, match="wide.png is 21x20, 420 pixels, over the limit of 400"):
        data.load(f"folder:{tmp_path}")


def test_folder_reads_palette_transparency_without_a_raw_warning(tmp_path):
    for i in range(10):  # Pillow warns on converting such a (common, harmless) PNG to RGB
        im = Image.new("P", (20, 20), i)
        im.putpalette(bytes(v for i in range(256) for v in (i, i, i)))  # gray: entry i is (i, i, i)
        im.save(tmp_path / f"{i}.png", transparency=bytes([0, 255, 128, 10]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = data.load(f"folder:{tmp_path}")
    assert [str(w.message) for w in caught] == []
    assert s.images.shape == (9, 1, 28, 28) and (s.images[0] == 0).all() and (s.images[1] == 1).all()


# --- config: TOML files, key=value pairs, checkpoint headers --------------------------

@pytest.mark.parametrize("content, message", [
    (b'z_dim = 64\nname = "caf\xe9"\n', r"not UTF-8 text \(byte 0xe9 at offset 22\)"),  # Latin-1, as some editors save
    (b"a = " + b"[" * 100_000 + b"]" * 100_000, "nests arrays or tables too deeply"),
    (b"z_dim = " + b"1" * 5000, "not valid TOML"),  # Python refuses to parse an int of 5000 digits
], ids=["latin-1", "nested-100000-deep", "int-of-5000-digits"])
def test_toml_file_that_cannot_be_read_is_one_error(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    with pytest.raises(GenfastError, match=message) as err:
        config.layered_values(PRESETS, "default", path)
    assert_one_line_naming(err.value, str(path))


@pytest.mark.parametrize("toml, pairs", [
    ("batch_size = true\n", []),  # bool is a subclass of int: this used to train with batch size 1
    ("lr_g = false\n", []),
    ("", ["batch_size=true"]),  # on the command line it is a string, refused all along
])
def test_bool_is_no_number(tmp_path, toml, pairs):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    values = config.layered_values(PRESETS, "default", path, pairs)
    wanted = "config key '(batch_size|lr_g)' wants a (int|float), got (True|False|'true')"
    with pytest.raises(GenfastError, match=wanted):
        config.override(GANConfig(), values)


@pytest.mark.parametrize("values", [
    {"batch_size": "64"},  # a command line's string, not the JSON number to_dict writes
    {"lr_g": "0.1"},
    {"conditional": 1},
    {"conditional": "yes"},
    {"z_dim": 64.0},
    {"z_dim": 10**30},  # past int64
    {"z_dim": -(2**63) - 1},
    {"lr_g": 10**400},  # float() of it overflows
    {"z_dim": None},
    {"z_dim": [64]},
    {"z_dim": "9" * 100_000},  # the message shows only its start
    {"z_dim\nlr_g": 1},  # an unknown key cannot break the message's line
], ids=lambda values: repr(values)[:30])
def test_checkpoint_config_of_the_wrong_json_type_is_one_error(values):
    with pytest.raises(GenfastError, match="config key") as err:
        config.from_dict(GANConfig, values)
    (key,) = values
    assert_one_line_naming(err.value, repr(key))  # as repr shows it: a newline stays two characters


@pytest.mark.parametrize("header", [[1, 2], "z_dim=3", None, 7])
def test_checkpoint_config_that_is_no_json_object_is_one_error(header):
    with pytest.raises(GenfastError, match="a saved GANConfig must be a JSON object"):
        config.from_dict(GANConfig, header)


@dataclasses.dataclass
class Shapes:
    sizes: tuple[int, ...] = ()
    limit: int | None = None


def test_list_and_optional_fields_are_strict_in_json_lenient_in_text():
    assert config.override(Shapes(), {"sizes": "1, 2", "limit": "none"}) == Shapes((1, 2), None)
    assert config.from_dict(Shapes, {"sizes": [1, 2], "limit": None}) == Shapes((1, 2), None)
    for values in ({"sizes": 5}, {"sizes": None}):  # used to be list(5): a TypeError
        with pytest.raises(GenfastError, match="config key 'sizes' wants a list"):
            config.override(Shapes(), values)
    for values in ({"sizes": "1, 2"}, {"sizes": [1, "2"]}, {"limit": "none"}):
        with pytest.raises(GenfastError, match="config key '(sizes|limit)' wants a"):
            config.from_dict(Shapes, values)


GAN_KEYS = config.field_names(GANConfig)
GAN_TYPES = typing.get_type_hints(GANConfig)
keys = st.sampled_from(GAN_KEYS) | st.text(max_size=8)
numbers = (st.integers() | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30, 10**400])
           | st.floats())
words = (st.sampled_from(["true", "yes", "off", "none", "1e400", "nan", "-inf", "64.0", "0x10", " 7 ", "1_000", ""])
         | st.text(max_size=12) | numbers.map(str))
json_values = st.recursive(st.none() | st.booleans() | numbers | words,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=3), max_leaves=4)
toml_values = json_values | st.dates() | st.datetimes()


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_typed(cfg: GANConfig) -> None:
    """Every field holds exactly its annotated type (no bool for an int), ints within int64."""
    for key in GAN_KEYS:
        value = getattr(cfg, key)
        assert type(value) is GAN_TYPES[key], (key, value)
        assert not isinstance(value, int) or -(2**63) <= value < 2**63, (key, value)
    back = config.from_dict(GANConfig, config.to_dict(cfg))  # what override accepts, a checkpoint keeps
    assert all(same(getattr(back, k), getattr(cfg, k)) for k in GAN_KEYS)


@pytest.mark.slow
@settings(max_examples=250, deadline=None)
@given(values=st.dictionaries(keys, toml_values, max_size=4))
def test_override_gives_a_typed_config_or_one_error(values):
    try:
        cfg = config.override(GANConfig(), values)
    except GenfastError as e:
        assert_one_line_naming(e)
    else:
        assert_typed(cfg)


@settings(max_examples=250, deadline=None)
@given(pairs=st.lists(st.tuples(keys, words).map("=".join) | st.text(max_size=15), max_size=4))
def test_key_value_pairs_give_a_typed_config_or_one_error(pairs):
    try:
        cfg = config.override(GANConfig(), config.parse_pairs(pairs))
    except GenfastError as e:
        assert_one_line_naming(e)
    else:
        assert_typed(cfg)


@pytest.mark.slow
@settings(max_examples=250, deadline=None)
@given(values=st.dictionaries(keys, json_values, max_size=4))
def test_from_dict_gives_the_json_values_themselves_or_one_error(values):
    try:
        cfg = config.from_dict(GANConfig, values)
    except GenfastError as e:
        assert_one_line_naming(e)
    else:
        assert_typed(cfg)
        # Taken as they are, but for an int in a float field (JSON writes 1.0 as 1 only by hand).
        assert all(same(getattr(cfg, k), float(v) if GAN_TYPES[k] is float else v) for k, v in values.items())
