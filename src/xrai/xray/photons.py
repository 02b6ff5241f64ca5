"""Photon statistics of a simulated dataset: scaling mode, fluence jitter, mask and background.

The expected photons of image ``i`` in pixel ``p`` are::

    mu_ip = |F(R_i q_p)|^2 * fluence * r_e^2 * polarization_p * solid_angle_p * scale_i + background_p

and the stored count is ``Poisson(mu_ip)`` (``simulation.poisson_noise``), 0 at masked pixels.
``scale_i = mode factor * jitter_i``:

* ``photon_scaling.mode: min_total`` (the default, the X-RAI paper's appendix A.1): each image
  is scaled so that its total is at least ``simulation.min_total_intensity``;
* ``fluence``: the beam's true photons (factor 1);
* ``mean_photons``: one factor for the whole dataset, chosen so that the mean expected signal
  per pattern over orientations (the SO(3) grid at :data:`CALIBRATION_LEVEL`) is ``mean_photons``;
* ``fluence_jitter: s``: a per-pulse factor ``Gamma(shape 1/s^2, scale s^2)`` (mean 1, relative
  spread ``s``, as Dragonfly's ``make_data``), one random stream per image.

The mask (``beam_stop``, ``bad_pixels``) is True at usable pixels; the background is
``background.uniform`` plus a radial profile in pixels from the beam.

Usage::

    from xrai.xray.photons import PhotonSettings
    photons = PhotonSettings.from_config(cfg, Detector.from_config(cfg))
    print(photons.mode, photons.mask is None, photons.to_attrs())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from xrai.errors import XraiError
from xrai.xray.geometry import Detector

logger = logging.getLogger(__name__)

MODES = ("min_total", "fluence", "mean_photons")
#: SO(3) grid level (576 orientations) over which ``mean_photons`` is calibrated.
CALIBRATION_LEVEL = 1
#: ``storage: auto`` chooses sparse below this many expected photons per pixel (there 3x smaller
#: than float32, docs/benchmarks.md; break-even near 10).
SPARSE_PHOTONS_PER_PIXEL = 1.0


def pixel_radius_px(detector: Detector) -> torch.Tensor:
    """Distance of each pixel centre from the beam axis, in pixels, ``(H, W)`` float64."""
    pos = detector.pixel_positions_m()
    return pos[..., :2].norm(dim=-1) / detector.pixel_size_m


def detector_mask(sim_cfg: dict, detector: Detector) -> torch.Tensor | None:
    """Usable pixels (True) after the beam stop, the central gap and random bad pixels; None if all are usable.

    Example: ``detector_mask({"beam_stop": {"radius_px": 3}}, Detector(32, 0.1, 0.2))``.
    """
    stop = sim_cfg.get("beam_stop", {})
    bad = sim_cfg.get("bad_pixels", {})
    h, w = detector.shape
    mask = torch.ones((h, w), dtype=torch.bool)
    radius_px = float(stop.get("radius_m", 0)) / detector.pixel_size_m or float(stop.get("radius_px", 0))
    if radius_px > 0:
        mask &= pixel_radius_px(detector) > radius_px
    gap = int(bad.get("gap_px", 0))
    if gap > 0:
        lo = (h - gap) // 2
        mask[lo:lo + gap] = False
    fraction = float(bad.get("fraction", 0))
    if fraction > 0:
        rng = np.random.default_rng(int(bad.get("seed", 0)))
        n_bad = int(round(fraction * h * w))
        mask.view(-1)[torch.from_numpy(rng.choice(h * w, n_bad, replace=False))] = False
    if bool(mask.all()):
        return None
    if not bool(mask.any()):
        raise XraiError("config keys 'simulation.beam_stop' / 'simulation.bad_pixels' mask every pixel")
    return mask


def background_photons(sim_cfg: dict, detector: Detector) -> torch.Tensor | None:
    """Expected background photons per pixel per image ``(H, W)`` float64, or None without a background.

    ``uniform`` everywhere plus the ``radial`` profile ``[[radius_px, photons], ...]`` (linear
    between its points, 0 beyond the last). Example: ``{"uniform": 0.01, "radial": [[0, 0.2], [8, 0]]}``.
    """
    bg = sim_cfg.get("background", {})
    uniform = float(bg.get("uniform", 0))
    points = [(float(r), float(v)) for r, v in bg.get("radial", [])]
    if uniform == 0 and not any(v for _, v in points):
        return None
    out = torch.full(detector.shape, uniform, dtype=torch.float64)
    if points:
        radii, values = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        r = pixel_radius_px(detector).numpy()
        out += torch.from_numpy(np.interp(r, radii, values, left=values[0], right=0.0))
    return out


def jitter_factors(image_seeds: np.ndarray, spread: float) -> torch.Tensor:
    """Per-pulse fluence factors, one per image seed: Gamma, mean 1, std ``spread``, float64 ``(B,)``.

    Each image draws from its own generator (the simulator gives image ``i`` a fixed seed),
    so shards, batches and resumed runs give the same factors.
    """
    if spread <= 0:
        return torch.ones(len(image_seeds), dtype=torch.float64)
    shape, theta = 1.0 / spread**2, spread**2
    return torch.tensor([np.random.default_rng(int(s)).gamma(shape, theta) for s in image_seeds],
                        dtype=torch.float64)


@dataclass(frozen=True)
class PhotonSettings:
    """The photon model of ``simulation`` (see the module docstring); ``mask``/``background`` None when absent."""

    mode: str
    min_total_intensity: float
    mean_photons: float
    fluence_jitter: float
    poisson_noise: bool
    storage: str
    mask: torch.Tensor | None
    background: torch.Tensor | None

    @classmethod
    def from_config(cls, cfg: dict, detector: Detector) -> PhotonSettings:
        """Read ``cfg['simulation']`` (resolved config; missing new keys mean today's behaviour)."""
        sim = cfg["simulation"]
        scaling = sim.get("photon_scaling", {})
        mode = scaling.get("mode", "min_total")
        if mode not in MODES:
            raise XraiError(f"config key 'simulation.photon_scaling.mode': {mode!r} is not one of {list(MODES)}")
        return cls(mode=mode, min_total_intensity=float(sim.get("min_total_intensity", 20000)),
                   mean_photons=float(scaling.get("mean_photons", 2000)),
                   fluence_jitter=float(sim.get("fluence_jitter", 0)),
                   poisson_noise=bool(sim.get("poisson_noise", False)), storage=sim.get("storage", "dense"),
                   mask=detector_mask(sim, detector), background=background_photons(sim, detector))

    def signal_scale(self, patterns: torch.Tensor, dataset_factor: float) -> torch.Tensor:
        """The mode's factor per image ``(B,)`` float64 (jitter not included) for unscaled ``patterns`` ``(B, H, W)``."""
        if self.mode == "min_total":
            totals = patterns.sum(dim=(-2, -1), dtype=torch.float64)
            return torch.clamp(self.min_total_intensity / totals.clamp_min(1e-300), min=1.0)
        return torch.full((len(patterns),), float(dataset_factor), dtype=torch.float64, device=patterns.device)

    def to_attrs(self, dataset_factor: float, expected_photons: float) -> dict:
        """The settings as file attributes (JSON-able): what ``scale`` and the images contain."""
        return {
            "mode": self.mode, "min_total_intensity": self.min_total_intensity, "mean_photons": self.mean_photons,
            "dataset_factor": dataset_factor, "fluence_jitter": self.fluence_jitter,
            "poisson_noise": self.poisson_noise, "expected_photons_per_pattern": expected_photons,
            "background_photons_per_pattern": float(self.background.sum()) if self.background is not None else 0.0,
            "masked_pixels": int((~self.mask).sum()) if self.mask is not None else 0,
        }


def calibration_totals(simulator, level: int = CALIBRATION_LEVEL) -> torch.Tensor:
    """Unscaled photons per pattern ``(M,)`` float64 of the simulator over the SO(3) grid at ``level``."""
    from xrai.so3grid import so3_grid

    quats = so3_grid(level)
    return torch.cat([simulator.patterns(q).sum(dim=(-2, -1), dtype=torch.float64).cpu()
                      for q in quats.split(256)])


def dataset_factor_and_photons(photons: PhotonSettings, simulator) -> tuple[float, float]:
    """``(mode factor shared by the dataset, mean expected signal photons per pattern)``.

    The factor is 1 for ``fluence`` and ``min_total`` (whose factor is per image), and
    ``mean_photons / mean calibration total`` for ``mean_photons``; the mean is over the
    SO(3) calibration grid (for ``min_total``: of each total raised to the minimum).
    """
    totals = calibration_totals(simulator)
    if float(totals.mean()) <= 0:
        raise XraiError("the simulated patterns hold no photons (empty structure or detector outside the signal)")
    if photons.mode == "mean_photons":
        return photons.mean_photons / float(totals.mean()), photons.mean_photons
    if photons.mode == "min_total":
        return 1.0, float(totals.clamp_min(photons.min_total_intensity).mean())
    return 1.0, float(totals.mean())


def resolve_storage(photons: PhotonSettings, expected_photons: float, n_pixels: int) -> str:
    """``dense`` or ``sparse``: ``auto`` is sparse with Poisson counts below :data:`SPARSE_PHOTONS_PER_PIXEL`."""
    if photons.storage != "auto":
        return photons.storage
    background = float(photons.background.sum()) if photons.background is not None else 0.0
    per_pixel = (expected_photons + background) / n_pixels
    return "sparse" if photons.poisson_noise and per_pixel < SPARSE_PHOTONS_PER_PIXEL else "dense"
