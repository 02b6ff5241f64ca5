"""Per-image random streams of the simulators: the same image gets the same draws whatever the batch size,
the sharding or the number of images (both modalities share them, so image ``i`` of a split has the
same orientation in an X-ray and a cryo-EM set of one seed).

Each stream is a SplitMix64 counter: ``(seed, split, stream)`` gives a base, and image ``i`` (or an
orientation block) the mixed value of ``base + i``. Streams: 1 orientations, 2 Poisson counts,
3 fluence jitter; the test split has its own bases.

Usage::

    from xrai.random_streams import image_seeds, orientations_for
    q = orientations_for(seed=0, split="train", start=4000, stop=4200)   # (200, 4), float64
    seeds = image_seeds(0, "train", 2, 4000, 4200)                          # one uint64 per image
"""

from __future__ import annotations

import numpy as np
import torch

from xrai.rotations import random_quaternions

#: Orientations are drawn in blocks of this many images, each from its own seed.
ORIENTATION_BLOCK = 4096
#: mixed into the test split's stream bases
TEST_TAG = 0x7E57_5EED


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (SplitMix64 finaliser): well-spread seeds from counters."""
    z = (np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_base(seed: int, split: str, stream: int) -> int:
    """The base value of random stream ``stream`` of ``split`` (``test`` or any training split)."""
    tag = TEST_TAG if split == "test" else 0
    return int(splitmix64(np.uint64(seed) ^ np.uint64(tag) ^ (np.uint64(stream) << np.uint64(56))))


def torch_seed(x: int | np.uint64) -> int:
    """A stream value as a ``torch.Generator`` seed (``manual_seed`` wants < 2**63)."""
    return int(np.uint64(x) >> np.uint64(1))


def orientations_for(seed: int, split: str, start: int, stop: int) -> torch.Tensor:
    """Uniform random unit quaternions (w, x, y, z), float64 ``(stop - start, 4)``, of images ``[start, stop)``.

    Image ``i`` gets the same orientation whatever the batch size or the total count.
    """
    base = stream_base(seed, split, 1)
    out = []
    for block in range(start // ORIENTATION_BLOCK, (stop - 1) // ORIENTATION_BLOCK + 1):
        gen = torch.Generator().manual_seed(torch_seed(splitmix64(np.uint64(base) + np.uint64(block))))
        q = random_quaternions(ORIENTATION_BLOCK, generator=gen)
        b0 = block * ORIENTATION_BLOCK
        out.append(q[max(start, b0) - b0: min(stop, b0 + ORIENTATION_BLOCK) - b0])
    return torch.cat(out)


def image_seeds(seed: int, split: str, stream: int, start: int, stop: int) -> np.ndarray:
    """One seed per image ``[start, stop)`` of a random stream (2: Poisson, 3: fluence jitter)."""
    base = np.uint64(stream_base(seed, split, stream))
    return splitmix64(base + np.arange(start, stop, dtype=np.uint64))
