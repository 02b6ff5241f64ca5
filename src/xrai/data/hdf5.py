"""``DiffractionDataset``: the one reader of every diffraction dataset.

It reads the HDF5 files written by :mod:`xrai.xray.simulate` (one file, or a master
file whose datasets are HDF5 *virtual datasets* over several shard files) and
HDF5 files written by other tools with the same keys (e.g. skopi scripts):

* ``images``: ``(N, H, W)`` (or ``(N, 1, H, W)``: one detector panel), float16/32/64 or integer photons;
* ``orientations``: ``(N, 4)`` unit quaternions ``(w, x, y, z)``;
* ``pixel_position_reciprocal``: ``(H, W, 3)`` (or ``(1, H, W, 3)``) in Angstrom^-1 without 2*pi;
  a file whose dataset has ``units = '1/m'``, or no ``units`` and values above 100 (so
  evidently m^-1, skopi's unit), is converted with a warning;
* optional ``mask``: ``(H, W)`` bool/int, nonzero = a pixel to use (beam stop, gaps and bad
  pixels are 0); :attr:`DiffractionDataset.mask` is all True without it.

Everything is checked when the file is opened (clear :class:`~xrai.errors.XraiError`
naming the file), including a sample of the images (:func:`check_photon_totals`: not all
zero, not constant, totals as the stored ``scale`` implies); NaN / inf images are reported
with the index range of the batch. :meth:`DiffractionDataset.fingerprint` identifies the
contents (checkpoints record it).

Order of a pass (:meth:`DiffractionDataset.iter_batches`):

* sequential: contiguous blocks of whole HDF5 chunks, read once in file order;
* shuffled: the order of the blocks is shuffled, consecutive blocks are gathered into
  a bounded window (``shuffle_buffer_mb``) and shuffled within it. The order is a pure
  function of ``(seed, epoch)``, memory stays flat whatever the dataset size, and
  ``skip`` batches are skipped without reading them (resume after a checkpoint).

Usage::

    from xrai.data.hdf5 import DiffractionDataset
    ds = DiffractionDataset("results/datasets/2CEX_A/train_2048.h5")
    print(len(ds), ds.image_shape, ds.pixel_position_reciprocal.shape)
    first = ds.read(0, 8)                  # {'images': (8, H, W), 'orientations': (8, 4), 'index': (8,)}
    for batch in ds.iter_batches(64, shuffle=True, seed=0, epoch=3):
        ...
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "orientations", "pixel_position_reciprocal")
#: Rows per read when the file does not say (no chunks, no ``chunk_rows`` attribute).
DEFAULT_BLOCK_ROWS = 256
#: Target size of one sequential read.
SEQUENTIAL_READ_MB = 64.0
#: images read at open from each end of the file for :func:`check_photon_totals` and the fingerprint
SAMPLE_IMAGES = 4
#: Poisson tolerance of the photon totals, in standard deviations
TOTAL_SIGMAS = 6.0
#: relative tolerance of the photon totals (float16 storage rounds each pixel by up to 2^-11)
TOTAL_RTOL = 1e-2


def _shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    # a distinct, reproducible stream for every (seed, epoch)
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**63 - 1))


def _totals_checkable(attrs: dict) -> float | None:
    """``simulation.min_total_intensity`` of a file whose photon totals follow from it, else None.

    Files from other tools (no ``scaling``), and files whose images carry more than the scaled
    patterns (a background, a fluence jitter, another scaling mode) are not checked.
    """
    scaling = attrs.get("scaling")
    if not isinstance(scaling, dict) or "min_total_intensity" not in scaling:
        return None
    if scaling.get("mode") not in (None, "min_total"):
        return None
    for key, value in {**attrs, **scaling}.items():
        if ("background" in key or "jitter" in key) and value not in (None, False, 0, 0.0, "none", {}, []):
            return None
    return float(scaling["min_total_intensity"])


def check_photon_totals(path: str | os.PathLike, images: np.ndarray, scale: np.ndarray | None, attrs: dict,
                        *, all_pixels: bool = True, index: np.ndarray | None = None) -> None:
    """Refuse sampled ``images`` that cannot be what the file says (XraiError naming ``path``).

    * all zero, or one constant value: no diffraction pattern (e.g. overwritten);
    * with the simulator's scaling (``attrs['scaling']``) and a per-image ``scale``: an image
      scaled up (``scale > 1``) holds ``min_total_intensity`` photons, one left alone at least
      that many, within the Poisson error (``TOTAL_SIGMAS`` sigma) when noise is on. Skipped
      for files without ``scale``, with a background or jitter, or a mask (``all_pixels`` False).

    ``index`` gives the sampled images' positions in the file (for the message).

    >>> check_photon_totals("x.h5", np.zeros((2, 4, 4)), None, {})
    Traceback (most recent call last):
    xrai.errors.XraiError: x.h5: every image checked (2, from both ends of the file) is all zero; ...
    """
    imgs = np.asarray(images, dtype=np.float64)
    n = len(imgs)
    if not imgs.any():
        raise XraiError(f"{path}: every image checked ({n}, from both ends of the file) is all zero; "
                        "the dataset holds no photons (overwritten or never filled?)")
    if (imgs == imgs.flat[0]).all():
        raise XraiError(f"{path}: every image checked ({n}, from both ends of the file) has the one constant value "
                        f"{imgs.flat[0]:g}; that is no diffraction pattern (overwritten or corrupt?)")
    min_total = _totals_checkable(attrs)
    if min_total is None or scale is None or not all_pixels:
        return
    noise = isinstance(attrs.get("scaling"), dict) and bool(attrs["scaling"].get("poisson_noise", False))
    tol = TOTAL_RTOL * min_total + (TOTAL_SIGMAS * np.sqrt(min_total) if noise else 0.0)
    totals = imgs.sum(axis=(1, 2))
    index = np.arange(n) if index is None else np.asarray(index)
    for i, total, s in zip(index, totals, np.asarray(scale, dtype=np.float64), strict=True):
        scaled_up = s > 1.0 + 1e-6
        if total < min_total - tol or (scaled_up and total > min_total + tol):
            implied = f"{min_total:g}" if scaled_up else f"at least {min_total:g}"
            raise XraiError(
                f"{path}: image {int(i)} holds {total:.6g} photons where its scale {s:.6g} and the file's "
                f"min_total_intensity imply {implied} (tolerance {tol:.3g}); the images do not match the "
                "file's scale and geometry (overwritten or corrupt?)")


class DiffractionDataset:
    """Read one diffraction dataset (HDF5), in order or shuffled, in chunk-sized blocks.

    Attributes set at open: ``path``, ``n_images``, ``image_shape`` ``(H, W)``,
    ``pixel_position_reciprocal`` (torch float32 ``(H, W, 3)``, Angstrom^-1),
    ``attrs`` (file attributes; JSON strings decoded), ``block_rows`` (rows per read unit),
    ``image_dtype`` (numpy dtype on disk). The HDF5 file is opened lazily in each process,
    so a dataset object can be handed to worker processes.
    """

    def __init__(self, path: str | os.PathLike, *, shuffle_buffer_mb: float = 256.0):
        self.path = Path(path)
        self.shuffle_buffer_mb = float(shuffle_buffer_mb)
        self._file = None
        self._pid: int | None = None
        self._image_squeeze = False
        self._validate()

    # ---------------------------------------------------------------- opening
    def _err(self, msg: str) -> XraiError:
        return XraiError(f"{self.path}: {msg}")

    def _open(self):
        import h5py

        if self._file is not None and self._pid == os.getpid():
            return self._file
        if not self.path.exists():
            raise self._err("dataset file not found")
        try:
            # a roomy chunk cache: shuffled windows revisit the chunks they span
            self._file = h5py.File(self.path, "r", rdcc_nbytes=64 * 2**20)
        except OSError as exc:
            raise self._err(f"not a readable HDF5 file ({exc})") from None
        self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close the HDF5 handle (it reopens on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> DiffractionDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def _validate(self) -> None:
        f = self._open()
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise self._err(f"not a diffraction dataset: missing {missing} (has {sorted(f.keys())})")
        images, orient, ppr = f["images"], f["orientations"], f["pixel_position_reciprocal"]
        self._check_virtual_sources(images)

        shape = images.shape
        if len(shape) == 4 and shape[1] == 1:
            self._image_squeeze = True
            shape = (shape[0], shape[2], shape[3])
        if len(shape) != 3:
            raise self._err(f"'images' must have shape (N, H, W), got {images.shape}")
        if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
            raise self._err(f"'images' must be floating point or integer photons, got dtype {images.dtype}")
        n, h, w = shape
        if n == 0:
            raise self._err("'images' is empty")
        if orient.shape != (n, 4):
            raise self._err(f"'orientations' must have shape ({n}, 4) (w, x, y, z per image), got {orient.shape}")
        if not np.issubdtype(orient.dtype, np.floating):
            raise self._err(f"'orientations' must be floating point, got dtype {orient.dtype}")

        q = np.asarray(ppr[...], dtype=np.float64)
        if q.ndim == 4 and q.shape[0] == 1:
            q = q[0]
        if q.shape != (h, w, 3):
            raise self._err(f"'pixel_position_reciprocal' must have shape ({h}, {w}, 3) to match the images, got {ppr.shape}")
        if not np.isfinite(q).all():
            raise self._err("'pixel_position_reciprocal' contains NaN or infinite values")
        units = ppr.attrs.get("units", None)
        units = units.decode() if isinstance(units, bytes) else units
        if units == "1/m" or (units is None and np.abs(q).max() > 100.0):
            logger.warning("%s: pixel_position_reciprocal looks like m^-1 (skopi's unit); converting to Angstrom^-1", self.path)
            q = q * 1e-10

        self.n_images = int(n)
        self.image_shape = (int(h), int(w))
        self.image_dtype = images.dtype
        self.pixel_position_reciprocal = torch.from_numpy(q).float()
        self.attrs = {k: self._decode_attr(v) for k, v in f.attrs.items()}
        chunks = images.chunks
        rows = chunks[0] if chunks else int(f.attrs.get("chunk_rows", DEFAULT_BLOCK_ROWS))
        self.block_rows = max(1, min(int(rows), self.n_images))
        self.has_scale = "scale" in f and f["scale"].shape == (n,)
        # pixels to use (True) in every loss, merge and metric; beam stop, gaps and bad pixels are False
        if "mask" in f:
            if f["mask"].shape != (h, w):
                raise self._err(f"'mask' must have shape ({h}, {w}) to match the images, got {f['mask'].shape}")
            self.mask = torch.from_numpy(np.asarray(f["mask"][...]).astype(bool))
            if not bool(self.mask.any()):
                raise self._err("'mask' excludes every pixel")
        else:
            self.mask = torch.ones((int(h), int(w)), dtype=torch.bool)
        self._sample = self._sample_rows()
        check_photon_totals(self.path, self._sample["images"], self._sample.get("scale"), self.attrs,
                            all_pixels=bool(self.mask.all()), index=self._sample["index"])

    def _sample_rows(self) -> dict[str, np.ndarray]:
        """The first and last :data:`SAMPLE_IMAGES` images (with orientations, scale, index): two chunks at most."""
        k = min(SAMPLE_IMAGES, self.n_images)
        sample = self._read_rows(0, k)
        index = np.arange(k)
        tail = max(k, self.n_images - k)
        if tail < self.n_images:
            last = self._read_rows(tail, self.n_images)
            sample = {key: np.concatenate([sample[key], last[key]]) for key in sample}
            index = np.r_[index, np.arange(tail, self.n_images)]
        sample["index"] = index
        return sample

    def fingerprint(self) -> str:
        """sha256 of what identifies the contents: shapes, dtype, attributes (less provenance) and the
        first and last images with their orientations and scales. A re-simulated or edited file differs.

        >>> DiffractionDataset("train_2048.h5").fingerprint()[:12]       # doctest: +SKIP
        '3f1c0e9a72b4'
        """
        import hashlib

        attrs = {k: v for k, v in self.attrs.items() if k != "provenance"}
        head = json.dumps({"n": self.n_images, "shape": self.image_shape, "dtype": str(self.image_dtype),
                           "attrs": attrs}, sort_keys=True, default=str)
        digest = hashlib.sha256(head.encode())
        for key in sorted(self._sample):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(self._sample[key]).tobytes())
        return digest.hexdigest()

    def _check_virtual_sources(self, dset) -> None:
        # h5py silently fills a missing shard with zeros: refuse instead
        if not getattr(dset, "is_virtual", False):
            return
        for src in dset.virtual_sources():
            name = src.file_name
            if name == ".":
                continue
            p = Path(name)
            if not p.is_absolute():
                p = self.path.parent / p
            if not p.exists():
                raise self._err(f"shard file {p} of this sharded dataset is missing")

    @staticmethod
    def _decode_attr(v):
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "{[":
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return v
        if isinstance(v, np.generic):
            return v.item()
        return v

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return f"DiffractionDataset({str(self.path)!r}, n={self.n_images}, shape={self.image_shape})"

    def read(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Images ``[start, stop)``: ``{'images': float32 (B, H, W), 'orientations': float32 (B, 4), 'index': int64 (B,)}``.

        Also ``'scale'`` (B,) when the file stores it. Raises XraiError on NaN / inf.
        """
        start, stop = max(0, int(start)), min(self.n_images, int(stop))
        if stop <= start:
            raise ValueError(f"empty range [{start}, {stop}) of a dataset of {self.n_images} images")
        f = self._open()
        imgs = f["images"][start:stop]
        if self._image_squeeze:
            imgs = imgs[:, 0]
        out = self._pack(imgs, f["orientations"][start:stop], np.arange(start, stop), f)
        self._check_finite(out["images"], start, stop)
        return out

    def true_rotations(self, index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Ground-truth rotation matrices ``(N, 3, 3)`` float64 of images ``index`` (all by default).

        Reads only the ``orientations`` dataset (16 bytes per image), never the images.
        Example: ``DiffractionDataset("test_10000.h5").true_rotations([0, 5])``.
        """
        from xrai.rotations import quaternion_to_matrix

        quats = torch.from_numpy(np.asarray(self._open()["orientations"][...], dtype=np.float64))
        if index is None:
            return quaternion_to_matrix(quats)
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.n_images):
            raise self._err(f"image index out of range [0, {self.n_images}) (poses written for another dataset?)")
        return quaternion_to_matrix(quats[index])

    def _pack(self, imgs: np.ndarray, orient: np.ndarray, index: np.ndarray, f) -> dict[str, torch.Tensor]:
        out = {
            "images": torch.from_numpy(np.ascontiguousarray(imgs, dtype=np.float32)),
            "orientations": torch.from_numpy(np.ascontiguousarray(orient, dtype=np.float32)),
            "index": torch.from_numpy(np.asarray(index, dtype=np.int64)),
        }
        if self.has_scale:
            lo, hi = int(index.min()), int(index.max()) + 1
            out["scale"] = torch.from_numpy(np.asarray(f["scale"][lo:hi], dtype=np.float32)[index - lo])
        return out

    def _check_finite(self, images: torch.Tensor, start: int, stop: int) -> None:
        if not torch.isfinite(images).all():
            bad = (~torch.isfinite(images.reshape(images.shape[0], -1))).any(dim=1).nonzero().flatten()
            raise self._err(
                f"images [{start}, {stop}) contain NaN or infinite values (first bad image: {start + int(bad[0])})")

    def _read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Raw block read as numpy (float32 images), NaN-checked."""
        f = self._open()
        imgs = f["images"][start:stop]
        if self._image_squeeze:
            imgs = imgs[:, 0]
        imgs = np.asarray(imgs, dtype=np.float32)
        if not np.isfinite(imgs).all():
            self._check_finite(torch.from_numpy(imgs), start, stop)
        block = {"images": imgs, "orientations": np.asarray(f["orientations"][start:stop], dtype=np.float32)}
        if self.has_scale:
            block["scale"] = np.asarray(f["scale"][start:stop], dtype=np.float32)
        return block

    # ---------------------------------------------------------------- one pass
    @property
    def image_bytes(self) -> int:
        """Bytes of one image as float32 in memory."""
        return 4 * self.image_shape[0] * self.image_shape[1]

    def _blocks(self, rows: int) -> list[tuple[int, int]]:
        return [(s, min(s + rows, self.n_images)) for s in range(0, self.n_images, rows)]

    def _windows(self, shuffle: bool, seed: int, epoch: int) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor | None]]:
        """The pass as windows: (blocks to read, permutation of the window's rows or None), lazily."""
        if not shuffle:
            # whole chunks, about SEQUENTIAL_READ_MB per read
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

        Yields dicts like :meth:`read` (``index`` gives each image's position in the file).
        ``skip`` batches at the start are skipped without reading them; the order is the
        same as without skipping. ``drop_last`` drops a final batch smaller than ``batch_size``.
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


class DatasetWriter:
    """Create one dataset file and fill it in batches, with the layout :class:`DiffractionDataset` reads.

    ``images`` are chunked in whole batches of ``chunk_rows``; ``orientations`` (float64),
    ``scale`` (float32), and the per-pixel ``pixel_position_reciprocal`` (float32, attr
    ``units='1/angstrom'``), ``polarization`` and ``solid_angle`` are stored beside them.
    Write to a temporary path (:func:`xrai.io.atomic_path`); the caller renames it.

    Usage::

        with atomic_path("x.h5") as tmp, DatasetWriter(tmp, 1000, (32, 32), pixel_position_reciprocal=q) as w:
            w.write(0, images, orientations, scale)
            w.set_attrs(seed=0)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_images: int,
        image_shape: tuple[int, int],
        *,
        pixel_position_reciprocal: torch.Tensor | np.ndarray,
        polarization: torch.Tensor | np.ndarray | None = None,
        solid_angle: torch.Tensor | np.ndarray | None = None,
        dtype: str = "float32",
        chunk_rows: int = DEFAULT_BLOCK_ROWS,
        compression: str = "none",
    ):
        import h5py

        if dtype not in ("float32", "float16"):
            raise XraiError(f"image dtype must be float32 or float16, got {dtype!r}")
        h, w = image_shape
        self.n_images = int(n_images)
        self.file = h5py.File(path, "w")
        comp = {} if compression in (None, "none") else {"compression": compression}
        if compression == "gzip":
            comp["compression_opts"] = 4
        rows = max(1, min(int(chunk_rows), self.n_images))
        self.images = self.file.create_dataset(
            "images", shape=(self.n_images, h, w), dtype=dtype, chunks=(rows, h, w), **comp)
        self.images.attrs["units"] = "photons"
        self.orientations = self.file.create_dataset("orientations", shape=(self.n_images, 4), dtype="float64")
        self.orientations.attrs["convention"] = "unit quaternion (w, x, y, z), w >= 0, k = R @ q_pixel"
        self.scale = self.file.create_dataset("scale", shape=(self.n_images,), dtype="float32")
        ppr = self.file.create_dataset("pixel_position_reciprocal", data=_np(pixel_position_reciprocal, np.float32))
        ppr.attrs["units"] = "1/angstrom"
        if polarization is not None:
            self.file.create_dataset("polarization", data=_np(polarization, np.float32))
        if solid_angle is not None:
            self.file.create_dataset("solid_angle", data=_np(solid_angle, np.float64)).attrs["units"] = "sr"
        self.file.attrs["chunk_rows"] = rows

    def write(self, start: int, images, orientations, scale=None) -> None:
        """Write images ``[start, start + len(images))`` with their orientations (and per-image scale)."""
        stop = start + len(images)
        self.images[start:stop] = _np(images, self.images.dtype)
        self.orientations[start:stop] = _np(orientations, np.float64)
        if scale is not None:
            self.scale[start:stop] = _np(scale, np.float32)

    def set_attrs(self, **attrs) -> None:
        """File attributes; dicts and lists are stored as JSON strings."""
        for k, v in attrs.items():
            self.file.attrs[k] = json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _np(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def write_dataset(
    path: str | os.PathLike,
    images,
    orientations,
    pixel_position_reciprocal,
    *,
    scale=None,
    attrs: dict | None = None,
    **writer_kwargs,
) -> None:
    """Write an in-memory dataset (small sets, tests) atomically with the standard layout."""
    from xrai.io import atomic_path

    images = _np(images, np.float32)
    with atomic_path(path) as tmp, DatasetWriter(
        tmp, len(images), images.shape[1:], pixel_position_reciprocal=pixel_position_reciprocal, **writer_kwargs
    ) as w:
        w.write(0, images, orientations, scale if scale is not None else np.ones(len(images)))
        w.set_attrs(**(attrs or {}))


def write_sharded_master(path: str | os.PathLike, shard_paths: list[str | os.PathLike], attrs: dict | None = None) -> None:
    """Write a master file whose ``images``, ``orientations``, ``scale`` are virtual datasets over the shards.

    The shards (same layout, written by :class:`DatasetWriter`) are referenced by paths
    relative to the master file, so the folder can be moved as a whole. Small per-pixel
    datasets are copied from the first shard. Missing shards read as NaN, which
    :class:`DiffractionDataset` refuses (it also checks that every shard exists).
    """
    import h5py

    from xrai.io import atomic_path

    master = Path(path)
    shards = [Path(p) for p in shard_paths]
    infos = []
    for p in shards:
        with h5py.File(p, "r") as f:
            infos.append({k: (f[k].shape, f[k].dtype) for k in ("images", "orientations", "scale")})
            if len(infos) == 1:
                small = {k: (f[k][...], dict(f[k].attrs)) for k in f if k not in ("images", "orientations", "scale")}
                chunk_rows = int(f.attrs.get("chunk_rows", DEFAULT_BLOCK_ROWS))
    n_total = sum(i["images"][0][0] for i in infos)
    with atomic_path(master) as tmp, h5py.File(tmp, "w") as f:
        for key in ("images", "orientations", "scale"):
            shape0, dtype = infos[0][key]
            layout = h5py.VirtualLayout(shape=(n_total, *shape0[1:]), dtype=dtype)
            start = 0
            for p, info in zip(shards, infos, strict=True):
                shape = info[key][0]
                rel = os.path.relpath(p.resolve(), master.resolve().parent)
                layout[start:start + shape[0]] = h5py.VirtualSource(rel, key, shape=shape)
                start += shape[0]
            f.create_virtual_dataset(key, layout, fillvalue=np.nan)
        for k, (data, a) in small.items():
            f.create_dataset(k, data=data).attrs.update(a)
        f.attrs["chunk_rows"] = chunk_rows
        f.attrs["shards"] = json.dumps([os.path.relpath(p.resolve(), master.resolve().parent) for p in shards])
        for k, v in (attrs or {}).items():
            f.attrs[k] = json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v


def open_dataset(path: str | os.PathLike, **kwargs) -> DiffractionDataset:
    """Open a dataset (one file or a sharded master file): ``DiffractionDataset(path)``."""
    return DiffractionDataset(path, **kwargs)


# A sharded dataset is a master file of virtual datasets: it reads exactly like one file.
ShardedDataset = DiffractionDataset
