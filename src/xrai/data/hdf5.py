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
  pixels are 0); :attr:`DiffractionDataset.mask` is all True without it;
* optional ``background``: ``(H, W)`` expected background photons per pixel and image (added
  to the signal before any Poisson draw); :attr:`DiffractionDataset.background` is 0 without it;
* optional ``scale``: ``(N,)`` the factor from the physical photons of the beam to each image's
  expected signal (photon scaling and fluence jitter included).

Everything is checked when the file is opened (clear :class:`~xrai.errors.XraiError`
naming the file); NaN / inf images are reported with the index range of the batch.

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
#: Rows per read when the file does not say (no chunks, no ``chunk_rows`` attribute).
DEFAULT_BLOCK_ROWS = 256
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

    def _read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Raw block read as numpy (float32 images), NaN-checked."""
        f = self._open()
        imgs = f["images"][start:stop]
        if self._image_squeeze:
            imgs = imgs[:, 0]
        imgs = np.asarray(imgs, dtype=np.float32)
        self._check_finite(imgs, start, stop)
        block = {"images": imgs, "orientations": np.asarray(f["orientations"][start:stop], dtype=np.float32)}
        if self.has_scale:
            block["scale"] = np.asarray(f["scale"][start:stop], dtype=np.float32)
        return block


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


# A sharded dataset is a master file of virtual datasets: it reads exactly like one file.
ShardedDataset = DiffractionDataset
