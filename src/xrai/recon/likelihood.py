"""Which likelihood a reconstruction uses, and the Poisson one on raw photon counts.

Photon-counting detectors record integer counts ``c_p``. Their model is

    lambda_p = phi * mu_p + b_p,    c_p ~ Poisson(lambda_p)

with ``mu_p`` the model's expected signal (a slice of the intensity volume times the
detector's known factors), ``phi`` the image's unknown fluence (the pulse energy and the
particle's place in the beam vary from shot to shot) and ``b_p`` the expected background
photons per pixel (:attr:`xrai.data.hdf5.DiffractionDataset.background`). The counts are
never rescaled: ``phi`` is estimated per image (and per candidate pose) by maximum
likelihood, in closed form ``phi = sum c / sum mu`` without background, by a few EM
iterations with it.

Usage::

    import torch
    from xrai.recon.likelihood import estimate_fluence, poisson_nll
    mu = torch.rand(4, 100) + 0.1
    counts = torch.poisson(3.0 * mu)
    phi = estimate_fluence(counts, mu)           # ~3 for every image
    nll = poisson_nll(counts, phi[:, None] * mu)  # (4,) mean negative log-likelihood per pixel
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

#: the values of ``train.likelihood`` and ``emc.likelihood``
LIKELIHOODS = ("auto", "poisson", "gaussian")
#: EM iterations of the fluence estimate when a background is present
FLUENCE_ITERATIONS = 8
#: floor of an expected count (log lambda must stay finite where the model is 0)
_FLOOR = 1e-6
#: images read by ``auto`` to see whether a dataset holds integer counts
_PROBE_IMAGES = 16


def resolve_likelihood(name: str, dataset: Any, key: str = "train.likelihood") -> str:
    """``auto`` -> ``poisson`` for Poisson-noise datasets (their ``scaling.poisson_noise`` attribute, or
    integer-valued images with some zeros), else ``gaussian``; other names pass through.

    Example: ``resolve_likelihood("auto", DiffractionDataset("train.h5"))``.
    """
    if name not in LIKELIHOODS:
        raise XraiError(f"config key '{key}': {name!r} is not one of {list(LIKELIHOODS)}")
    if name != "auto":
        return name
    scaling = getattr(dataset, "attrs", {}).get("scaling", {})
    if isinstance(scaling, str):
        try:
            scaling = json.loads(scaling)
        except ValueError:
            scaling = {}
    if isinstance(scaling, dict) and "poisson_noise" in scaling:
        return "poisson" if scaling["poisson_noise"] else "gaussian"
    if not hasattr(dataset, "read") or len(dataset) == 0:
        return "gaussian"
    images = dataset.read(0, min(len(dataset), _PROBE_IMAGES))["images"].double()
    counts = bool((images == images.round()).all()) and bool((images == 0).any())
    return "poisson" if counts else "gaussian"


def estimate_fluence(counts: torch.Tensor, expected: torch.Tensor, background: torch.Tensor | None = None,
                     iterations: int = FLUENCE_ITERATIONS) -> torch.Tensor:
    """Maximum-likelihood fluence ``phi`` (...,) of counts ``c`` given the expected signal ``mu`` (..., P).

    ``lambda = phi * mu + b``. Without background (``None`` or all 0): ``sum c / sum mu``.
    With it: EM iterations ``phi <- sum(c * phi mu / (phi mu + b)) / sum mu`` from the
    background-subtracted estimate. ``counts`` broadcasts against ``expected``.
    """
    mu_sum = expected.sum(-1).clamp_min(1e-30)
    c_sum = counts.sum(-1)
    if background is None or not bool((background > 0).any()):
        return c_sum / mu_sum
    phi = ((c_sum - background.sum(-1)) / mu_sum).clamp_min(1e-3 * c_sum.clamp_min(1) / mu_sum)
    for _ in range(iterations):
        signal = phi[..., None] * expected
        phi = (counts * signal / (signal + background).clamp_min(_FLOOR)).sum(-1) / mu_sum
    return phi


def poisson_nll(counts: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of ``lambda - c log lambda`` (the Poisson negative log-likelihood without
    ``log c!``, which does not depend on the model); ``rate`` = lambda broadcasts against ``counts``."""
    lam = rate.clamp_min(_FLOOR)
    return (lam - counts * torch.log(lam)).mean(-1)


