"""The cryo-EM imaging model: central slices of a 3D Fourier volume × CTF × shift phase.

Projection-slice theorem with RELION's conventions (``docs/architecture.md``): an image is the
projection along z of ``V(R r)`` (xrai pose ``R = A^T``), so its 2D transform at ``(kx, ky)`` is
the 3D transform at ``R @ (kx, ky, 0)``. Images are compared in Fourier space on the rfft grid
of the image zero-padded to ``pad × N`` (origin at ``[0, 0]``: rows ``fftfreq``, columns
``rfftfreq``, in Å⁻¹), the layout the simulator filters on, with the image centre ``N // 2`` as
the phase origin. The recorded transform is

    ``F(k) = CTF(k) · exp(+2 pi i k · origin) · V^(R k)``

with ``origin = shifts_A`` (the particle sits at the image centre minus the origin).

Volumes are real-space ``[x, y, z]`` arrays (``xrai.io.read_mrc``), origin at voxel ``N // 2``;
:func:`xrai.fourier.fourier_volume` gives their centred 3D transform and
:func:`xrai.fourier.sample_fourier` reads it at slice coordinates.

Usage::

    from xrai.fourier import fourier_volume, sample_fourier
    imaging = CentralSliceImaging(64, pixel_size_A=1.6, pad=2)
    spectrum, grid = fourier_volume(volume_xyz, 1.6, pad=2)
    k = imaging.coordinates(R)                                    # (B, M, M // 2 + 1, 3)
    predicted = imaging.form_image(sample_fourier(spectrum, k, grid), batch)
    images = imaging.to_images(predicted)                         # (B, N, N) real space
"""

from __future__ import annotations

import logging

import torch

from xrai.cryoem.ctf import CtfParams, ctf_rfft, shift_phase
from xrai.cryoem.noise import noise_sigma
from xrai.cryoem.projection import project_real_space
from xrai.fourier import fourier_grid
from xrai.imaging import ImagingModel
from xrai.volume import ReciprocalGrid

logger = logging.getLogger(__name__)

#: batch keys of the CTF (``xrai.data.star.ParticleDataset.read``)
CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast")


