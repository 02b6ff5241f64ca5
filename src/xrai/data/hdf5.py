"""``DiffractionDataset``: the one reader of every diffraction dataset.

It reads the HDF5 files written by :mod:`xrai.xray.simulate` (one file, or a master
file whose datasets are HDF5 *virtual datasets* over several shard files) and
HDF5 files written by other tools with the same keys (e.g. skopi scripts):

* ``images``: ``(N, H, W)`` (or ``(N, 1, H, W)``: one detector panel), float16/32/64 or integer photons;
  or, instead, sparse photon counts in the group ``photons`` (Dragonfly's emc layout:
  ``one_pixels`` flat indices of the pixels holding one photon, ``multi_pixels`` and
  ``multi_counts`` of those holding more, each with ``(N + 1,)`` offsets ``one_offsets`` /
  ``multi_offsets`` into them; group attribute ``image_shape``), read as the same dense images;
* ``orientations``: ``(N, 4)`` unit quaternions ``(w, x, y, z)``;
* ``pixel_position_reciprocal``: ``(H, W, 3)`` (or ``(1, H, W, 3)``) in Angstrom^-1 without 2*pi;
  a file whose dataset has ``units = '1/m'``, or no ``units`` and values above 100 (so
  evidently m^-1, skopi's unit), is converted with a warning;
* optional ``mask``: ``(H, W)`` bool/int, nonzero = a pixel to use (beam stop, gaps and bad
  pixels are 0); :attr:`DiffractionDataset.mask` is all True without it;
* optional ``background``: ``(H, W)`` expected background photons per pixel and image (added
  to the signal before any Poisson draw); :attr:`DiffractionDataset.background` is 0 without it;
* optional ``scale``: ``(N,)`` the factor from the physical photons of the beam to each image's
  expected signal (photon scaling and fluence jitter included).

Everything is checked when the file is opened (clear :class:`~xrai.errors.XraiError`
naming the file), including a sample of the images (:func:`check_photon_totals`: not all
zero, not constant, totals as the stored ``scale`` implies); NaN / inf images are reported
with the index range of the batch. :meth:`DiffractionDataset.fingerprint` identifies the
contents (checkpoints record it).

Order of a pass (:meth:`DiffractionDataset.iter_batches`, from :class:`xrai.data.batching.BlockDataset`):
blocks are whole HDF5 chunks; sequential passes read them once in file order, shuffled
passes shuffle blocks, then rows within a bounded window (``shuffle_buffer_mb``); the
order is a pure function of ``(seed, epoch)`` and ``skip`` batches are skipped unread.

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
from pathlib import Path

import numpy as np
import torch

from xrai.data.batching import BlockDataset
from xrai.errors import XraiError

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "orientations", "pixel_position_reciprocal")
#: The group of sparse photon counts (stored instead of ``images``) and its datasets.
SPARSE_GROUP = "photons"
SPARSE_KEYS = ("one_pixels", "one_offsets", "multi_pixels", "multi_counts", "multi_offsets")
#: Entries per HDF5 chunk of the sparse lists (32 KB: small sets stay small, large ones few chunks).
SPARSE_CHUNK = 8192
#: Rows per read when the file does not say (no chunks, no ``chunk_rows`` attribute).
DEFAULT_BLOCK_ROWS = 256
#: images read at open from each end of the file for :func:`check_photon_totals` and the fingerprint
SAMPLE_IMAGES = 4
#: Poisson tolerance of the photon totals, in standard deviations
TOTAL_SIGMAS = 6.0
#: relative tolerance of the photon totals (float16 storage rounds each pixel by up to 2^-11)
TOTAL_RTOL = 1e-2


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
    extra = (scaling.get("fluence_jitter"), scaling.get("background_photons_per_pattern"), attrs.get("fluence_jitter"))
    if any(float(v or 0) > 0 for v in extra):
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


class DiffractionDataset(BlockDataset):
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

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def _validate(self) -> None:
        f = self._open()
        self.sparse = "images" not in f and SPARSE_GROUP in f
        missing = [k for k in REQUIRED_KEYS if k not in f and not (k == "images" and self.sparse)]
        if missing:
            raise self._err(f"not a diffraction dataset: missing {missing} (has {sorted(f.keys())})")
        orient, ppr = f["orientations"], f["pixel_position_reciprocal"]
        if self.sparse:
            images = f[SPARSE_GROUP]
            shape = self._validate_sparse(images)
        else:
            images = f["images"]
            self._check_virtual_sources(images)
            shape = images.shape
        if len(shape) == 4 and shape[1] == 1:
            self._image_squeeze = True
            shape = (shape[0], shape[2], shape[3])
        if len(shape) != 3:
            raise self._err(f"'images' must have shape (N, H, W), got {images.shape}")
        image_dtype = np.dtype(np.int32) if self.sparse else images.dtype  # sparse: integer counts
        if not (np.issubdtype(image_dtype, np.floating) or np.issubdtype(image_dtype, np.integer)):
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
        self.image_dtype = image_dtype
        self.pixel_position_reciprocal = torch.from_numpy(q).float()
        self.attrs = {k: self._decode_attr(v) for k, v in f.attrs.items()}
        chunks = None if self.sparse else images.chunks
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
        # expected background photons per pixel and image, added before the Poisson draw
        if "background" in f:
            if f["background"].shape != (h, w):
                raise self._err(f"'background' must have shape ({h}, {w}) to match the images, "
                                f"got {f['background'].shape}")
            self.background = torch.from_numpy(np.asarray(f["background"][...], dtype=np.float32))
            if not bool(torch.isfinite(self.background).all()) or bool((self.background < 0).any()):
                raise self._err("'background' must be finite and non-negative photons per pixel")
        else:
            self.background = torch.zeros((int(h), int(w)))
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

    def _validate_sparse(self, group) -> tuple[int, int, int]:
        """Check the sparse photon lists (shapes, offsets) and return the image stack shape ``(N, H, W)``."""
        missing = [k for k in SPARSE_KEYS if k not in group]
        if missing:
            raise self._err(f"sparse '{SPARSE_GROUP}' group lacks {missing}")
        for k in SPARSE_KEYS:
            self._check_virtual_sources(group[k])
        shape = tuple(int(v) for v in np.asarray(group.attrs.get("image_shape", ())).ravel())
        if len(shape) != 2 or min(shape) < 1:
            raise self._err(f"sparse '{SPARSE_GROUP}' group: attribute image_shape must be (H, W), got {shape}")
        n = group["one_offsets"].shape[0] - 1
        if n < 0 or group["multi_offsets"].shape != (n + 1,):
            raise self._err(f"sparse '{SPARSE_GROUP}': one_offsets {group['one_offsets'].shape} and multi_offsets "
                            f"{group['multi_offsets'].shape} must both be (N + 1,)")
        if group["multi_counts"].shape != group["multi_pixels"].shape:
            raise self._err(f"sparse '{SPARSE_GROUP}': multi_counts {group['multi_counts'].shape} must match "
                            f"multi_pixels {group['multi_pixels'].shape}")
        for name, pixels in (("one", "one_pixels"), ("multi", "multi_pixels")):
            off, total = group[f"{name}_offsets"], group[pixels].shape[0]
            last = -1
            for a in range(0, n + 1, 2**20):  # in pieces: memory stays flat
                piece = np.asarray(off[a:a + 2**20], dtype=np.int64)
                if (a == 0 and piece[0] != 0) or piece[0] < last or (np.diff(piece) < 0).any():
                    raise self._err(f"sparse '{SPARSE_GROUP}/{name}_offsets' must start at 0 and never decrease")
                last = piece[-1]
            if last != total:
                raise self._err(f"sparse '{SPARSE_GROUP}/{name}_offsets' ends at {last} but {pixels} holds {total} entries")
        self._sparse_pixels = shape[0] * shape[1]
        return (n, *shape)

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
    def __repr__(self) -> str:
        return f"DiffractionDataset({str(self.path)!r}, n={self.n_images}, shape={self.image_shape})"

    def mean_photons_per_pattern(self, n: int = 2000) -> float:
        """Mean photons per pattern (background included) over the usable pixels of the first ``n`` images.

        >>> DiffractionDataset("train_16384.h5").mean_photons_per_pattern()  # doctest: +SKIP
        2000.14
        """
        images = self.read(0, min(n, len(self)))["images"].double()
        return float(images[:, self.mask].sum(dim=1).mean())

    def read(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Images ``[start, stop)``: ``{'images': float32 (B, H, W), 'orientations': float32 (B, 4), 'index': int64 (B,)}``.

        Also ``'scale'`` (B,) when the file stores it. Raises XraiError on NaN / inf.
        """
        start, stop = max(0, int(start)), min(self.n_images, int(stop))
        if stop <= start:
            raise ValueError(f"empty range [{start}, {stop}) of a dataset of {self.n_images} images")
        f = self._open()
        out = self._pack(self._read_images(start, stop), self._read_orientations(start, stop), np.arange(start, stop), f)
        self._check_finite(out["images"], start, stop)
        return out

    def true_rotations(self, index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Ground-truth rotation matrices ``(N, 3, 3)`` float64 of images ``index`` (all by default).

        Reads only the ``orientations`` dataset (16 bytes per image), never the images.
        Example: ``DiffractionDataset("test_10000.h5").true_rotations([0, 5])``.
        """
        from xrai.rotations import quaternion_to_matrix

        quats = torch.from_numpy(np.asarray(self._read_orientations(0, self.n_images), dtype=np.float64))
        if index is None:
            return quaternion_to_matrix(quats)
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.n_images):
            raise self._err(f"image index out of range [0, {self.n_images}) (poses written for another dataset?)")
        return quaternion_to_matrix(quats[index])

    def _read_images(self, start: int, stop: int) -> np.ndarray:
        """Images ``[start, stop)`` as stored (dense ``(B, H, W)``; sparse lists expanded to float32)."""
        f = self._open()
        if self.sparse:
            return self._expand_sparse(f[SPARSE_GROUP], start, stop)
        imgs = f["images"][start:stop]
        return imgs[:, 0] if self._image_squeeze else imgs

    def _read_orientations(self, start: int, stop: int) -> np.ndarray:
        """Quaternions ``(B, 4)`` of images ``[start, stop)``."""
        return self._open()["orientations"][start:stop]

    def _expand_sparse(self, group, start: int, stop: int) -> np.ndarray:
        b, (h, w) = stop - start, self.image_shape
        out = np.zeros((b, h * w), dtype=np.float32)
        for name, counts in (("one", None), ("multi", "multi_counts")):
            off = np.asarray(group[f"{name}_offsets"][start:stop + 1], dtype=np.int64)
            pixels = np.asarray(group[f"{name}_pixels"][off[0]:off[-1]], dtype=np.int64)
            if len(pixels) and (pixels.min() < 0 or pixels.max() >= h * w):
                raise self._err(f"sparse '{SPARSE_GROUP}/{name}_pixels' of images [{start}, {stop}) "
                                f"point outside the {h}x{w} detector")
            rows = np.repeat(np.arange(b), np.diff(off))
            out[rows, pixels] = 1.0 if counts is None else np.asarray(group[counts][off[0]:off[-1]], dtype=np.float32)
        return out.reshape(b, h, w)

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

    def _read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Raw block read as numpy (float32 images), NaN-checked."""
        f = self._open()
        imgs = np.asarray(self._read_images(start, stop), dtype=np.float32)
        self._check_finite(imgs, start, stop)
        block = {"images": imgs, "orientations": np.asarray(self._read_orientations(start, stop), dtype=np.float32)}
        if self.has_scale:
            block["scale"] = np.asarray(f["scale"][start:stop], dtype=np.float32)
        return block


class DatasetWriter:
    """Create one dataset file and fill it in batches, with the layout :class:`DiffractionDataset` reads.

    ``images`` are chunked in whole batches of ``chunk_rows``; ``orientations`` (float64),
    ``scale`` (float32), and the per-pixel ``pixel_position_reciprocal`` (float32, attr
    ``units='1/angstrom'``), ``polarization``, ``solid_angle`` and optional ``mask`` (bool,
    True = usable) and ``background`` (photons per pixel) are stored beside them.
    ``storage='sparse'`` stores non-negative integer images as photon pixel lists (the
    ``photons`` group, see the module docstring); batches must then be written in order.
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
        mask: torch.Tensor | np.ndarray | None = None,
        background: torch.Tensor | np.ndarray | None = None,
        storage: str = "dense",
    ):
        import h5py

        if dtype not in ("float32", "float16"):
            raise XraiError(f"image dtype must be float32 or float16, got {dtype!r}")
        if storage not in ("dense", "sparse"):
            raise XraiError(f"image storage must be dense or sparse, got {storage!r}")
        h, w = image_shape
        self.n_images = int(n_images)
        self.file = h5py.File(path, "w")
        comp = {} if compression in (None, "none") else {"compression": compression}
        if compression == "gzip":
            comp["compression_opts"] = 4
        rows = max(1, min(int(chunk_rows), self.n_images))
        self.sparse = storage == "sparse"
        if self.sparse:
            group = self.file.create_group(SPARSE_GROUP)
            group.attrs["image_shape"] = [h, w]
            group.attrs["layout"] = ("Dragonfly emc: flat pixel index (row * W + col) of one-photon pixels and of "
                                     "multi-photon pixels with their counts; image i is [offsets[i], offsets[i+1])")
            for key, kind in (("one_pixels", "int32"), ("multi_pixels", "int32"), ("multi_counts", "int32")):
                group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=kind, chunks=(SPARSE_CHUNK,), **comp)
            for key in ("one_offsets", "multi_offsets"):
                group.create_dataset(key, shape=(self.n_images + 1,), dtype="int64", fillvalue=0)
            self._sparse_next = 0  # next image row: sparse batches are appended in order
        else:
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
        if mask is not None:
            self.file.create_dataset("mask", data=_np(mask, bool)).attrs["meaning"] = "True = usable pixel"
        if background is not None:
            self.file.create_dataset("background", data=_np(background, np.float32)).attrs["units"] = \
                "expected photons per pixel per image"
        self.file.attrs["chunk_rows"] = rows

    def write(self, start: int, images, orientations, scale=None) -> None:
        """Write images ``[start, start + len(images))`` with their orientations (and per-image scale)."""
        stop = start + len(images)
        if self.sparse:
            self._append_sparse(start, _np(images, np.float32))
        else:
            self.images[start:stop] = _np(images, self.images.dtype)
        self.orientations[start:stop] = _np(orientations, np.float64)
        if scale is not None:
            self.scale[start:stop] = _np(scale, np.float32)

    def _append_sparse(self, start: int, images: np.ndarray) -> None:
        if start != self._sparse_next:
            raise XraiError(f"sparse images must be written in order: expected row {self._sparse_next}, got {start}")
        if (images < 0).any() or (images != np.round(images)).any():
            raise XraiError("sparse storage holds integer photon counts: the images have negative or fractional "
                            "values (turn on simulation.poisson_noise or use storage: dense)")
        flat = images.reshape(len(images), -1)
        rows, pixels = np.nonzero(flat)
        counts = flat[rows, pixels].astype(np.int64)
        group = self.file[SPARSE_GROUP]
        single = counts == 1
        for name, sel in (("one", single), ("multi", ~single)):
            data = group[f"{name}_pixels"]
            n0 = data.shape[0]
            per_image = np.bincount(rows[sel], minlength=len(images))
            data.resize((n0 + int(sel.sum()),))
            data[n0:] = pixels[sel].astype(np.int32)
            if name == "multi":
                group["multi_counts"].resize((data.shape[0],))
                group["multi_counts"][n0:] = counts[sel].astype(np.int32)
            group[f"{name}_offsets"][start + 1:start + 1 + len(images)] = n0 + np.cumsum(per_image)
        self._sparse_next = start + len(images)

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
    with h5py.File(shards[0], "r") as f:
        sparse = SPARSE_GROUP in f and "images" not in f
    keys = ["orientations", "scale"] + ([f"{SPARSE_GROUP}/{k}" for k in SPARSE_KEYS if not k.endswith("_offsets")]
                                        if sparse else ["images"])
    infos, offsets = [], {"one_offsets": [np.zeros(1, np.int64)], "multi_offsets": [np.zeros(1, np.int64)]}
    for p in shards:
        with h5py.File(p, "r") as f:
            infos.append({k: (f[k].shape, f[k].dtype) for k in keys})
            if sparse:  # offsets become global: each shard's shifted by the entries before it
                for k, parts in offsets.items():
                    parts.append(parts[-1][-1] + np.asarray(f[f"{SPARSE_GROUP}/{k}"][1:], dtype=np.int64))
                sparse_attrs = dict(f[SPARSE_GROUP].attrs)
            if len(infos) == 1:
                small = {k: (f[k][...], dict(f[k].attrs)) for k in f
                         if k not in ("images", "orientations", "scale", SPARSE_GROUP)}
                chunk_rows = int(f.attrs.get("chunk_rows", DEFAULT_BLOCK_ROWS))
    with atomic_path(master) as tmp, h5py.File(tmp, "w") as f:
        for key in keys:
            shape0, dtype = infos[0][key]
            n_total = sum(info[key][0][0] for info in infos)
            if n_total == 0:  # e.g. no multi-photon pixel at all: an empty list, not a virtual dataset
                f.create_dataset(key, shape=(0, *shape0[1:]), dtype=dtype)
                continue
            layout = h5py.VirtualLayout(shape=(n_total, *shape0[1:]), dtype=dtype)
            start = 0
            for p, info in zip(shards, infos, strict=True):
                shape = info[key][0]
                if shape[0] == 0:
                    continue
                rel = os.path.relpath(p.resolve(), master.resolve().parent)
                layout[start:start + shape[0]] = h5py.VirtualSource(rel, key, shape=shape)
                start += shape[0]
            f.create_virtual_dataset(key, layout, fillvalue=np.nan if np.issubdtype(dtype, np.floating) else -1)
        if sparse:
            for k, parts in offsets.items():
                f.create_dataset(f"{SPARSE_GROUP}/{k}", data=np.concatenate(parts))
            f[SPARSE_GROUP].attrs.update(sparse_attrs)
        for k, (data, a) in small.items():
            f.create_dataset(k, data=data).attrs.update(a)
        f.attrs["chunk_rows"] = chunk_rows
        f.attrs["shards"] = json.dumps([os.path.relpath(p.resolve(), master.resolve().parent) for p in shards])
        for k, v in (attrs or {}).items():
            f.attrs[k] = json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v


# A sharded dataset is a master file of virtual datasets: it reads exactly like one file.
ShardedDataset = DiffractionDataset
