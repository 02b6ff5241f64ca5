"""Complex, FFT-centred 3D Fourier volumes of real-space boxes: transform, trilinear read, inverse.

Real-space volumes are ``[x, y, z]`` with the origin at voxel ``N // 2`` (``docs/architecture.md``);
their transforms live on a :class:`~xrai.volume.ReciprocalGrid` with ``dq = 1 / (size * pixel)``
(:func:`fourier_grid`), read trilinearly at any ``k`` in Å⁻¹ (:func:`sample_fourier`, real and
imaginary parts through :func:`xrai.volume.sample_volume`).

Usage::

    spectrum, grid = fourier_volume(volume_xyz, pixel_size_A=1.6, pad=2)
    values = sample_fourier(spectrum, k, grid)          # complex, k (..., 3) in 1/Å
    back = real_volume(spectrum, volume_xyz.shape[0])   # ~ volume_xyz (sinc² pre-correction aside)
"""

from __future__ import annotations

import torch

from xrai.volume import ReciprocalGrid, sample_volume


def fourier_grid(size: int, pixel_size_A: float) -> ReciprocalGrid:
    """The centred reciprocal grid of a real-space box of ``size`` voxels of ``pixel_size_A``: ``dq = 1 / (size px)``."""
    return ReciprocalGrid(int(size), (int(size) // 2 - 1) / (int(size) * float(pixel_size_A)))


def _sinc2(size: int, padded: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Separable sinc² ``(size,)*3`` of trilinear interpolation on a grid of ``padded`` voxels, centred."""
    x = (torch.arange(size, dtype=dtype) - size // 2) / padded
    s = torch.sinc(x) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def fourier_volume(volume: torch.Tensor, pixel_size_A: float, pad: int = 2) -> tuple[torch.Tensor, ReciprocalGrid]:
    """Centred 3D transform (complex, ``(pad N,)*3``, ``[x, y, z]``) of a real ``[x, y, z]`` volume, and its grid.

    Zero-padded ``pad`` times and divided by sinc² beforehand, so that trilinear reads
    (:func:`sample_fourier`) approximate the exact transform.
    """
    vol = torch.as_tensor(volume).double()
    n = vol.shape[0]
    m = pad * n
    lo = (m - n) // 2
    padded = torch.nn.functional.pad(vol, [lo, m - n - lo] * 3)
    padded = padded / _sinc2(m, m)
    spectrum = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
    return spectrum.to(torch.complex64), fourier_grid(m, pixel_size_A)


def sample_fourier(spectrum: torch.Tensor, k: torch.Tensor, grid: ReciprocalGrid) -> torch.Tensor:
    """Trilinear read of a complex centred volume at ``k`` (..., 3) in the grid's units: complex ``(...)``."""
    parts = torch.stack([spectrum.real, spectrum.imag])
    out = sample_volume(parts, k.to(parts.dtype), grid)
    return torch.complex(out[0], out[1])


def real_volume(spectrum: torch.Tensor, size: int, gridding: torch.Tensor | None = None) -> torch.Tensor:
    """The real ``[x, y, z]`` volume ``(size,)*3`` of a centred transform of a padded box (cropped to ``size``).

    ``gridding`` (real space, the padded box's shape) divides the result (e.g. the sinc² of
    trilinear insertion), None for none.
    """
    m = spectrum.shape[0]
    vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(spectrum))).real
    if gridding is not None:
        vol = vol / gridding.to(vol)
    lo = (m - size) // 2
    return vol[lo:lo + size, lo:lo + size, lo:lo + size]