def rfft_frequencies(size: int, pixel_size_A: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kx, ky)`` (each ``(size, size // 2 + 1)``, Å⁻¹) of ``torch.fft.rfft2`` of a ``size``² image."""
    ky = torch.fft.fftfreq(size, d=pixel_size_A, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, d=pixel_size_A, dtype=torch.float64)
    return kx[None, :].expand(size, -1), ky[:, None].expand(-1, kx.numel())


def batch_ctf(batch: dict, pixel_size_A: float, size: int) -> torch.Tensor:
    """RELION's CTF of every image of ``batch`` on the rfft grid of a ``size``² image: ``(B, size, size // 2 + 1)``.

    ``xrai.cryoem.ctf.ctf_rfft`` (torch-ctf) per optics group; defocus U, V in Å (positive
    underfocus), U along ``defocus_angle_deg`` from x; CTF(0) = +Q0.
    """
    u, v, angle, kv, cs, q0 = (torch.as_tensor(batch[key], dtype=torch.float64).reshape(-1) for key in CTF_KEYS)
    if not (torch.allclose(kv, kv[0]) and torch.allclose(cs, cs[0]) and torch.allclose(q0, q0[0])):
        # one call per image: torch-ctf takes the microscope constants as scalars
        return torch.cat([batch_ctf({k: batch[k][i:i + 1] for k in CTF_KEYS}, pixel_size_A, size)
                          for i in range(len(u))])
    # torch-ctf returns NaN for a negative astigmatism: V > U is the same CTF as U, V swapped, 90 degrees on
    swap = v > u
    params = CtfParams(defocus_u_A=torch.where(swap, v, u), defocus_v_A=torch.where(swap, u, v),
                       defocus_angle_deg=torch.where(swap, angle + 90.0, angle), voltage_kv=float(kv[0]),
                       cs_mm=float(cs[0]), amplitude_contrast=float(q0[0]))
    return ctf_rfft(params, pixel_size_A, size).reshape(len(u), size, size // 2 + 1)


class CentralSliceImaging(ImagingModel):
    """A cryo-EM image: the central slice ``V^(R k)`` times the CTF and the shift phase of each image.

    ``image_size`` N and ``pixel_size_A`` are the particle images'; ``pad`` the zero-padding
    factor of the Fourier grid (the simulator filters at 2). ``pixel_coordinates`` are
    ``(kx, ky, 0)`` on the rfft grid of the padded image ``(M, M // 2 + 1, 3)``, ``M = pad N``.
    """

    def __init__(self, image_size: int, pixel_size_A: float, pad: int = 1) -> None:
        self.size, self.pixel_size_A, self.pad = int(image_size), float(pixel_size_A), int(pad)
        if self.size < 4 or self.pad < 1 or not self.pixel_size_A > 0:
            raise ValueError(f"need image_size >= 4, pad >= 1, pixel size > 0; got {image_size}, {pad}, {pixel_size_A}")
        self.padded = self.pad * self.size
        kx, ky = rfft_frequencies(self.padded, self.pixel_size_A)
        coords = torch.stack([kx, ky, torch.zeros_like(kx)], dim=-1)
        super().__init__(coords, q_max=float(coords.norm(dim=-1).max()))
        self.register_buffer("nyquist_mask", (kx**2 + ky**2).sqrt() <= 0.5 / self.pixel_size_A)

    @classmethod
    def for_dataset(cls, dataset: object, pad: int = 1) -> CentralSliceImaging:
        """The imaging model of a ``ParticleDataset`` (square images)."""
        h, w = dataset.image_shape
        if h != w:
            raise ValueError(f"cryo-EM images must be square, got {h} x {w}")
        return cls(h, dataset.pixel_size_A, pad)

    @property
    def image_shape(self) -> tuple[int, int]:
        """The real-space image shape ``(N, N)`` (the encoders' input)."""
        return self.size, self.size

    def reconstruction_grid(self, size: int | None = None) -> ReciprocalGrid:
        """The Fourier grid of a ``size``³ real-space box (default ``pad × N``) at the image's pixel size."""
        return fourier_grid(self.padded if size is None else int(size), self.pixel_size_A)

    # -- Fourier <-> real space
    def spectrum(self, images: torch.Tensor) -> torch.Tensor:
        """rfft of images ``(B, N, N)``, zero-padded to ``M``, phase origin at the centre: ``(B, M, M // 2 + 1)``."""
        n, m = self.size, self.padded
        lo = (m - n) // 2
        padded = torch.nn.functional.pad(images.float(), [lo, m - n - lo, lo, m - n - lo])
        return torch.fft.rfft2(torch.fft.ifftshift(padded, dim=(-2, -1)))

    def to_images(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Real-space images ``(B, N, N)`` of rfft spectra ``(B, M, M // 2 + 1)`` (inverse of :meth:`spectrum`)."""
        n, m = self.size, self.padded
        lo = (m - n) // 2
        full = torch.fft.fftshift(torch.fft.irfft2(spectrum, s=(m, m)), dim=(-2, -1))
        return full[..., lo:lo + n, lo:lo + n]

    def real_space_projection(self, volume_xyz: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Clean images ``(B, N, N)``: ``V(R r)`` of a real-space ``[x, y, z]`` N³ volume resampled trilinearly on the
        rotated grid and summed along z, at xrai poses ``R`` (B, 3, 3). Differentiable in both (the recipes' way to
        the real-space projector, :func:`xrai.cryoem.projection.project_real_space`)."""
        if tuple(volume_xyz.shape) != (self.size,) * 3:
            raise ValueError(f"volume must be {(self.size,) * 3}, got {tuple(volume_xyz.shape)}")
        # project_real_space takes [z, y, x] volumes and RELION matrices A = R^T
        return project_real_space(volume_xyz.permute(2, 1, 0), R.transpose(-1, -2))

    @staticmethod
    def white_noise_sd(images: torch.Tensor, snr_db: float) -> float:
        """The sd of white noise that puts ``images`` (B, N, N) at ``snr_db``: the simulator's SNR
        (:func:`xrai.cryoem.noise.noise_sigma`, cryoPoseNet's: the images' mean pixel variance over the noise's)."""
        return noise_sigma(float(images.double().var(dim=(-2, -1)).mean()), snr_db)

    # -- per-image factors
    def ctf(self, batch: dict | None) -> torch.Tensor | None:
        """The CTF ``(B, M, M // 2 + 1)`` of a batch with CTF keys; None without them (no CTF)."""
        if batch is None or CTF_KEYS[0] not in batch:
            return None
        return batch_ctf(batch, self.pixel_size_A, self.padded).to(self.pixel_coordinates.device)

    def shift_phase(self, shifts_A: torch.Tensor) -> torch.Tensor:
        """``exp(+2 pi i k · origin)`` ``(B, M, M // 2 + 1)`` for RELION origins ``shifts_A`` (B, 2) (x, y) in Å."""
        # the particle sits at centre - origin: the simulator's shift t = -origin (pixels)
        return shift_phase(-shifts_A.double() / self.pixel_size_A, self.padded).to(self.pixel_coordinates.device)

    def factors(self, batch: dict | None) -> torch.Tensor | None:
        """CTF × shift phase ``(B, M, M // 2 + 1)`` (complex) of a batch, None if it has neither."""
        ctf = self.ctf(batch)
        out = None if ctf is None else ctf.to(torch.complex64)
        if batch is not None and "shifts_A" in batch:
            phase = self.shift_phase(batch["shifts_A"])
            out = phase if out is None else out * phase
        return out

    def form_image(self, values: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """Slice values ``V^(R k)`` ``(B, M, M // 2 + 1)`` (complex) -> the recorded image's spectrum."""
        f = self.factors(batch)
        return values if f is None else values * f
