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
