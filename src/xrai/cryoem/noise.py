"""Noise of cryo-EM images: white Gaussian at a given SNR, and electron-dose shot noise.

**SNR** (cryoPoseNet's convention): ``SNR_dB = 10 log10(var(signal) / var(noise))``, where
``var(signal)`` is the variance of a noise-free image's pixels over the whole image, averaged
over images, and ``var(noise) = sigma²`` of the white Gaussian noise. One ``sigma`` serves a
whole dataset (noise does not depend on the image), calibrated on fixed images (see
``xrai.cryoem.simulate``), so every split and size of a config shares it.

**Shot noise** (weak-phase approximation): an image ``P`` (V·Å, CTF-filtered, protein white as
in RELION) is the negated phase contrast of a micrograph whose expected electrons per pixel
are ``dose · pixel² · (1 - 2 sigma_e P)``, ``sigma_e`` the interaction constant (rad / (V·Å)).
Counts are Poisson; the image returned is ``(1 - counts / (dose · pixel²)) / (2 sigma_e)``, so
its expectation is ``P`` and its units and sign stay those of the noise-free image.

Usage::

    from xrai.cryoem.noise import noise_sigma, snr_db
    sigma = noise_sigma(signal_variance=float(images.var(dim=(-2, -1)).mean()), snr=-10.0)
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: electron rest energy (keV)
_MC2_KEV = 510.99895


def electron_wavelength_A(voltage_kv: float) -> float:
    """Relativistic electron wavelength (Å) at ``voltage_kv``: 12.2643 / sqrt(V (1 + 0.978466e-6 V))."""
    v = voltage_kv * 1e3
    return 12.2642598 / math.sqrt(v * (1 + 0.97846e-6 * v))


def interaction_constant(voltage_kv: float) -> float:
    """``sigma_e`` (rad per V·Å) at ``voltage_kv`` (Kirkland eq. 5.6): 2π/(λV) (mc² + eV)/(2mc² + eV)."""
    lam = electron_wavelength_A(voltage_kv)
    return 2 * math.pi / (lam * voltage_kv * 1e3) * (_MC2_KEV + voltage_kv) / (2 * _MC2_KEV + voltage_kv)


def noise_sigma(signal_variance: float, snr: float) -> float:
    """Standard deviation of white noise giving ``snr`` dB for images of pixel variance ``signal_variance``."""
    return math.sqrt(signal_variance / 10 ** (snr / 10))


def snr_db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    """``10 log10(mean_i var(signal_i) / var(noise))`` over images ``(B, N, N)`` (the definition above)."""
    return 10 * math.log10(float(signal.double().var(dim=(-2, -1)).mean()) / float(noise.double().var()))


def image_rng(seed: int, tag: int, stream: int, index: int) -> np.random.Generator:
    """The random generator of one image: independent of batch size, sharding and the number of images."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag, stream, index])))


def add_gaussian_noise(images: torch.Tensor, sigma: float, rngs: list[np.random.Generator]) -> torch.Tensor:
    """``images + sigma * N(0, 1)``, one generator per image."""
    noise = np.stack([g.standard_normal(images.shape[-2:], dtype=np.float32) for g in rngs])
    return images + sigma * torch.from_numpy(noise).to(images.device)


def add_shot_noise(images: torch.Tensor, dose_e_per_A2: float, pixel_size: float, voltage_kv: float,
                   rngs: list[np.random.Generator]) -> torch.Tensor:
    """Poisson electron counts at ``dose_e_per_A2`` (see the module docstring), one generator per image."""
    sigma_e = interaction_constant(voltage_kv)
    per_pixel = dose_e_per_A2 * pixel_size**2
    mean = (per_pixel * (1 - 2 * sigma_e * images.double())).clamp_min(0).cpu().numpy()
    counts = np.stack([g.poisson(m) for g, m in zip(rngs, mean, strict=True)])
    return torch.from_numpy((1 - counts / per_pixel) / (2 * sigma_e)).float().to(images.device)
