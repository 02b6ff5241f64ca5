"""Write RELION 3.1 particle sets: ``.mrcs`` stacks (mrcfile) and a STAR file (starfile).

The STAR file has two blocks, ``data_optics`` (one optics group) and ``data_particles``;
``rlnImageName`` is ``i@path`` with ``i`` counted from 1 and ``path`` relative to the STAR
file's folder (RELION resolves it so). Stacks are MRC image stacks (``ispg = 0``, mode 2
float32 or mode 12 float16) with the pixel size as voxel size, written through plain file
writes batch by batch (memory stays flat) and finished with their header statistics.

Usage::

    with MrcsStackWriter("out/train_stacks/train_0000.mrcs", n_images=1000, size=128,
                         pixel_size=0.8, dtype="float32", label="xrai shard <key>") as w:
        w.write(0, images_batch)                  # (B, 128, 128) numpy, rows = y
    write_star("out/train.star", optics_row, particles_dataframe)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from xrai.errors import XraiError
from xrai.io import atomic_path

#: MRC header bytes (no extended header in the stacks written here)
_HEADER_BYTES = 1024
_MODES = {"float32": (2, np.float32), "float16": (12, np.float16)}


class MrcsStackWriter:
    """A ``.mrcs`` stack of ``n_images`` ``size`` × ``size`` images, written atomically batch by batch."""

    def __init__(self, path: str | os.PathLike, n_images: int, size: int, pixel_size: float,
                 dtype: str = "float32", label: str = "") -> None:
        if dtype not in _MODES:
            raise XraiError(f"config key 'simulation.dtype': {dtype!r} is not an MRC mode; expected float32 or float16")
        self.path, self.n, self.size, self.pixel_size, self.label = Path(path), n_images, size, pixel_size, label
        self.mode, self.dtype = _MODES[dtype]
        self.written = 0
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares (float64)

    def __enter__(self) -> MrcsStackWriter:
        import mrcfile

        self._atomic = atomic_path(self.path)
        self.tmp = self._atomic.__enter__()
        with mrcfile.new_mmap(self.tmp, shape=(self.n, self.size, self.size), mrc_mode=self.mode, overwrite=True) as mrc:
            mrc.set_image_stack()
        self._fh = open(self.tmp, "r+b")
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Write images ``[start, start + len(images))`` (rows = y, columns = x)."""
        arr = np.ascontiguousarray(images, dtype=self.dtype)
        if arr.shape[1:] != (self.size, self.size) or start + len(arr) > self.n:
            raise XraiError(f"{self.path}: images {arr.shape} at {start} do not fit a stack of {self.n} x {self.size}^2")
        if self.dtype == np.float16 and not np.isfinite(arr).all():
            raise XraiError(f"{self.path}: values beyond float16's range (up to {float(np.abs(images).max()):.3g}); "
                            "use simulation.dtype float32")
        self._fh.seek(_HEADER_BYTES + start * self.size * self.size * arr.itemsize)
        self._fh.write(arr.tobytes())
        a = arr.astype(np.float64)
        s = self._stats
        s[0], s[1] = min(s[0], float(a.min())), max(s[1], float(a.max()))
        s[2] += float(a.sum())
        s[3] += float((a * a).sum())
        self.written += len(arr)

    def __exit__(self, exc_type, exc, tb) -> None:
        import mrcfile

        self._fh.close()
        if exc_type is None:
            if self.written != self.n:
                exc = XraiError(f"{self.path}: {self.written} of {self.n} images written")
            else:
                count = self.n * self.size * self.size
                mean = self._stats[2] / count
                with mrcfile.mmap(self.tmp, mode="r+") as mrc:  # header only: the data pages are not read
                    mrc.voxel_size = self.pixel_size
                    h = mrc.header
                    h.dmin, h.dmax, h.dmean = self._stats[0], self._stats[1], mean
                    h.rms = float(np.sqrt(max(self._stats[3] / count - mean * mean, 0.0)))
                    if self.label:
                        h.label[0] = self.label.encode()[:80]
                        h.nlabl = 1
        if exc is not None:
            with contextlib.suppress(BaseException):
                self._atomic.__exit__(type(exc), exc, None)
            raise exc
        self._atomic.__exit__(None, None, None)


def stack_label(path: str | os.PathLike) -> str | None:
    """The first header label of an MRC stack (``None`` when the file is missing or unreadable)."""
    import mrcfile

    try:
        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            return mrc.header.label[0].decode(errors="replace").strip() if mrc.header.nlabl else ""
    except (OSError, ValueError):
        return None


def image_names(stack: str, n_images: int) -> list[str]:
    """``['000001@stack', '000002@stack', ...]``: RELION's 1-based ``rlnImageName`` of a stack's images."""
    width = max(6, len(str(n_images)))
    return [f"{i:0{width}d}@{stack}" for i in range(1, n_images + 1)]


def write_star(path: str | os.PathLike, optics: dict, particles) -> None:
    """Write a RELION 3.1 STAR file (``data_optics`` with one row ``optics``, ``data_particles``) atomically."""
    import pandas as pd
    import starfile

    with atomic_path(path) as tmp:
        starfile.write({"optics": pd.DataFrame([optics]), "particles": particles}, tmp, overwrite=True)
