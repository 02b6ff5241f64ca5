"""``CxiDataset``: real diffraction data in the CXI layout (CXIDB), read like a simulated dataset.

Keys read (CXI 1.6; lengths in m, the source energy in J):

* ``entry_1/data_1/data`` (or ``entry_1/instrument_1/detector_1/data``): ``(N, H, W)`` photons;
* ``entry_1/instrument_1/detector_1/``: ``distance``, ``x_pixel_size``, ``y_pixel_size``, and
  optionally ``corner_position`` (3,) (the outer corner of pixel ``[0, 0]``; centred on the
  beam when absent) and ``basis_vectors`` (2, 3) (the step along rows, then along columns;
  ``[[0, y_pixel_size, 0], [x_pixel_size, 0, 0]]`` when absent: rows follow y, like xrai);
  ``mask`` (H, W) in the CXI convention, **nonzero = bad pixel**;
* ``entry_1/instrument_1/source_1/energy`` (J; ``units = 'eV'`` accepted) or ``.../wavelength`` (m);
* optional ``entry_1/data_1/orientations`` ``(N, 4)`` quaternions ``(w, x, y, z)``, ``k = R @ q``
  (not part of the CXI standard: written by :func:`write_cxi`; without them the orientations
  read as NaN and :meth:`CxiDataset.true_rotations` refuses).

Pixel reciprocal coordinates come from :func:`xrai.xray.geometry.ewald_q`, the simulator's formula.

Usage::

    from xrai.data.cxi import CxiDataset, write_cxi
    write_cxi(DiffractionDataset("test_512.h5"), "test_512.cxi")
    ds = CxiDataset("test_512.cxi")             # read(), iter_batches(), mask: as DiffractionDataset
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from xrai.data.hdf5 import DEFAULT_BLOCK_ROWS, DiffractionDataset
from xrai.errors import XraiError

logger = logging.getLogger(__name__)

DATA_KEYS = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data")
DETECTOR = "entry_1/instrument_1/detector_1"
SOURCE = "entry_1/instrument_1/source_1"
ORIENTATIONS = "entry_1/data_1/orientations"
#: The elementary charge: J per eV.
JOULE_PER_EV = 1.602176634e-19


def is_cxi(path: str | os.PathLike) -> bool:
    """True for an HDF5 file with a CXI ``entry_1`` group and no xrai ``images``/``photons``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "entry_1" in f and "images" not in f and "photons" not in f
    except OSError:
        return False


