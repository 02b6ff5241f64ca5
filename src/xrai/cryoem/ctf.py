"""CTF (``torch-ctf``, RELION's sign and defocus convention) and in-plane shifts, applied in Fourier space.

* Defocus U, V in Å (positive = underfocus, as ``rlnDefocusU/V``); ``rlnDefocusAngle`` (degrees)
  is the direction of U measured from the image x axis (columns) towards y (rows), RELION's
  ``atan2(Y, X) - azimuth``. The CTF is ``-sin(chi)`` with the amplitude contrast folded into
  the phase, so ``CTF(0) = +amplitude_contrast`` (``torch-ctf`` computes it so; checked in
  ``tests/test_cryoem_simulate.py`` against RELION's ``CTF::getCTF`` formula written out).
* A shift ``t`` (pixels, x then y) moves the particle to image centre + ``t``: the transform is
  multiplied by ``exp(-2 pi i k.t)``. RELION's ``rlnOrigin`` of such an image is ``-t``.
* Both are applied on the image zero-padded to ``pad_factor`` times its side (2 in cryoPoseNet),
  then cropped, so the CTF's point-spread function does not wrap around.

Usage::

    from xrai.cryoem.ctf import CtfParams, fourier_filter
    ctf = CtfParams(defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=a, voltage_kv=300.0, cs_mm=2.7,
                    amplitude_contrast=0.1)
    images = fourier_filter(images, pixel_size=0.8, ctf=ctf, shifts_px=shifts, pad_factor=2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch_ctf import calculate_ctf_2d


@dataclass(frozen=True)
class CtfParams:
    """Per-image CTF parameters (tensors of shape (B,) for U, V, angle); microscope constants as floats."""

    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    defocus_angle_deg: torch.Tensor
    voltage_kv: float
    cs_mm: float
    amplitude_contrast: float


def ctf_rfft(ctf: CtfParams, pixel_size: float, size: int) -> torch.Tensor:
    """The CTF on the rfft grid of a ``size`` × ``size`` image, origin at ``[0, 0]``: ``(B, size, size // 2 + 1)``."""
    u = torch.as_tensor(ctf.defocus_u_A, dtype=torch.float64)
    v = torch.as_tensor(ctf.defocus_v_A, dtype=torch.float64)
    return calculate_ctf_2d(
        defocus=(u + v) / 2 * 1e-4, astigmatism=(u - v) / 2 * 1e-4,
        astigmatism_angle=torch.as_tensor(ctf.defocus_angle_deg, dtype=torch.float64),
        voltage=ctf.voltage_kv, spherical_aberration=ctf.cs_mm, amplitude_contrast=ctf.amplitude_contrast,
        phase_shift=0.0, pixel_size=pixel_size, image_shape=(size, size), rfft=True, fftshift=False,
    ).float()


def shift_phase(shifts_px: torch.Tensor, size: int) -> torch.Tensor:
    """``exp(-2 pi i k.t)`` on the rfft grid of a ``size`` image for shifts ``(B, 2)`` (x, y) in pixels."""
    ky = torch.fft.fftfreq(size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, dtype=torch.float64)
    t = shifts_px.double()
    phase = kx[None, None, :] * t[:, 0, None, None] + ky[None, :, None] * t[:, 1, None, None]
    return torch.polar(torch.ones_like(phase), -2 * torch.pi * phase).to(torch.complex64)


def fourier_filter(images: torch.Tensor, pixel_size: float, ctf: CtfParams | None = None,
                   shifts_px: torch.Tensor | None = None, pad_factor: float = 2.0) -> torch.Tensor:
    """Images ``(B, N, N)`` shifted by ``shifts_px`` and multiplied by the CTF, on a ``pad_factor`` padded grid."""
    if ctf is None and shifts_px is None:
        return images
    n = images.shape[-1]
    m = max(n, int(round(n * pad_factor)))
    p = (m - n) // 2
    padded = torch.nn.functional.pad(images.float(), [p, m - n - p, p, m - n - p])
    spectrum = torch.fft.rfft2(padded)
    if ctf is not None:
        spectrum = spectrum * ctf_rfft(ctf, pixel_size, m).to(spectrum.device)
    if shifts_px is not None:
        spectrum = spectrum * shift_phase(shifts_px, m).to(spectrum.device)
    return torch.fft.irfft2(spectrum, s=(m, m))[..., p:p + n, p:p + n]
