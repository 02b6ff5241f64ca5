"""``BlockDataset``: the one-pass order (sequential / shuffled / resumed) shared by every dataset reader.

A reader subclasses it and provides ``n_images``, ``image_shape``, ``block_rows`` (rows of
one read unit), ``shuffle_buffer_mb`` and ``_read_rows(start, stop)`` (a dict of numpy
arrays, one row per image, NaN-checked). The order of a pass:

* sequential: contiguous runs of whole blocks, about ``SEQUENTIAL_READ_MB`` per read, in file order;
* shuffled: the order of the blocks is shuffled, consecutive blocks are gathered into a
  bounded window (``shuffle_buffer_mb``) and shuffled within it. The order is a pure function
  of ``(seed, epoch)``, memory stays flat whatever the dataset size, and ``skip`` batches are
  skipped without reading them (resume after a checkpoint).

Usage::

    class MyReader(BlockDataset):
        def _read_rows(self, start, stop):
            return {"images": ...}            # (stop - start, H, W) float32
    for batch in MyReader(...).iter_batches(64, shuffle=True, seed=0, epoch=3):
        batch["images"], batch["index"]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from xrai.errors import XraiError

#: Target size of one sequential read.
SEQUENTIAL_READ_MB = 64.0


def _shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    # a distinct, reproducible stream for every (seed, epoch)
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1))


class BlockDataset:
    """Base of the dataset readers: one pass in batches over blocks of ``block_rows`` images."""

    path: Path
    n_images: int
    image_shape: tuple[int, int]
    block_rows: int
    shuffle_buffer_mb: float

    def _err(self, msg: str) -> XraiError:
        return XraiError(f"{self.path}: {msg}")

    def _check_finite(self, images: np.ndarray | torch.Tensor, start: int, stop: int) -> None:
        """Refuse NaN / inf images, naming the first bad image of rows ``[start, stop)``."""
        finite = np.isfinite(np.asarray(images).reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            raise self._err(f"images [{start}, {stop}) contain NaN or infinite values "
                            f"(first bad image: {start + int(np.flatnonzero(~finite)[0])})")

    def _read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (they reopen on the next read)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_images

    @property
    def image_bytes(self) -> int:
        """Bytes of one image as float32 in memory."""
        return 4 * self.image_shape[0] * self.image_shape[1]

    def _blocks(self, rows: int) -> list[tuple[int, int]]:
        return [(s, min(s + rows, self.n_images)) for s in range(0, self.n_images, rows)]

    def _windows(self, shuffle: bool, seed: int, epoch: int) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor | None]]:
        """The pass as windows: (blocks to read, permutation of the window's rows or None), lazily."""
        if not shuffle:
            # whole blocks, about SEQUENTIAL_READ_MB per read
            per_read = max(1, int(SEQUENTIAL_READ_MB * 2**20 // (self.image_bytes * self.block_rows)))
            for b in self._blocks(self.block_rows * per_read):
                yield [b], None
            return
        gen = _shuffle_generator(seed, epoch)
        blocks = self._blocks(self.block_rows)
        order = torch.randperm(len(blocks), generator=gen).tolist()
        per_window = max(2, int(self.shuffle_buffer_mb * 2**20 // (self.image_bytes * self.block_rows)))
        for w0 in range(0, len(order), per_window):
            wb = [blocks[i] for i in order[w0:w0 + per_window]]
            n = sum(b - a for a, b in wb)
            yield wb, torch.randperm(n, generator=gen)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the dataset in batches (see the module docstring for the order).

        Yields dicts like the reader's ``read`` (``index`` gives each image's position in the
        dataset). ``skip`` batches at the start are skipped without reading them; the order is
        the same as without skipping. ``drop_last`` drops a final batch smaller than ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        to_skip = int(skip) * int(batch_size)
        carry: dict[str, np.ndarray] | None = None
        for blocks, perm in self._windows(shuffle, seed, epoch):
            n_win = sum(b - a for a, b in blocks)
            if to_skip >= n_win:  # skip whole windows without reading them
                to_skip -= n_win
                continue
            data = [self._read_rows(a, b) | {"index": np.arange(a, b)} for a, b in blocks]
            win = {k: np.concatenate([d[k] for d in data]) if len(data) > 1 else data[0][k] for k in data[0]}
            if perm is not None:
                p = perm.numpy()
                win = {k: v[p] for k, v in win.items()}
            if to_skip:
                win = {k: v[to_skip:] for k, v in win.items()}
                to_skip = 0
            if carry is not None:
                win = {k: np.concatenate([carry[k], win[k]]) for k in win}
                carry = None
            n = len(win["index"])
            full = n - n % batch_size
            for s in range(0, full, batch_size):
                yield self._to_torch({k: v[s:s + batch_size] for k, v in win.items()})
            if full < n:
                carry = {k: v[full:] for k, v in win.items()}
        if carry is not None and not drop_last:
            yield self._to_torch(carry)

    @staticmethod
    def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        out["index"] = out["index"].long()
        return out

    def n_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches in one pass."""
        return self.n_images // batch_size if drop_last else -(-self.n_images // batch_size)
