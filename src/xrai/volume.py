"""The Cartesian reciprocal-space grid shared by the simulator, the decoders, EMC and phasing.

Grid convention (FFT-centred, like ``numpy.fft.fftshift``):

* a cubic grid of ``size`` voxels per axis, indexed ``[ix, iy, iz]`` (x, y, z order);
* voxel ``i`` sits at ``q = (i - size // 2) * dq`` in Angstrom^-1 (no 2*pi factor),
  so the origin is voxel ``size // 2``;
* ``dq = q_max / (size // 2 - 1)``, so ``+q_max`` (the detector's corner) lies inside;
* the matching real-space grid (inverse FFT after ``ifftshift``) has a voxel size of
  ``1 / (size * dq)`` Angstrom and a box of ``1 / dq`` Angstrom.

Usage::

    import torch
    from xrai.volume import ReciprocalGrid, sample_volume
    grid = ReciprocalGrid(size=32, q_max=0.125)
    vol = torch.rand(32, 32, 32)
    k = torch.zeros(10, 3)                # Angstrom^-1
    values = sample_volume(vol, k, grid)  # (10,), trilinear, zero outside the grid
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReciprocalGrid:
    """A cubic, FFT-centred reciprocal grid of ``size`` voxels reaching at least ``q_max``."""

    size: int
    q_max: float

    def __post_init__(self) -> None:
        if self.size < 4:
            raise ValueError(f"grid size must be >= 4, got {self.size}")
        if not self.q_max > 0:
            raise ValueError(f"q_max must be > 0, got {self.q_max}")

    @property
    def dq(self) -> float:
        """Reciprocal voxel spacing, Angstrom^-1."""
        return self.q_max / (self.size // 2 - 1)

    @property
    def voxel_size(self) -> float:
        """Real-space voxel size of the matching density grid, Angstrom."""
        return 1.0 / (self.size * self.dq)

    @property
    def box_size(self) -> float:
        """Real-space box edge, Angstrom."""
        return 1.0 / self.dq

    def axis(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """The q values (Angstrom^-1) of the voxels along one axis, shape ``(size,)``."""
        return (torch.arange(self.size, dtype=dtype, device=device) - self.size // 2) * self.dq

    def coordinates(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        """All voxel coordinates, shape ``(size, size, size, 3)`` in (x, y, z) order."""
        ax = self.axis(dtype, device)
        return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1)

    def radius_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Integer shell index ``round(|q| / dq)`` of every voxel, shape ``(size,)*3``."""
        c = self.coordinates(device=device)
        return torch.round(c.norm(dim=-1) / self.dq).long()

    def to_normalized(self, k: torch.Tensor) -> torch.Tensor:
        """Map coordinates in Angstrom^-1 to grid_sample's [-1, 1] range (align_corners=True), reordered (z, y, x)."""
        idx = k / self.dq + self.size // 2
        norm = idx * (2.0 / (self.size - 1)) - 1.0
        return norm.flip(-1)


#: fewest points per thread worth splitting for (below it the split costs more than it saves)
_POINTS_PER_THREAD = 4096