class CxiDataset(DiffractionDataset):
    """A CXI file with :class:`~xrai.data.hdf5.DiffractionDataset`'s interface (no ``scale``, no background).

    ``has_orientations`` says whether the file holds ground-truth orientations.
    """

    def _validate(self) -> None:
        f = self._open()
        data_key = next((k for k in DATA_KEYS if k in f), None)
        if data_key is None:
            raise self._err(f"not a CXI diffraction file: no {' or '.join(DATA_KEYS)}")
        data = f[data_key]
        if data.ndim != 3 or data.shape[0] == 0:
            raise self._err(f"'{data_key}' must be a non-empty stack (N, H, W) of frames, got shape {data.shape}")
        if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
            raise self._err(f"'{data_key}' must hold photon counts (float or integer), got dtype {data.dtype}")
        n, h, w = (int(v) for v in data.shape)
        self._data_key = data_key
        self.sparse, self._image_squeeze = False, False
        self.n_images, self.image_shape, self.image_dtype = n, (h, w), data.dtype
        self.pixel_position_reciprocal = self._reciprocal(f, h, w).float()
        self.attrs = {"format": "CXI", "source_file": str(self.path), "data_key": data_key}
        rows = data.chunks[0] if data.chunks else DEFAULT_BLOCK_ROWS
        self.block_rows = max(1, min(int(rows), n))
        self.has_scale = False
        self.has_orientations = ORIENTATIONS in f
        if self.has_orientations and f[ORIENTATIONS].shape != (n, 4):
            raise self._err(f"'{ORIENTATIONS}' must have shape ({n}, 4) (w, x, y, z per frame), "
                            f"got {f[ORIENTATIONS].shape}")
        mask_key = f"{DETECTOR}/mask"
        if mask_key in f:
            if f[mask_key].shape != (h, w):
                raise self._err(f"'{mask_key}' must have shape ({h}, {w}) to match the frames, got {f[mask_key].shape}")
            self.mask = torch.from_numpy(np.asarray(f[mask_key][...]) == 0)  # CXI: nonzero = bad
            if not bool(self.mask.any()):
                raise self._err(f"'{mask_key}' marks every pixel bad")
        else:
            self.mask = torch.ones((h, w), dtype=torch.bool)
        self.background = torch.zeros((h, w))

    def _number(self, f, key: str, shape: tuple[int, ...] = ()) -> np.ndarray:
        if key not in f:
            raise self._err(f"CXI key '{key}' is missing (needed for the detector geometry)")
        value = np.asarray(f[key][...], dtype=np.float64)
        if value.shape != shape or not np.isfinite(value).all():
            raise self._err(f"CXI key '{key}' must be a finite array of shape {shape}, got {value.shape} {value}")
        return value

    def _wavelength_A(self, f) -> float:
        from xrai.xray.geometry import HC_EV_ANGSTROM

        if f"{SOURCE}/energy" in f:
            energy = float(self._number(f, f"{SOURCE}/energy"))
            units = f[f"{SOURCE}/energy"].attrs.get("units", "J")
            units = units.decode() if isinstance(units, bytes) else str(units)
            ev = energy if units == "eV" else energy / JOULE_PER_EV
            if not ev > 0:
                raise self._err(f"CXI key '{SOURCE}/energy' must be > 0, got {energy} {units}")
            return HC_EV_ANGSTROM / ev
        if f"{SOURCE}/wavelength" in f:
            wavelength_m = float(self._number(f, f"{SOURCE}/wavelength"))
            if not wavelength_m > 0:
                raise self._err(f"CXI key '{SOURCE}/wavelength' must be > 0 m, got {wavelength_m}")
            return wavelength_m * 1e10
        raise self._err(f"CXI file has neither '{SOURCE}/energy' nor '{SOURCE}/wavelength'")

    def _reciprocal(self, f, h: int, w: int) -> torch.Tensor:
        from xrai.xray.geometry import ewald_q

        distance = float(self._number(f, f"{DETECTOR}/distance"))
        px, py = (float(self._number(f, f"{DETECTOR}/{k}_pixel_size")) for k in ("x", "y"))
        if not (distance > 0 and px > 0 and py > 0):
            raise self._err(f"CXI detector distance and pixel sizes must be > 0, got {distance}, {px}, {py}")
        if f"{DETECTOR}/basis_vectors" in f:
            basis = self._number(f, f"{DETECTOR}/basis_vectors", (2, 3))
        else:
            basis = np.array([[0.0, py, 0.0], [px, 0.0, 0.0]])
        if f"{DETECTOR}/corner_position" in f:
            corner = self._number(f, f"{DETECTOR}/corner_position", (3,)).copy()
            if corner[2] == 0:  # in-plane corner only: the plane sits at the distance
                corner[2] = distance
        else:
            corner = np.array([-w * px / 2, -h * py / 2, distance])
        rows, cols = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        positions = corner + rows[..., None] * basis[0] + cols[..., None] * basis[1]
        return ewald_q(torch.from_numpy(positions), self._wavelength_A(f))

    def _read_images(self, start: int, stop: int) -> np.ndarray:
        return self._open()[self._data_key][start:stop]

    def _read_orientations(self, start: int, stop: int) -> np.ndarray:
        if not self.has_orientations:
            return np.full((stop - start, 4), np.nan)
        return self._open()[ORIENTATIONS][start:stop]

    def true_rotations(self, index=None) -> torch.Tensor:
        """Ground-truth rotations (see :meth:`DiffractionDataset.true_rotations`); refused without orientations."""
        if not self.has_orientations:
            raise self._err(f"no ground-truth orientations ('{ORIENTATIONS}'): real data has none to compare with")
        return super().true_rotations(index)

    def __repr__(self) -> str:
        return f"CxiDataset({str(self.path)!r}, n={self.n_images}, shape={self.image_shape})"


def write_cxi(dataset: DiffractionDataset, path: str | os.PathLike) -> None:
    """Write a simulated dataset as a CXI file (frames, flat-detector geometry, source energy, mask, orientations).

    The geometry comes from the dataset's ``detector`` and ``beam`` attributes (a square
    :class:`xrai.xray.geometry.Detector` centred on the beam). Frames are copied block by block.
    """
    import h5py

    from xrai.io import atomic_path
    from xrai.xray.geometry import Beam, Detector

    try:
        det, beam = Detector(**dataset.attrs["detector"]), Beam(**{
            k: v for k, v in dataset.attrs["beam"].items() if k != "wavelength_A"})
    except (KeyError, TypeError) as exc:
        raise XraiError(f"{dataset.path}: no detector/beam attributes to write a CXI geometry from ({exc})") from None
    n, (h, w) = len(dataset), dataset.image_shape
    ps = det.pixel_size_m
    with atomic_path(Path(path)) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("cxi_version", data=160)
        frames = f.create_dataset("entry_1/data_1/data", shape=(n, h, w), dtype="float32",
                                  chunks=(min(dataset.block_rows, n), h, w))
        orientations = f.create_dataset(ORIENTATIONS, shape=(n, 4), dtype="float64")
        for batch in dataset.iter_batches(dataset.block_rows, shuffle=False):
            rows = batch["index"].numpy()
            frames[rows[0]:rows[-1] + 1] = batch["images"].numpy()
            orientations[rows[0]:rows[-1] + 1] = batch["orientations"].numpy()
        f[f"{DETECTOR}/distance"] = det.distance_m
        f[f"{DETECTOR}/x_pixel_size"] = ps
        f[f"{DETECTOR}/y_pixel_size"] = ps
        f[f"{DETECTOR}/corner_position"] = np.array([-det.side_m / 2, -det.side_m / 2, det.distance_m])
        f[f"{DETECTOR}/basis_vectors"] = np.array([[0.0, ps, 0.0], [ps, 0.0, 0.0]])
        f[f"{DETECTOR}/mask"] = (~dataset.mask.numpy()).astype(np.uint32)  # CXI: nonzero = bad
        f[f"{SOURCE}/energy"] = beam.photon_energy_ev * JOULE_PER_EV
        f[f"{SOURCE}/energy"].attrs["units"] = "J"
