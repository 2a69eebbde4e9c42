"""Every image a fresh draw: the noise of a seed is statistically one stream, not a repeat.

These tests are statistical, not only consistent: a stream that repeated every block
(the bug of issue 12: torch cut `seed + (j << 32)` to `seed`) was self-consistent and
passed the range tests, but fails every one of these."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch

import genfast
from genfast import data, images, metrics, seeding
from genfast.distributed import World
from genfast.errors import GenfastError
from genfast.families.base import Sampler
from genfast.seeding import MAX_SEED, NOISE_BLOCK
from genfast.train import _epoch_order, _seed_step

WIDTH = 64  # noise values per image in these tests


def noise_of(n: int, seed: int, start: int = 0) -> torch.Tensor:
    return Sampler(fn=None, noise_shape=(WIDTH,), image_shape=(1, 8, 8)).noise(n, seed, start)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_100000_rows_of_one_seed_are_distinct_standard_normal_draws():
    rows = noise_of(100_000, seed=5)
    assert len(set(images.digests(rows))) == len(rows)
    values = rows.double().flatten()
    n = len(values)
    # Sampling error of the mean is 1/sqrt(n), of the variance sqrt(2/n): allow 5 of each.
    assert abs(float(values.mean())) < 5 / math.sqrt(n)
    assert abs(float(values.var()) - 1) < 5 * math.sqrt(2 / n)
    # Each image's values are independent too: no correlation between neighbouring coordinates.
    assert abs(correlation(rows[:, :-1], rows[:, 1:])) < 5 / math.sqrt(rows[:, 1:].numel())


@pytest.mark.parametrize("block", [1, 2, 255, 2**20])
def test_block_k_is_uncorrelated_with_block_0(block: int):
    first = noise_of(NOISE_BLOCK, seed=5)
    other = noise_of(NOISE_BLOCK, seed=5, start=block * NOISE_BLOCK)
    bound = 5 / math.sqrt(first.numel())  # 5 standard errors of a correlation of independent draws
    assert abs(correlation(first, other)) < bound
    # and no row of one is a row of the other (a shifted repeat would be)
    assert not set(images.digests(first)) & set(images.digests(other))


def test_first_blocks_of_different_seeds_are_uncorrelated():
    seeds = [0, 1, 2, 2**31, MAX_SEED]
    blocks = {seed: noise_of(NOISE_BLOCK, seed) for seed in seeds}
    bound = 5 / math.sqrt(NOISE_BLOCK * WIDTH)
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            assert abs(correlation(blocks[a], blocks[b])) < bound, (a, b)


def test_the_first_block_of_a_seed_is_what_it_always_was():
    """Images of n <= 256 for a seed are those of every earlier release."""
    for seed in (0, 7, MAX_SEED):
        expected = torch.randn(NOISE_BLOCK, WIDTH, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise_of(NOISE_BLOCK, seed), expected)


def test_seeds_outside_the_range_are_refused():
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(GenfastError, match="seed must be between 0 and"):
            noise_of(4, seed)


def test_derived_streams_are_reproducible_and_distinct():
    def draw(*key, purpose="p"):
        return torch.randn(16, generator=seeding.generator(key[0], purpose, *key[1:]))

    assert torch.equal(draw(3, 1, 0), draw(3, 1, 0))
    distinct = [draw(3, 1, 0), draw(3, 1, 1), draw(3, 2, 0), draw(4, 1, 0), draw(3, 1, 0, purpose="q"),
                # the old `seed * 1_000_003 + step` made these two one stream
                draw(0, 1_000_003, 0), draw(1, 0, 0),
                # and `rank << 40` vanished in torch's 32 bits: these were rank 0's
                draw(0, 5, 1), draw(0, 5, 0)]
    assert len(set(images.digests(torch.stack(distinct)))) == len(distinct)


def test_a_derived_cpu_stream_is_mt19937_run_from_the_derived_words():
    """The 624 words land where torch's generator reads them: torch's draws are those of
    NumPy's MT19937 given the same state (torch's random_ takes two 32-bit outputs per value,
    the second one's low bits for a range below 2^31)."""
    words = np.random.SeedSequence(9, spawn_key=(zlib.crc32(b"p"), 4)).generate_state(624, np.uint32)
    mt = np.random.MT19937()
    state = mt.state
    state["state"] = {"key": words, "pos": 624}
    mt.state = state
    expected = (mt.random_raw(16)[1::2] % 2**31).tolist()
    drawn = torch.empty(8, dtype=torch.int64).random_(0, 2**31, generator=seeding.generator(9, "p", 4))
    assert drawn.tolist() == expected


