"""Projections of a potential along z at RELION poses: Fourier slice (simulator) and real-space sum (check).

For RELION's matrix ``A = relion_euler_to_matrix(rot, tilt, psi)`` the image is
``P(x, y) = sum_z V(A^T r)`` (voxel units: multiply by the pixel size for V·Å), so a feature
at ``p`` in the volume appears at ``(A p)_x, (A p)_y`` in the image. Volumes and images are
indexed ``[z, y, x]`` / ``[y, x]`` with the origin at index ``N // 2``.

``torch-fourier-slice`` samples the central slice at ``M k`` for a matrix ``M`` acting on xyz
column vectors, i.e. it projects ``V(M r)``: it is given ``M = A^T`` (the xrai pose).
:class:`FourierProjector` prepares the padded, interpolation-corrected transform once and
then extracts slices per batch (``project_3d_to_2d`` repeats that preparation at every call).

Usage::

    from xrai.cryoem.projection import FourierProjector
    from xrai.rotations import relion_euler_to_matrix
    proj = FourierProjector(torch.from_numpy(volume_zyx), pad_factor=2)
    images = proj.project(relion_euler_to_matrix(rot, tilt, psi))     # (B, N, N)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_fourier_slice.slice_extraction import extract_central_slices_rfft_3d
from torch_fourier_slice.volume_utils import compute_cube_face_averages, separable_sinc2_correction

from xrai.errors import XraiError


def _check_cube(volume: torch.Tensor) -> int:
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise XraiError(f"projection needs a cubic volume (N, N, N), got shape {tuple(volume.shape)}")
    return int(volume.shape[0])


class FourierProjector:
    """Central slices of one volume (``[z, y, x]``, N³) for many RELION poses; ``pad_factor`` against aliasing.

    The same steps as ``torch_fourier_slice.project_3d_to_2d`` (edge value removed, zero padding,
    division by sinc² for trilinear interpolation, centred rfft), done once.
    """

    #: images per call of the slice extraction (bounds its memory whatever the batch size)
    CHUNK = 32

    def __init__(self, volume: torch.Tensor, pad_factor: float = 2.0) -> None:
        self.size = _check_cube(volume)
        if pad_factor < 1:
            raise XraiError(f"config key 'cryoem.pad_factor': must be >= 1, got {pad_factor}")
        vol = volume.float()
        self.edge = compute_cube_face_averages(vol, n=4)
        vol = vol - self.edge
        self.pad = int((self.size * (pad_factor - 1.0)) // 2)
        if self.pad:
            vol = F.pad(vol, [self.pad] * 6)
        self.padded_shape = tuple(vol.shape)
        vol = vol / separable_sinc2_correction(self.padded_shape, device=vol.device)
        dft = torch.fft.rfftn(torch.fft.ifftshift(vol, dim=(-3, -2, -1)), dim=(-3, -2, -1))
        self.dft = torch.fft.fftshift(dft, dim=(-3, -2))

    def project(self, A: torch.Tensor) -> torch.Tensor:
        """Projections ``(B, N, N)`` float32 of ``V(A^T r)`` along z for RELION matrices ``A`` (B, 3, 3)."""
        M = A.transpose(-1, -2).to(self.dft.device, torch.float32).reshape(-1, 3, 3)
        # in chunks: the slice coordinates and masks take ~3 KB per padded pixel row, per image
        slices = torch.cat([extract_central_slices_rfft_3d(self.dft, M[i:i + self.CHUNK])
                            for i in range(0, len(M), self.CHUNK)]).reshape(*A.shape[:-2], *self.dft.shape[-2:])
        slices = torch.fft.ifftshift(slices, dim=(-2,))
        images = torch.fft.fftshift(torch.fft.irfftn(slices, dim=(-2, -1), s=self.padded_shape[-2:]), dim=(-2, -1))
        if self.pad:
            images = images[..., self.pad:self.pad + self.size, self.pad:self.pad + self.size]
        return images + self.edge * self.size


def project_real_space(volume: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Projections ``(B, N, N)`` by rotating the volume in real space (trilinear) and summing along z.

    Slow (N³ samples per image); the independent check of :class:`FourierProjector`.
    """
    n = _check_cube(volume)
    c = n // 2
    axis = torch.arange(n, dtype=torch.float64) - c
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    r = torch.stack([x, y, z], dim=-1).reshape(-1, 3)  # output voxel centres, xyz
    out = []
    for a in A.double().reshape(-1, 3, 3):
        src = r @ a  # rows: (A^T r)^T = r^T A
        grid = ((src + c) * (2.0 / (n - 1)) - 1.0).reshape(1, n, n, n, 3).float()
        rotated = F.grid_sample(volume.float()[None, None], grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)[0, 0]
        out.append(rotated.sum(dim=0))
    return torch.stack(out).reshape(*A.shape[:-2], n, n)
