"""Every random stream genfast draws, derived from a seed in one place, without collisions.

Seeds are never combined by arithmetic (`seed + (j << 32)`, `seed * 1_000_003 + step`):
PyTorch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so such sums
collide or vanish (block j of a seed's noise was block 0 again, and every process of a
run drew rank 0's noise). Two derivations instead:

- **Sampling noise** (`noise_block`): block j of a seed (NOISE_BLOCK images) comes from
  NumPy's Philox4x64 keyed with the pair (seed, j) itself. Philox is a counter-based
  generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): its
  128-bit key holds every pair a user can ask for (seeds below 2^32, blocks below 2^96)
  exactly, so no two pairs share a stream, and a block costs the same whichever it is,
  which is what lets any range of images be drawn without the rows before it. Block 0
  stays torch's `manual_seed(seed)` stream: the first 256 images of a seed are those of
  every earlier release (docs, tests, what users have made), at no cost.
- **Every other stream** (a training step's noise and dropout per process, an epoch's data
  order, evaluation's picks): `np.random.SeedSequence(seed, spawn_key=(purpose, *numbers))`,
  NumPy's hash for independent parallel streams, fills a torch.Generator's whole state: all
  624 words of mt19937 on the CPU (a 32-bit seed could name only 2^32 streams), the 64-bit
  Philox seed on CUDA.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from genfast.errors import GenfastError

MAX_SEED = 2**32 - 1
# A seed's noise comes in blocks of this many images, each its own stream (see above).
NOISE_BLOCK = 256

# torch's CPU generator state (CPUGeneratorImplState, get_state/set_state): the_initial_seed
# (u64), left and seeded (i32), next (u64), then mt19937's 624 words, one per u64, then the
# cached normals. Stable since torch 1.x; checked whenever a state is written.
_MT_WORDS = 624
_MT_STATE_BYTES = 5056
_MT_HEADER = struct.Struct("<QiiQ")


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise GenfastError(f"seed must be between 0 and {MAX_SEED} (a whole number), got {seed!r:.40}")


def noise_block(seed: int, block: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The standard normal noise of images block*NOISE_BLOCK .. +NOISE_BLOCK-1 of `seed`."""
    size = (NOISE_BLOCK, *shape)
    if block == 0:
        return torch.randn(size, generator=torch.Generator().manual_seed(seed))
    philox = np.random.Philox(key=seed | block << 32)
    return torch.from_numpy(np.random.Generator(philox).standard_normal(size, dtype=np.float32))


def _sequence(seed: int, purpose: str, numbers: tuple[int, ...]) -> np.random.SeedSequence:
    # crc32 turns the purpose into a number: streams of different purposes never coincide.
    return np.random.SeedSequence(seed, spawn_key=(zlib.crc32(purpose.encode()), *numbers))


def seed_generator(generator: torch.Generator, seed: int, purpose: str, *numbers: int) -> torch.Generator:
    """Put `generator` at the start of the stream of (seed, purpose, *numbers); returns it."""
    sequence = _sequence(seed, purpose, numbers)
    if generator.device.type != "cpu":  # CUDA's Philox takes a 64-bit seed
        return generator.manual_seed(int(sequence.generate_state(1, np.uint64)[0]))
    state = bytearray(generator.get_state().numpy().tobytes())
    if len(state) != _MT_STATE_BYTES:
        raise RuntimeError(f"this torch's CPU generator state is {len(state)} bytes, not the {_MT_STATE_BYTES} "
                           "genfast knows; report the torch version")
    words = sequence.generate_state(_MT_WORDS, np.uint32).astype("<u8")
    # left = 1: the next draw twists the new words first, as after manual_seed; no cached normals.
    _MT_HEADER.pack_into(state, 0, seed, 1, 1, 0)
    state[_MT_HEADER.size:_MT_HEADER.size + 8 * _MT_WORDS] = words.tobytes()
    state[_MT_HEADER.size + 8 * _MT_WORDS:] = bytes(len(state) - _MT_HEADER.size - 8 * _MT_WORDS)
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8))
    return generator


def generator(seed: int, purpose: str, *numbers: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch.Generator on `device` at the start of the stream of (seed, purpose, *numbers)."""
    return seed_generator(torch.Generator(device), seed, purpose, *numbers)


def seed_global(device: torch.device, seed: int, purpose: str, *numbers: int) -> None:
    """The same for the global generators that layers such as dropout draw from: the CPU's
    and, on a GPU, that device's."""
    seed_generator(torch.default_generator, seed, purpose, *numbers)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        seed_generator(torch.cuda.default_generators[index], seed, purpose, *numbers)