def test_each_process_of_a_training_run_draws_its_own_noise_and_dropout():
    cpu = torch.device("cpu")

    def step_draws(seed, step, rank):
        generator = _seed_step(seed, step, rank, cpu)
        return torch.cat([torch.randn(32, generator=generator), torch.rand(32)])  # noise, then dropout's generator

    assert torch.equal(step_draws(0, 10, 1), step_draws(0, 10, 1))
    draws = [step_draws(0, 10, 0), step_draws(0, 10, 1), step_draws(0, 11, 0), step_draws(1, 10, 0),
             step_draws(MAX_SEED, 10, 0)]
    assert len(set(images.digests(torch.stack(draws)))) == len(draws)


def test_epoch_orders_are_distributedsamplers_split_and_never_repeat_across_seeds():
    one, two = World(rank=0, size=1, local_rank=0), [World(rank=r, size=2, local_rank=r) for r in (0, 1)]
    whole = _epoch_order(101, seed=3, epoch=4, here=one)
    assert sorted(whole.tolist()) == list(range(101))
    halves = [_epoch_order(101, seed=3, epoch=4, here=w) for w in two]
    assert torch.equal(torch.stack(halves, 1).flatten(), whole[:100])  # rows r, r+2, ... of one order
    # `seed * 1_000_003 + epoch` gave (0, 1_000_003) and (1, 0) one order
    assert not torch.equal(_epoch_order(101, 0, 1_000_003, one), _epoch_order(101, 1, 0, one))


def test_eval_refuses_an_fid_over_repeated_noise(tiny_gan, tiny_classifier, monkeypatch):
    sampler = genfast.load(tiny_gan)
    honest = metrics.evaluate(sampler, n=64, classifier=str(tiny_classifier), progress=False)
    assert honest["distinct_images"] == 64

    def repeating(self, n, seed, start=0):  # the old bug, in small: a stream that repeats every 16 rows
        return torch.randn(16, *self.noise_shape, generator=torch.Generator().manual_seed(seed)).repeat(4, 1)[:n]

    monkeypatch.setattr(Sampler, "noise", repeating)
    with pytest.raises(GenfastError, match="48 of its first 64 rows are copies"):
        metrics.evaluate(sampler, n=64, classifier=str(tiny_classifier), progress=False)


@pytest.mark.slow
def test_fid_of_block_noise_agrees_with_one_torch_stream():
    """4,096 images from the block noise and from a single torch.randn stream are samples of
    one distribution: their FIDs against 4,096 test images agree within the bootstrap spread
    (the noise that repeated every 256 images fails it)."""
    if data.find("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not installed")
    sampler = genfast.load("gan-fashion-mnist")
    judge = metrics.load_judge("fashion-mnist")
    n = 4096
    real = judge.embed(metrics._batches(data.load("fashion-mnist", "test").images[:n], 1024), n, "",
                       progress=False)[0]

    def features_of(noise):
        return judge.embed([sampler(noise[i:i + 1024]) for i in range(0, len(noise), 1024)], len(noise), "",
                           progress=False)[0]

    block = features_of(sampler.noise(n, seed=1))
    stream = features_of(torch.randn(n, *sampler.noise_shape, generator=torch.Generator().manual_seed(12345)))
    fids = [metrics.frechet_distance(real, f) for f in (block, stream)]
    spread = math.hypot(metrics.bootstrap_fid_std(real, block), metrics.bootstrap_fid_std(real, stream))
    assert abs(fids[0] - fids[1]) < 3 * spread, (fids, spread)


def test_sample_600_into_a_folder_makes_600_different_images(tiny_gan, tmp_path, capsys):
    from PIL import Image

    from test_cli import run

    status, _, err = run(capsys, "sample", tiny_gan, "-n", 600, "--seed", 5, "--out", tmp_path / "imgs", "-q")
    assert status == 0, err
    files = sorted((tmp_path / "imgs").glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in files])
    assert len(files) == 600 and len(set(images.digests(pixels))) == 600
    made = images.to_uint8(genfast.load(tiny_gan).generate(600, seed=5))  # what the Python API makes
    assert torch.equal(pixels, made[:, 0])
    record = json.loads((tmp_path / "imgs" / "manifest.json").read_text())["shards"][0]
    assert record["count"] == record["distinct"] == 600
