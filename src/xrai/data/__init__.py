"""Dataset readers, one interface: ``open_dataset(path)`` picks the reader from the file.

* HDF5 (``.h5``, ``.hdf5``, ``.cxi``, or any file with the HDF5 signature):
  :class:`xrai.data.hdf5.DiffractionDataset` (X-ray diffraction patterns), or
  :class:`xrai.data.cxi.CxiDataset` for a CXI file (an ``entry_1`` group, CXIDB layout);
* RELION STAR (``.star``) with MRC stacks: :class:`xrai.data.star.ParticleDataset` (cryo-EM particles).

Both give ``len``, ``image_shape``, ``mask``, ``read(start, stop)``, ``iter_batches(...)``,
``n_batches``, ``true_rotations(index)`` and work as context managers
(:class:`xrai.data.batching.BlockDataset`).

Usage::

    from xrai.data import open_dataset
    with open_dataset("results/datasets/4AKE/train.star") as ds:
        batch = ds.read(0, 8)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from xrai.errors import XraiError

if TYPE_CHECKING:
    from xrai.data.cxi import CxiDataset
    from xrai.data.hdf5 import DiffractionDataset
    from xrai.data.star import ParticleDataset

HDF5_SUFFIXES = (".h5", ".hdf5", ".cxi")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_dataset(path: str | os.PathLike, **kwargs) -> DiffractionDataset | CxiDataset | ParticleDataset:
    """Open a dataset with the reader its file calls for (keyword arguments go to the reader)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        from xrai.data.star import ParticleDataset

        return ParticleDataset(path, **kwargs)
    if suffix in HDF5_SUFFIXES or _has_hdf5_signature(path):
        from xrai.data.cxi import CxiDataset, is_cxi
        from xrai.data.hdf5 import DiffractionDataset

        return CxiDataset(path, **kwargs) if is_cxi(path) else DiffractionDataset(path, **kwargs)
    if not path.exists():
        raise XraiError(f"{path}: dataset file not found")
    raise XraiError(f"{path}: unknown dataset format: expected a RELION .star file or an HDF5 file "
                    f"({', '.join(HDF5_SUFFIXES)})")


def _has_hdf5_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False