def fitted_poisson_nll(counts: torch.Tensor, expected: torch.Tensor,
                       background: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`poisson_nll` at the maximum-likelihood fluence of every row: ``(..., P) -> (...)``.

    Without background this is the profile likelihood in closed form:
    ``(C - sum c log mu + C log(sum mu / C)) / P`` with ``C = sum c``.
    """
    if background is None or not bool((background > 0).any()):
        c_sum = counts.sum(-1)
        mu_sum = expected.sum(-1).clamp_min(1e-30)
        log_term = (counts * torch.log(expected.clamp_min(_FLOOR))).sum(-1)
        return (c_sum - log_term + torch.xlogy(c_sum, mu_sum) - torch.xlogy(c_sum, c_sum)) / counts.shape[-1]
    phi = estimate_fluence(counts, expected, background)
    return poisson_nll(counts, phi[..., None] * expected + background)


def nonzero_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index (B, K), counts (B, K))`` of the non-zero pixels of each row of ``counts`` (B, P), zero-padded
    to the largest number ``K`` of non-zero pixels in the batch (padding: index 0, count 0)."""
    nz = counts > 0
    k = max(int(nz.sum(1).max()) if counts.numel() else 0, 1)
    # non-zero pixels first, in a stable order: sort by "is zero"
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices[:, :k]
    values = torch.gather(counts, 1, order)
    return torch.where(values > 0, order, torch.zeros_like(order)), values


def sparse_fitted_poisson_nll(counts_nz: torch.Tensor, mu_nz: torch.Tensor, mu_sum: torch.Tensor,
                              background_nz: torch.Tensor, background_sum: float | torch.Tensor,
                              n_pixels: int, iterations: int = FLUENCE_ITERATIONS) -> torch.Tensor:
    """:func:`fitted_poisson_nll` with a background, from the non-zero pixels only (the same value).

    ``counts_nz`` (..., K) are an image's non-zero counts (zero-padded), ``mu_nz`` (..., K) and
    ``background_nz`` (..., K) the expected signal and background at those pixels, ``mu_sum`` (...)
    the expected signal summed over all ``n_pixels`` scored pixels and ``background_sum`` the
    background's sum over them. Pixels without photons enter the likelihood only through the sums
    (``lambda - 0 log lambda``), so a pattern of tens of photons costs tens of terms, not ``n_pixels``
    (the sparsity that EMC codes for X-ray SPI exploit).
    """
    mu_sum = mu_sum.clamp_min(1e-30)
    c_sum = counts_nz.sum(-1)
    phi = ((c_sum - background_sum) / mu_sum).clamp_min(1e-3 * c_sum.clamp_min(1) / mu_sum)
    for _ in range(iterations):
        signal = phi[..., None] * mu_nz
        phi = (counts_nz * signal / (signal + background_nz).clamp_min(_FLOOR)).sum(-1) / mu_sum
    lam = (phi[..., None] * mu_nz + background_nz).clamp_min(_FLOOR)
    return (phi * mu_sum + background_sum - (counts_nz * torch.log(lam)).sum(-1)) / n_pixels


#: images read to estimate the photons per pattern (EMC's ``beta.start: auto``, the default's ``scored_photons``)
PHOTON_SAMPLE_IMAGES = 256


def signal_photons_per_pattern(dataset: Any, n: int = PHOTON_SAMPLE_IMAGES) -> float:
    """Mean photons per pattern over the usable pixels of the first ``n`` images of ``dataset`` (a
    :class:`~xrai.data.hdf5.DiffractionDataset`), less the expected background (none if it has no ``background``)."""
    photons = dataset.mean_photons_per_pattern(n)
    background = getattr(dataset, "background", None)
    return photons if background is None else photons - float(background.double()[dataset.mask].sum())