def trilinear(volume: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` (trilinear, zeros outside, ``align_corners=True``) of ``volume`` ``(C, D, H, W)``
    at normalised coordinates ``g`` ``(..., 3)`` (grid_sample's (x, y, z) = (W, H, D) order); ``(C, ...)``.

    On the CPU, grid_sample parallelises over its batch dimension only, so the points are split
    into one batch entry per thread (the volume is broadcast, not copied): 2 threads give ~2x.
    The values are bit-identical to one call. Differentiable like grid_sample.
    """
    c = volume.shape[0]
    pts = g.reshape(-1, 3)
    p = pts.shape[0]
    n = 1
    if volume.device.type == "cpu":
        n = max(1, min(torch.get_num_threads(), p // _POINTS_PER_THREAD))
    per = -(-p // n)
    if per * n > p:
        pts = torch.cat([pts, pts.new_zeros(per * n - p, 3)])
    out = F.grid_sample(volume[None].expand(n, -1, -1, -1, -1), pts.reshape(n, 1, 1, per, 3), mode="bilinear",
                        padding_mode="zeros", align_corners=True)  # (n, C, 1, 1, per)
    out = out.reshape(n, c, per).transpose(0, 1).reshape(c, n * per)[:, :p]
    return out.reshape(c, *g.shape[:-1])


def sample_volume(volume: torch.Tensor, k: torch.Tensor, grid: ReciprocalGrid) -> torch.Tensor:
    """Trilinearly interpolate ``volume`` at reciprocal coordinates ``k``.

    ``volume`` is ``(size, size, size)`` or ``(C, size, size, size)``; ``k`` is ``(..., 3)``
    in Angstrom^-1. Returns ``(...)`` or ``(C, ...)``. Points outside the grid read 0.
    Differentiable with respect to both the volume and the coordinates.
    """
    squeeze = volume.dim() == 3
    vol = volume[None] if squeeze else volume
    out = trilinear(vol, grid.to_normalized(k.to(vol.dtype)))
    return out[0] if squeeze else out


def gaussian_smooth(volume: torch.Tensor, sigma_voxels: float) -> torch.Tensor:
    """``volume`` (n, n, n) convolved with a Gaussian of ``sigma_voxels`` (separable, edges replicated).

    Example::

        smooth = gaussian_smooth(torch.rand(16, 16, 16), 0.75)
    """
    if sigma_voxels <= 0:
        return volume.clone()
    r = int(math.ceil(3 * sigma_voxels))
    x = torch.arange(-r, r + 1, dtype=volume.dtype, device=volume.device)
    kernel = torch.exp(-0.5 * (x / sigma_voxels) ** 2)
    kernel = kernel / kernel.sum()
    out = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out[0, 0]


def radial_shells(grid: ReciprocalGrid, device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Shell index per voxel and the number of shells inside the grid's inscribed sphere (for FSC-like curves)."""
    r = grid.radius_index(device)
    return r, grid.size // 2


def write_volume_h5(path: str, grid: ReciprocalGrid, provenance: dict | None = None, **arrays) -> None:
    """Write reciprocal-space volumes (e.g. ``intensity=..., amplitude=...``) with their grid, atomically.

    The file holds one dataset per keyword (float32, ``(size,)*3``, indexed [x, y, z])
    and attrs ``grid_size``, ``q_max``, ``dq`` (Angstrom^-1), ``voxel_size`` (Angstrom, real space)
    and ``provenance`` (JSON).
    """
    import json

    import h5py
    import numpy as np

    from xrai.io import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, arr in arrays.items():
            a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
            if a.shape != (grid.size,) * 3:
                raise ValueError(f"volume '{name}' has shape {a.shape}, expected {(grid.size,) * 3}")
            f.create_dataset(name, data=a.astype(np.float32))
        f.attrs.update(grid_size=grid.size, q_max=grid.q_max, dq=grid.dq, voxel_size=grid.voxel_size)
        if provenance is not None:
            f.attrs["provenance"] = json.dumps(provenance, default=str)


def read_volume_h5(path: str, name: str = "intensity") -> tuple[torch.Tensor, ReciprocalGrid]:
    """Read one volume written by :func:`write_volume_h5`: ``(tensor float32, grid)``. Clear errors for bad files."""
    from pathlib import Path

    import h5py

    from xrai.errors import XraiError

    p = Path(path)
    if not p.exists():
        raise XraiError(f"{p}: file not found")
    try:
        with h5py.File(p, "r") as f:
            if name not in f:
                raise XraiError(f"{p}: no dataset '{name}' (has {sorted(f.keys())})")
            data = torch.from_numpy(f[name][...]).float()
            grid = ReciprocalGrid(int(f.attrs["grid_size"]), float(f.attrs["q_max"]))
    except OSError as exc:
        raise XraiError(f"{p}: not a readable HDF5 file ({exc})") from None
    except KeyError as exc:
        raise XraiError(f"{p}: missing grid attribute {exc}") from None
    if not torch.isfinite(data).all():
        raise XraiError(f"{p}: volume '{name}' contains NaN or infinite values")
    return data, grid


def insert_trilinear(
    volume_sum: torch.Tensor,
    weight_sum: torch.Tensor | None,
    k: torch.Tensor,
    values: torch.Tensor,
    grid: ReciprocalGrid,
    weights: torch.Tensor | None = None,
) -> None:
    """Scatter-add ``values`` at reciprocal coordinates ``k`` into ``volume_sum`` with trilinear weights, in place.

    The exact adjoint (transpose) of :func:`sample_volume`: for any volume ``V``,
    ``(sample_volume(V, k, grid) * values).sum() == (V * added).sum()`` where ``added``
    is what this call adds to ``volume_sum``. ``k`` is ``(..., 3)`` in Angstrom^-1 and
    ``values`` has shape ``k.shape[:-1]``; corners outside the grid are dropped, like
    the zero padding of :func:`sample_volume`. ``weight_sum`` (optional) receives the
    interpolation weights times ``weights`` (per point, broadcast to ``values``; 1 if
    not given), so that ``volume_sum / weight_sum`` is a weighted trilinear merge.

    Usage::

        num = torch.zeros(32, 32, 32); den = torch.zeros_like(num)
        insert_trilinear(num, den, k, slice_values, grid)      # then model = num / den where den > 0
    """
    if values.shape != k.shape[:-1]:
        raise ValueError(f"values shape {tuple(values.shape)} does not match coordinates {tuple(k.shape)}")
    channels = [values]
    if weight_sum is not None:
        channels.append(torch.ones_like(values) if weights is None else weights.to(values).expand_as(values))
    with torch.enable_grad():
        # the gradient of sample_volume with respect to the volume is the scatter (grid_sample's own backward)
        probe = torch.zeros((len(channels), *volume_sum.shape), dtype=volume_sum.dtype, device=volume_sum.device,
                            requires_grad=True)
        out = sample_volume(probe, k.detach(), grid)
        (added,) = torch.autograd.grad(out, probe, torch.stack(channels).to(out.dtype))
    volume_sum += added[0]
    if weight_sum is not None:
        weight_sum += added[1]
