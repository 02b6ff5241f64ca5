"""Closed-form, CTF-weighted Wiener merge of cryo-EM images into a 3D Fourier volume.

Each image's spectrum ``F`` is inserted (trilinearly, at ``k`` and at ``-k`` for Friedel
symmetry) at its slice coordinates ``R k`` with the value ``conj(CTF · phase) · F`` and the
weight ``CTF²``; the volume is

    ``V^(k) = Σ CTF conj(phase) F / (Σ CTF² + τ(|k|))``

with the regulariser ``τ`` = the shell's mean ``Σ CTF²`` divided by its spectral SNR. The SSNR
comes from two half sets (images by index parity) as RELION does it: ``FSC`` between the
half volumes, ``FSC_full = 2 FSC / (1 + FSC)``, ``SSNR = FSC_full / (1 - FSC_full)``.
Old content can decay (``decay < 1``): the online merge of the fast default.

Usage::

    merge = WienerMerge(imaging.reconstruction_grid())
    for batch in dataset.iter_batches(256, shuffle=False):
        merge.insert(imaging, imaging.spectrum(batch["images"]), batch["rotations"], batch)
    volume_xyz = merge.real_volume(imaging.size)
"""

from __future__ import annotations

import logging

import torch

from xrai.fourier import real_volume
from xrai.imaging import ImagingModel
from xrai.volume import ReciprocalGrid, insert_trilinear

logger = logging.getLogger(__name__)

#: smallest SSNR a shell is given (shells without signal are damped, not divided by 0)
MIN_SSNR = 1e-3


class WienerMerge:
    """Running CTF-weighted sums of two half sets on a centred Fourier ``grid`` (``[x, y, z]``)."""

    def __init__(self, grid: ReciprocalGrid, device: torch.device | str | None = None) -> None:
        self.grid = grid
        n = grid.size
        self.num = torch.zeros(2, 2, n, n, n, dtype=torch.float32, device=device)  # half, (re, im)
        self.den = torch.zeros(2, n, n, n, dtype=torch.float32, device=device)
        self.shells = grid.radius_index(device).clamp_max(n // 2)
        self.n_shells = n // 2 + 1

    def decay(self, factor: float) -> None:
        """Multiply the sums by ``factor`` (forget old images in the online merge)."""
        self.num *= factor
        self.den *= factor

    def insert(self, imaging: ImagingModel, spectrum: torch.Tensor, R: torch.Tensor, batch: dict | None,
               half: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> None:
        """Add images (rfft ``spectrum`` (B, M, M // 2 + 1)) at poses ``R`` (B, 3, 3), CTF and shifts of ``batch``.

        ``half`` (B,) 0 / 1 picks each image's half set (default: index parity, else 0);
        ``pixels`` (a boolean (M, M // 2 + 1) mask) limits the inserted coefficients.
        """
        f = imaging.factors(batch)
        value = spectrum if f is None else spectrum * f.conj()
        weight = torch.ones_like(spectrum.real) if f is None else (f.abs() ** 2)
        mask = imaging.nyquist_mask if pixels is None else pixels & imaging.nyquist_mask
        k = imaging.coordinates(R.float())[:, mask]  # (B, P, 3)
        value, weight = value[:, mask], weight[:, mask]
        if half is None:
            half = (batch["index"] % 2) if batch is not None and "index" in batch else torch.zeros(len(R), dtype=torch.long)
        for h in (0, 1):
            sel = half.to(k.device) == h
            if not bool(sel.any()):
                continue
            kk = torch.cat([k[sel], -k[sel]], dim=1)
            vv = torch.cat([value[sel], value[sel].conj()], dim=1)
            ww = torch.cat([weight[sel], weight[sel]], dim=1)
            insert_trilinear(self.num[h, 0], self.den[h], kk, vv.real.float(), self.grid, weights=ww.float())
            insert_trilinear(self.num[h, 1], None, kk, vv.imag.float(), self.grid)

    def _shell_mean(self, values: torch.Tensor) -> torch.Tensor:
        flat = self.shells.flatten()
        sums = torch.zeros(self.n_shells, dtype=torch.float64, device=values.device).index_add_(
            0, flat, values.flatten().double())
        counts = torch.bincount(flat, minlength=self.n_shells).clamp_min(1)
        return sums / counts

    def half_fsc(self) -> torch.Tensor:
        """FSC between the two half volumes per shell ``(M // 2 + 1,)`` (0 where a half is empty)."""
        eps = 1e-6 * float(self.den.mean().clamp_min(1e-30))
        a = torch.complex(self.num[0, 0], self.num[0, 1]) / (self.den[0] + eps)
        b = torch.complex(self.num[1, 0], self.num[1, 1]) / (self.den[1] + eps)
        cross = self._shell_mean((a * b.conj()).real)
        pa, pb = self._shell_mean(a.abs() ** 2), self._shell_mean(b.abs() ** 2)
        return (cross / (pa * pb).sqrt().clamp_min(1e-30)).float()

    def ssnr(self) -> torch.Tensor:
        """Spectral SNR of the merged volume per shell, from the half-set FSC."""
        f = self.half_fsc().clamp(0.0, 0.999)
        full = 2 * f / (1 + f)
        return (full / (1 - full)).clamp_min(MIN_SSNR)

    def spectrum(self, ssnr: torch.Tensor | None = None) -> torch.Tensor:
        """The Wiener-filtered complex volume ``(M,)*3`` (``ssnr`` per shell; default :meth:`ssnr`)."""
        ssnr = self.ssnr() if ssnr is None else ssnr
        num = self.num.sum(0)
        den = self.den.sum(0)
        tau = (self._shell_mean(den).float() / ssnr.to(den))[self.shells]
        return torch.complex(num[0], num[1]) / (den + tau.clamp_min(1e-30))

    def real_volume(self, size: int, ssnr: torch.Tensor | None = None) -> torch.Tensor:
        """The real-space ``[x, y, z]`` volume ``(size,)*3`` of :meth:`spectrum` (the padded box cropped)."""
        return real_volume(self.spectrum(ssnr), size)
