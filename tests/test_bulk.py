"""Bulk generation over worker processes: exactly N images, none twice, the single process's images."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genfast import bulk
from genfast.errors import GenfastError


def test_two_workers_write_what_one_process_writes(tiny_cgan, tmp_path: Path):
    one = bulk.generate(tiny_cgan, tmp_path / "one", n=23, seed=5, batch_size=4, workers=1, progress=False)
    two = bulk.generate(tiny_cgan, tmp_path / "two", n=23, seed=5, batch_size=3, workers=2, progress=False)
    assert one == two == 23
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == [f"{i:06d}.png" for i in range(23)]  # exactly N, each index once
    for name in names:
        assert np.array_equal(np.array(Image.open(tmp_path / "one" / name)), np.array(Image.open(tmp_path / "two" / name)))


def test_npz_shards_cover_every_index_once(tiny_cgan, tmp_path: Path):
    bulk.generate(tiny_cgan, tmp_path / "npz", n=10, seed=5, batch_size=4, workers=2, fmt="npz", progress=False)
    shards = [np.load(p) for p in sorted((tmp_path / "npz").glob("shard_*.npz"))]
    index = np.concatenate([s["index"] for s in shards])
    assert sorted(index.tolist()) == list(range(10))
    pixels = np.concatenate([s["images"] for s in shards])
    assert pixels.shape == (10, 1, 28, 28) and pixels.dtype == np.uint8
    assert np.concatenate([s["labels"] for s in shards]).tolist() == [i % 10 for i in index]
    bulk.generate(tiny_cgan, tmp_path / "png", n=10, seed=5, batch_size=10, progress=False)
    for i, image in zip(index, pixels):  # the same images as the PNG path
        assert np.array_equal(np.array(Image.open(tmp_path / "png" / f"{i:06d}.png")), image[0])


def test_bad_bulk_options(tiny_gan, tmp_path: Path):
    with pytest.raises(GenfastError, match="unknown format 'jpg'"):
        bulk.generate(tiny_gan, tmp_path, n=2, fmt="jpg", progress=False)
