"""The default reconstruction recipe (``method: xrai``): X-RAI bootstrapped by a bounded search.

The paper's recipe (``xrai-paper``) learns poses only through the gradient of the
reconstruction loss, and on a CPU it stays at chance for hours (docs/method.md). This
recipe keeps X-RAI's amortized encoder -- after training, an image's pose costs one
encoder pass plus a fixed-size local refinement -- but trains it differently:

1. **Radial normalisation.** Every image is divided by the data's mean amplitude
   profile ``profile(q) = pixel_factor(q) * scale * radial(|q|)`` (estimated from the
   images, no poses needed). The encoder and the losses work on ``z = amplitude /
   profile``, whose values are near 1 at every resolution.
2. **A voxel amplitude volume merged in closed form.** The decoder is a voxel grid ``v``
   on the config's :class:`~xrai.volume.ReciprocalGrid` with
   ``amplitude(k) = scale * radial(|k|) * v(k)``. ``v`` is not learned by gradient
   descent: each step splats the batch's normalised pixels at their target poses
   (trilinear, Friedel-symmetric) into running sums whose older content decays, so
   ``v = sum / weight`` is the running average of the recent images (online EM's
   M-step). It starts from images merged at random poses.
3. **Target poses by a bounded search.** For each image of the batch the candidates are
   the encoder's ``K`` heads, each as ``R`` and ``R @ RZ_PI``, and -- during the first
   ``search_steps`` steps only -- a fixed quasi-uniform SO(3) grid (:func:`xrai.so3grid.so3_grid`).
   The candidate with the lowest loss on a random subset of pixels wins, then a
   pattern search (rotations by ``refine_deg`` about x, y, z) refines it. The cost
   per step is fixed: it does not grow with the dataset size.
4. **A resolution curriculum.** Losses and merges use only pixels with
   ``|q| <= q_c(step)``, ``q_c`` rising from 0.3 of the detector's corner to all pixels
   (``curriculum``): at low resolution the loss landscape over SO(3) has few minima.
5. **A multi-head encoder trained by distillation.** The encoder (a small VGG-like CNN
   with ``K`` heads, each head's output bias starting at a different random rotation)
   is trained to predict the target pose: the loss is the squared Frobenius distance
   of the closest head (over ``R`` and ``R @ RZ_PI``) to the target (winner-takes-all),
   so heads specialise on different regions of SO(3) instead of averaging them.

Photon-starved patterns (Poisson likelihood, fewer than ``emc_start_photons`` signal photons
per mean pattern): hard assignments cannot bootstrap a volume, so the volume is EMC's
(:func:`xrai.recon.emc.emc_intensity`, soft assignments over an SO(3) grid, ``emc_start``'s
schedule) and stays fixed; the steps train only the encoder against it and no polish pass runs.

Inference (test images, the poses files): the ``K`` heads x 2 candidates are scored
against the volume, the best one is refined by the same pattern search with smaller
steps (``infer_refine_deg``): one encoder pass and a fixed number of volume lookups.

Usage::

    from xrai.config import load_config
    from xrai.recon.train import train
    train(load_config("config/test.yaml"), "xrai", 0, "train.h5", "test.h5", "out/run0")

or ``xrai train --method xrai ...`` (``xrai.recon.recipes.RECIPES["xrai"]`` is :class:`XraiRecipe`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from xrai.imaging import ImagingModel
from xrai.recon.emc import EMCSettings, emc_intensity
from xrai.recon.likelihood import (
    estimate_fluence,
    fitted_poisson_nll,
    nonzero_counts,
    signal_photons_per_pattern,
    sparse_fitted_poisson_nll,
)
from xrai.recon.losses import SymmetrizedLoss
from xrai.recon.recipe import Batch, Recipe
from xrai.rotations import (
    RZ_PI,
    axis_angle_to_matrix,
    quaternion_to_matrix,
    random_quaternions,
    sixd_to_matrix,
)
from xrai.so3grid import so3_grid
from xrai.volume import ReciprocalGrid, gaussian_smooth, sample_volume

logger = logging.getLogger(__name__)

#: images read before step 0 to estimate the radial amplitude profile
PROFILE_IMAGES = 4096
#: radial bins of the amplitude profile between |q| = 0 and the detector's corner
PROFILE_BINS = 64
#: merged weight below which a voxel counts as unobserved (it reads 1 = the radial profile)
MIN_WEIGHT = 1e-2


# --------------------------------------------------------------------------- settings

#: ``train.xrai.poisson``'s defaults: each step scores enough pixels to hold 400 photons of a mean pattern
#: (a quarter of the pixels, ~500 photons of a 2,000-photon pattern, works; ~50 of a 200-photon one does not:
#: the steps stay near chance; 400 keeps 2,000-photon sets at 256 pixels with a margin for the estimate of
#: the mean); at a few thousand photons per pattern an image's pose is
#: uncertain by ~1.5 degrees even against the true volume, and the encoder's guess is often
#: further off, so inference scores every pixel, starts the pattern search at 8 degrees and adds
#: the 15-degree grid to the encoder's candidates; the running-average volume of the steps is
#: noisier than one merged from every image, so four polish passes re-assign and re-merge the
#: whole training set, each merge sharpened against the blur of the hard assignments' pose errors
#: (less after the last, whose errors are smallest), and the final poses are local posterior means
#: (docs/method.md, "Photon counts", "Sharpening the polish merges" and "Posterior-mean poses": measured)
#: Below 100 signal photons per pattern the steps' hard assignments cannot bootstrap a volume (50 photons: chance)
#: and hard passes walk away from a good one, so the volume is EMC's and only the encoder is trained
#: (docs/method.md, "Below a hundred photons: EMC's volume")
POISSON_OVERRIDES = {"scored_photons": 400.0, "emc_start_photons": 100.0, "infer_pixels": 4096, "infer_refine_deg": [8.0, 4.0, 2.0, 1.0, 0.5, 0.25],
                     "infer_search_level": 2, "polish_passes": 4, "polish_sharpen": [1.0, 1.0, 1.0, 0.5],
                     "infer_posterior_mean_deg": 4.0, "infer_posterior_mean_temperature": 2.0}


#: ``train.xrai.emc_start``'s schedule where the config gives none: the photon curve's EMC at 50 photons
EMC_START_SCHEDULE = {"n_iterations": 50, "levels": [1, 2], "level_iterations": [35],
                      "beta": {"start": "auto", "factor": 1.4, "every": 3, "max": 1.0}}


def _per_pass(value: float | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """A number, or one number per polish pass, as a tuple of floats."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


@dataclass(frozen=True)
class XraiSettings:
    """The recipe's knobs (config ``train.xrai``); defaults are the measured recipe of docs/method.md."""

    heads: int = 8
    encoder_width: int = 16
    lr: float = 1e-3
    lr_final_fraction: float = 0.1
    search_level: int = 2
    search_steps: int = 750
    curriculum: tuple[tuple[int, float], ...] = ((0, 1.0),)
    pixels: int = 256
    scored_photons: float = 0.0
    refine_deg: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0, 0.5)
    infer_refine_deg: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5, 0.25)
    infer_pixels: int = 512
    infer_search_level: int = -1
    memory_images: tuple[int, int] = (2048, 8192)
    polish_passes: int = 0
    polish_sharpen: tuple[float, ...] = (0.0,)
    polish_sharpen_sigma: float = 1.0
    infer_posterior_mean_deg: float = 0.0
    infer_posterior_mean_points: int = 5
    infer_posterior_mean_temperature: float = 1.0
    emc_start_photons: float = 0.0
    emc_start: EMCSettings = field(default_factory=lambda: EMCSettings.from_config({"emc": EMC_START_SCHEDULE}))

    @classmethod
    def from_config(cls, cfg: dict, likelihood: str = "gaussian") -> XraiSettings:
        """Read ``train.xrai`` (missing keys take the defaults above); with the Poisson likelihood its
        ``poisson`` entries override the others (:data:`POISSON_OVERRIDES` where the config has none)."""
        x = dict(cfg.get("train", {}).get("xrai", {}) or {})
        poisson = x.pop("poisson", None)
        if likelihood == "poisson":
            x.update(POISSON_OVERRIDES if poisson is None else poisson)
        d = cls()
        return cls(
            heads=int(x.get("heads", d.heads)),
            encoder_width=int(x.get("encoder_width", d.encoder_width)),
            lr=float(x.get("lr", d.lr)),
            lr_final_fraction=float(x.get("lr_final_fraction", d.lr_final_fraction)),
            search_level=int(x.get("search_level", d.search_level)),
            search_steps=int(x.get("search_steps", d.search_steps)),
            curriculum=tuple((int(s), float(f)) for s, f in x.get("curriculum", d.curriculum)),
            pixels=int(x.get("pixels", d.pixels)),
            scored_photons=float(x.get("scored_photons", d.scored_photons)),
            refine_deg=tuple(float(v) for v in x.get("refine_deg", d.refine_deg)),
            infer_refine_deg=tuple(float(v) for v in x.get("infer_refine_deg", d.infer_refine_deg)),
            infer_pixels=int(x.get("infer_pixels", d.infer_pixels)),
            infer_search_level=int(x.get("infer_search_level", d.infer_search_level)),
            memory_images=tuple(int(v) for v in x.get("memory_images", d.memory_images)),
            polish_passes=int(x.get("polish_passes", d.polish_passes)),
            polish_sharpen=_per_pass(x.get("polish_sharpen", d.polish_sharpen)),
            polish_sharpen_sigma=float(x.get("polish_sharpen_sigma", d.polish_sharpen_sigma)),
            infer_posterior_mean_deg=float(x.get("infer_posterior_mean_deg", d.infer_posterior_mean_deg)),
            infer_posterior_mean_points=int(x.get("infer_posterior_mean_points", d.infer_posterior_mean_points)),
            infer_posterior_mean_temperature=float(x.get("infer_posterior_mean_temperature",
                                                         d.infer_posterior_mean_temperature)),
            emc_start_photons=float(x.get("emc_start_photons", d.emc_start_photons)),
            emc_start=EMCSettings.from_config({"emc": {**EMC_START_SCHEDULE, **(x.get("emc_start") or {})}}),
        )

    def sharpen_after_pass(self, index: int) -> float:
        """``polish_sharpen``'s amount after polish pass ``index`` (from 0; the last entry repeats)."""
        return self.polish_sharpen[min(index, len(self.polish_sharpen) - 1)]

    def q_fraction(self, step: int) -> float:
        """Curriculum: the fraction of the detector's corner |q| used at ``step`` (piecewise linear)."""
        pts = self.curriculum
        if step <= pts[0][0]:
            return pts[0][1]
        for (s0, f0), (s1, f1) in zip(pts, pts[1:], strict=False):
            if step < s1:
                return f0 + (f1 - f0) * (step - s0) / max(1, s1 - s0)
        return pts[-1][1]

    def memory(self, step: int, total: int) -> float:
        """Images the running volume remembers at ``step`` (grows linearly over the run)."""
        m0, m1 = self.memory_images
        return m0 + (m1 - m0) * min(1.0, step / max(1, total))


# --------------------------------------------------------------------------- rotations


def flips(device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(2, 3, 3)``: identity and ``RZ_PI`` (the in-plane pi rotation that nearly leaves an image unchanged)."""
    return torch.stack([torch.eye(3, dtype=torch.float64), RZ_PI]).to(device=device, dtype=dtype)


def pattern_moves(step_deg: float, device: torch.device | None = None) -> torch.Tensor:
    """``(7, 3, 3)``: the identity and rotations by +-``step_deg`` about x, y and z."""
    axes = torch.cat([torch.eye(3), -torch.eye(3)]).double()
    R = axis_angle_to_matrix(axes, torch.full((6,), math.radians(step_deg), dtype=torch.float64))
    return torch.cat([torch.eye(3, dtype=torch.float64)[None], R]).float().to(device)


# --------------------------------------------------------------------------- models


class MultiHeadPoseEncoder(nn.Module):
    """A small VGG-like CNN mapping a normalised amplitude image to ``heads`` rotations.

    Input: ``z`` (B, H, W), the amplitude divided by the radial profile (values near 1),
    seen as ``log(1 + z)``. Four stages of two 3x3 convolutions (``width``, 2x, 4x, 8x
    channels, each followed by batch normalisation and ReLU) with 2x2 average pooling, an MLP (512, 256) and a linear layer giving a 6D
    rotation per head. The output bias of every head starts at a different random
    rotation (``generator``), so the heads start spread over SO(3).

    Example::

        enc = MultiHeadPoseEncoder((32, 32), heads=8)
        R = enc(torch.rand(4, 32, 32))      # (4, 8, 3, 3)
    """

    def __init__(self, image_shape: tuple[int, int], heads: int = 8, width: int = 16,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        h, w = image_shape
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            if h >= 2 and w >= 2:
                layers.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d((min(h, 4), min(w, 4))), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(c_in * min(h, 4) * min(w, 4), 512), nn.ReLU(), nn.Linear(512, 256),
                                 nn.ReLU())
        self.heads = int(heads)
        self.out = nn.Linear(256, 6 * self.heads)
        for m in self.modules():  # He init: the default init makes 10 ReLU layers vanish (constant output)
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.out.weight.mul_(0.01)
            R0 = quaternion_to_matrix(random_quaternions(self.heads, generator=generator)).float()
            self.out.bias.copy_(torch.cat([R0[:, :, 0], R0[:, :, 1]], dim=-1).reshape(-1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(z.clamp_min(0)).unsqueeze(1)
        return sixd_to_matrix(self.out(self.mlp(self.features(x))).reshape(z.shape[0], self.heads, 6))


class MergedVoxelVolume(nn.Module):
    """Amplitude volume ``scale * radial(|k|) * v(k)`` with ``v = weighted_sum / weight`` merged from images.

    ``intensity=True`` (the Poisson likelihood): ``v`` is the *intensity* relative to the
    radial profile squared, and the amplitude is ``scale * radial(|k|) * sqrt(v)``.

    ``weighted_sum`` and ``weight`` are buffers on the ``grid`` (checkpointed with the
    model). :meth:`merge` decays them and splats new values trilinearly at ``k`` and
    ``-k`` (Friedel's law). Unobserved voxels read ``v = 1`` (the radial mean).

    Example::

        vol = MergedVoxelVolume(ReciprocalGrid(32, 0.12))
        vol.merge(torch.randn(100, 3) * 0.03, torch.rand(100), decay=0.9)
        amp = vol(torch.zeros(5, 3))            # amplitude at k = 0
    """

    def __init__(self, grid: ReciprocalGrid, intensity: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.intensity = bool(intensity)
        n = grid.size
        self.register_buffer("weighted_sum", torch.zeros(n, n, n))
        self.register_buffer("weight", torch.zeros(n, n, n))
        self.register_buffer("radial", torch.ones(PROFILE_BINS))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("relative", torch.ones(n, n, n))
        #: incremented by every :meth:`refresh` (caches of slices key on it)
        self.version = 0

    # -- profile
    def radial_at(self, q_abs: torch.Tensor) -> torch.Tensor:
        """The radial profile (relative, mean 1 over the detector) at ``|q|``, linear between bins."""
        t = (q_abs / self.grid.q_max * (PROFILE_BINS - 1)).clamp(0, PROFILE_BINS - 1)
        i0 = t.floor().long().clamp(max=PROFILE_BINS - 2)
        f = t - i0
        return self.radial[i0] * (1 - f) + self.radial[i0 + 1] * f

    # -- volume
    def refresh(self) -> None:
        """Recompute ``relative = weighted_sum / weight`` (1 where nothing was merged)."""
        ok = self.weight > MIN_WEIGHT
        self.relative = torch.where(ok, self.weighted_sum / self.weight.clamp_min(MIN_WEIGHT),
                                    torch.ones_like(self.weight))
        self.version += 1

    def set_intensity(self, intensity: torch.Tensor) -> None:
        """Make the volume ``intensity`` (n, n, n) on this grid (e.g. the true one, for the floor of a
        pose search): held in the merge sums as one image's worth, relative to the profile."""
        if tuple(intensity.shape) != tuple(self.weight.shape):
            raise ValueError(f"intensity of shape {tuple(intensity.shape)} on a grid of {tuple(self.weight.shape)}")
        profile = (self.scale * self.radial_at(self.grid.coordinates(dtype=torch.float32).norm(dim=-1))).clamp_min(1e-15)
        value = intensity.clamp_min(0) / profile**2 if self.intensity else intensity.clamp_min(0).sqrt() / profile
        self.weighted_sum.copy_(value)
        self.weight.fill_(1.0)
        self.refresh()

    def state_key(self) -> tuple:
        """Changes whenever ``relative`` may have changed (refresh, assignment, in-place copy)."""
        return (self.version, self.relative.data_ptr(), self.relative._version)

    def sample_relative(self, k: torch.Tensor) -> torch.Tensor:
        """``v(k)`` (no profile), trilinear; ``k`` (..., 3) in Angstrom^-1."""
        return sample_volume(self.relative, k, self.grid)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """Amplitude at ``k`` (..., 3): ``scale * radial(|k|) * v(k)`` (``sqrt(v)`` for an intensity volume)."""
        v = self.sample_relative(k)
        return self.scale * self.radial_at(k.norm(dim=-1)) * (v.clamp_min(0).sqrt() if self.intensity else v)

    @torch.no_grad()
    def sample_grid(self, coordinates: torch.Tensor, chunk: int = 262144) -> torch.Tensor:
        """Amplitude on a grid of coordinates (..., 3), in chunks."""
        flat = coordinates.reshape(-1, 3).to(self.relative.dtype)
        out = torch.cat([self(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)])
        return out.reshape(coordinates.shape[:-1])

    @torch.no_grad()
    def splat(self, k: torch.Tensor, values: torch.Tensor,
              weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Trilinear splats ``(sum of values, sum of weights)`` (n, n, n) of ``values`` at ``k`` and ``-k``
        (Friedel's law); ``weights`` 1 if not given. The buffers are not touched (:meth:`merge` adds them)."""
        k = k.reshape(-1, 3)
        values = values.reshape(-1)
        k = torch.cat([k, -k])
        values = torch.cat([values, values])
        wts = None if weights is None else torch.cat([weights.reshape(-1)] * 2).to(values.dtype)
        n = self.grid.size
        idx = k / self.grid.dq + n // 2
        i0 = idx.floor().long()
        frac = idx - i0
        acc_v = torch.zeros(n**3, dtype=values.dtype, device=values.device)
        acc_w = torch.zeros(n**3, dtype=values.dtype, device=values.device)
        for corner in range(8):
            offs = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=k.device)
            ii = i0 + offs
            # corners outside the grid get weight 0 (cheaper than boolean indexing)
            w = torch.where(offs.bool(), frac, 1 - frac).prod(dim=-1) * ((ii >= 0) & (ii < n)).all(dim=-1)
            ii = ii.clamp(0, n - 1)
            lin = (ii[:, 0] * n + ii[:, 1]) * n + ii[:, 2]
            acc_v.index_add_(0, lin, w * values)
            acc_w.index_add_(0, lin, w if wts is None else w * wts)
        return acc_v.reshape(n, n, n), acc_w.reshape(n, n, n)

    @torch.no_grad()
    def merge(self, k: torch.Tensor, values: torch.Tensor, decay: float, weights: torch.Tensor | None = None) -> None:
        """``sums <- decay * sums + splat(values at k and -k)``, ``weight <- decay * weight + splat(weights)``
        (``weights`` 1 if not given: ``v`` is then the mean value); then :meth:`refresh`.

        The Poisson merge passes the counts as ``values`` and ``phi * expected`` as ``weights``:
        ``v = sum counts / sum phi * profile``, the M-step of Poisson EM (hard assignments).
        """
        self.accumulate(*self.splat(k, values, weights), decay=decay)

    @torch.no_grad()
    def sharpen(self, sigma_voxels: float, amount: float) -> None:
        """Unsharp mask of the merged values: ``v + amount * (v - gaussian(v, sigma))``, at least 0, where merged.

        A hard-assignment merge is the truth blurred by its pose errors (and the trilinear splat);
        this puts part of that detail back before the next pass assigns poses against it.
        """
        merged = self.weight > MIN_WEIGHT
        v = self.relative
        sharp = (v + amount * (v - gaussian_smooth(v, sigma_voxels))).clamp_min(0)
        self.weighted_sum.copy_(torch.where(merged, sharp * self.weight, self.weighted_sum))
        self.refresh()

    def accumulate(self, sums: torch.Tensor, weights: torch.Tensor, decay: float) -> None:
        """``sums <- decay * sums + sums``, the same for the weights (splats of :meth:`splat`); then :meth:`refresh`.
        ``decay = 0`` replaces the volume by the given splats."""
        self.weighted_sum.mul_(decay).add_(sums)
        self.weight.mul_(decay).add_(weights)
        self.refresh()


class XraiModel(nn.Module):
    """Encoder + merged voxel volume + the detector's pixels, with the normalisation between them.

    ``imaging`` is the dataset's imaging model (its ``pixel_coordinates`` (H, W, 3) and, for
    X-ray, ``pixel_factor`` (H, W): the square root of polarization x solid angle relative
    to its mean). Buffer ``profile`` (H, W): the expected amplitude of every pixel,
    ``pixel_factor * scale * radial(|q|)``.
    """

    def __init__(self, encoder: MultiHeadPoseEncoder, decoder: MergedVoxelVolume, imaging: ImagingModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.imaging = imaging
        self.register_buffer("profile", torch.ones(imaging.image_shape))

    @property
    def q_pixels(self) -> torch.Tensor:
        """(P, 3) pixel coordinates, flattened."""
        return self.imaging.pixel_coordinates.reshape(-1, 3)

    def update_profile(self) -> None:
        q_abs = self.imaging.pixel_coordinates.norm(dim=-1)
        self.profile = self.imaging.form_image(self.decoder.scale * self.decoder.radial_at(q_abs)[None])[0]

    def normalise(self, amplitude: torch.Tensor) -> torch.Tensor:
        """``z = amplitude / profile`` (B, H, W)."""
        return amplitude / self.profile.clamp_min(1e-20)

    def render(self, R: torch.Tensor) -> torch.Tensor:
        """Predicted amplitude images (B, H, W) for poses ``R`` (B, 3, 3)."""
        v = self.decoder.sample_relative(self.imaging.coordinates(R))
        return self.profile * (v.clamp_min(0).sqrt() if self.decoder.intensity else v)

    def expected_counts(self, k: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Expected signal photons at unit fluence (..., P) of an intensity volume at ``k`` (..., P, 3) on ``pixels``."""
        return self.profile.reshape(-1)[pixels] ** 2 * self.decoder.sample_relative(k).clamp_min(0)


# --------------------------------------------------------------------------- pose scoring


def candidate_losses(model: XraiModel, R: torch.Tensor, z: torch.Tensor, pixels: torch.Tensor,
                     background: torch.Tensor | None = None) -> torch.Tensor:
    """Per-candidate loss ``(B, C)`` of poses ``R`` (B, C, 3, 3) for normalised pixels ``z`` (B, P).

    Gaussian (an amplitude volume): the squared error on the ``pixels`` (indices into the
    flattened detector) after the best non-negative scale per image and candidate (least
    squares, closed form), so that the ranking does not depend on the volume's overall
    brightness while it forms. Poisson (an intensity volume, ``z`` = raw counts): the
    negative log-likelihood per pixel at each candidate's maximum-likelihood fluence,
    with the expected ``background`` (P,) photons added.
    """
    k = torch.einsum("bcij,pj->bcpi", R, model.q_pixels[pixels])
    if model.decoder.intensity:
        return fitted_poisson_nll(z[:, None, :], model.expected_counts(k, pixels), background)
    y = model.decoder.sample_relative(k)
    zc = z[:, None, :]
    c = ((zc * y).sum(-1) / (y * y).sum(-1).clamp_min(1e-12)).clamp_min(0)
    return ((zc - c[..., None] * y) ** 2).mean(-1)


def grid_slices(model: XraiModel, grid_R: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`grid_search` needs of the slices of rotations ``grid_R`` (M, 3, 3) at ``pixels``:
    Poisson ``(log mu (M, P), log sum mu (M,))``, Gaussian ``(s (M, P), |s|^2 (M,))``.

    They depend only on the volume, so inference computes them once per volume for every batch.
    """
    k = torch.einsum("mij,pj->mpi", grid_R, model.q_pixels[pixels])
    if model.decoder.intensity:
        mu = model.expected_counts(k, pixels)
        return torch.log(mu.clamp_min(1e-6)), torch.log(mu.sum(1).clamp_min(1e-30))
    sl = model.decoder.sample_relative(k)
    return sl, (sl * sl).sum(1).clamp_min(1e-12)


def grid_search(model: XraiModel, grid_R: torch.Tensor, z: torch.Tensor, pixels: torch.Tensor,
                chunk: int = 8192, background: torch.Tensor | None = None,
                slices: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rotation of ``grid_R`` (M, 3, 3) per image and its loss (the same loss as :func:`candidate_losses`).

    The slices of all M rotations at the ``pixels`` are computed once (or passed as ``slices``,
    :func:`grid_slices` of the same rotations and pixels); the loss of every (image, rotation)
    pair is then a matrix product: Gaussian ``|z|^2 - max(z.s, 0)^2 / |s|^2``;
    Poisson without background ``(C - c.log(mu) + C log(sum mu / C)) / P``. With a
    background the Poisson loss is evaluated per pair on each image's non-zero pixels only
    (:func:`~xrai.recon.likelihood.sparse_fitted_poisson_nll`, the same value): a sparse
    pattern costs its number of photons, not ``P``.
    """
    best_l = torch.full((z.shape[0],), math.inf, device=z.device)
    best_i = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    zz = (z * z).sum(1, keepdim=True)
    q = model.q_pixels[pixels]
    poisson = model.decoder.intensity
    with_background = poisson and background is not None and bool((background > 0).any())
    if with_background:
        nz_index, nz_counts = nonzero_counts(z)
        nz_background, background_sum = background[nz_index], background.sum()
        # (B, chunk, K) per pair and EM iteration: a few million elements at a time
        chunk = max(64, min(chunk, 4_000_000 // max(1, nz_index.numel())))
    c_sum = z.sum(1, keepdim=True)
    for start in range(0, grid_R.shape[0], chunk):
        Rc = grid_R[start:start + chunk]
        if with_background:
            k = torch.einsum("mij,pj->mpi", Rc, q)
            mu = model.expected_counts(k, pixels)
            loss = sparse_fitted_poisson_nll(nz_counts[:, None], mu[:, nz_index].permute(1, 0, 2), mu.sum(1)[None],
                                             nz_background[:, None], background_sum, z.shape[1])
        else:
            a, b = (grid_slices(model, Rc, pixels) if slices is None
                    else (slices[0][start:start + chunk], slices[1][start:start + chunk]))
            if poisson:
                loss = (c_sum - z @ a.T + c_sum * b[None] - torch.xlogy(c_sum, c_sum)) / z.shape[1]
            else:
                loss = (zz - (z @ a.T).clamp_min(0) ** 2 / b) / z.shape[1]
        lmin, imin = loss.min(dim=1)
        better = lmin < best_l
        best_l = torch.where(better, lmin, best_l)
        best_i = torch.where(better, imin + start, best_i)
    return grid_R[best_i], best_l


def refine_poses(model: XraiModel, R: torch.Tensor, z: torch.Tensor, pixels: torch.Tensor,
                 steps_deg: tuple[float, ...], iterations: int = 1, background: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Pattern search: move each pose by the best of the identity and +-step about x, y, z, for each step size.

    A fixed number of volume lookups per image: ``7 * len(steps_deg) * iterations * P``.
    """
    b = torch.arange(R.shape[0], device=R.device)
    for step in steps_deg:
        moves = pattern_moves(step, R.device)
        for _ in range(iterations):
            C = R[:, None] @ moves[None]
            R = C[b, candidate_losses(model, C, z, pixels, background).argmin(dim=1)]
    return R


def posterior_mean_poses(model: XraiModel, R: torch.Tensor, counts: torch.Tensor, pixels: torch.Tensor,
                         half_width_deg: float, points: int, background: torch.Tensor | None = None,
                         temperature: float = 1.0, pairs: int = 4_000_000) -> torch.Tensor:
    """Each pose ``R`` (B, 3, 3) moved to the mean of its Poisson posterior over a local grid.

    The candidates are ``R @ exp(w)`` for rotation vectors ``w`` on a ``points``^3 grid within
    +-``half_width_deg`` about each axis; their weights are the likelihoods of the raw ``counts``
    (B, P) at the ``pixels`` (the negative log-likelihood of :func:`candidate_losses` summed over
    the pixels, each at its fitted fluence; a flat prior), raised to ``1 / temperature`` (above 1: a
    broader posterior, for a volume that is itself an estimate), and the pose returned is
    ``R @ exp(sum_w p(w) w)``. Where the posterior is as wide as the grid step (a few thousand
    photons per pattern: ~1.5 degrees), its mean has a smaller error than its maximum. Costs
    ``points**3`` volume lookups per pixel and image, in chunks of about ``pairs`` (image, candidate,
    pixel) triples.

    Example::

        R = posterior_mean_poses(model, R, counts[:, pixels], pixels, half_width_deg=3.0, points=7)
    """
    if points < 2:
        raise ValueError(f"posterior_mean_poses: points must be at least 2 (a grid symmetric about the pose), got {points}")
    g = torch.linspace(-1.0, 1.0, points, dtype=torch.float64) * math.radians(half_width_deg)
    w = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    offsets = axis_angle_to_matrix(w, w.norm(dim=-1)).to(R)
    w = w.to(R.device)
    chunk = max(1, pairs // (len(w) * max(1, len(pixels))))
    moved = []
    for s in range(0, R.shape[0], chunk):
        Rc = R[s:s + chunk]
        nll = candidate_losses(model, Rc[:, None] @ offsets[None], counts[s:s + chunk], pixels, background)
        p = torch.softmax(-(nll.double() * len(pixels) / temperature), dim=1)
        mean = p @ w
        moved.append(Rc @ axis_angle_to_matrix(mean, mean.norm(dim=-1)).to(R))
    return torch.cat(moved) if moved else R


def encoder_candidates(R_heads: torch.Tensor) -> torch.Tensor:
    """(B, K, 3, 3) -> (B, 2K, 3, 3): every head as ``R`` and ``R @ RZ_PI``."""
    f = flips(R_heads.device, R_heads.dtype)
    return (R_heads[:, :, None] @ f).reshape(R_heads.shape[0], -1, 3, 3)


def rendered_loss(model: XraiModel, batch: Batch, R: torch.Tensor, branch: torch.Tensor,
                  mask: torch.Tensor | None = None, background: torch.Tensor | None = None) -> SymmetrizedLoss:
    """Per-image loss of the volume rendered at poses ``R`` on the unmasked pixels (evaluation).

    Gaussian: the L2 between amplitudes. Poisson (an intensity volume): the negative
    log-likelihood per pixel of the raw counts at the fitted fluence, background included.
    """
    prediction = model.render(R)
    keep = torch.ones(prediction.shape[1:], dtype=torch.bool, device=R.device) if mask is None else mask
    if model.decoder.intensity:
        bg = None if background is None else background[keep]
        per_image = fitted_poisson_nll(batch.counts[:, keep], prediction[:, keep] ** 2, bg)
    else:
        per_image = ((prediction - batch.amplitude)[:, keep] ** 2).mean(1)
    return SymmetrizedLoss(per_image.mean(), per_image, branch, R, prediction)


def distillation_loss(R_heads: torch.Tensor, R_target: torch.Tensor) -> torch.Tensor:
    """Winner-takes-all: squared Frobenius distance of the closest head (R or R @ RZ_PI) to the target, averaged."""
    d = ((encoder_candidates(R_heads) - R_target[:, None]) ** 2).sum(dim=(-1, -2))
    return d.min(dim=1).values.mean()


# --------------------------------------------------------------------------- the recipe


class XraiRecipe(Recipe):
    """``method: xrai``: the search-bootstrapped, amortized recipe of this module's docstring.

    With the Poisson likelihood (``train.likelihood``, docs/method.md "Photon counts") the
    volume holds intensity, candidates are scored by the Poisson log-likelihood of the raw
    counts at a fitted per-image fluence, and the merge is Poisson EM's
    ``sum counts / sum phi * profile``. Masked pixels enter no score, merge or loss.
    """

    name = "xrai"

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.settings = XraiSettings.from_config(cfg)
        self._grid_R: torch.Tensor | None = None
        self._infer_grid_R: tuple[int, torch.Tensor] | None = None  # (level, rotations)
        #: (volume state key, pixels, slices) of the inference grid (:func:`grid_slices`)
        self._slices: tuple | None = None
        #: the volume is EMC's and stays fixed (:meth:`configure`, ``emc_start_photons``)
        self.volume_from_emc = False

    def configure(self, dataset: Any) -> None:
        """The base's likelihood, mask and background; then the settings for that likelihood, with ``pixels``
        raised (Poisson, ``scored_photons`` > 0) until the scored pixels hold ``scored_photons`` signal photons
        of a mean pattern (all usable pixels at most), and :attr:`volume_from_emc` set where a mean pattern
        holds fewer than ``emc_start_photons`` (Poisson, a recipe that learns poses)."""
        super().configure(dataset)
        s = XraiSettings.from_config(self.cfg, self.likelihood)
        photons = None
        if self.poisson and (s.scored_photons > 0 or s.emc_start_photons > 0):
            photons = max(signal_photons_per_pattern(dataset), 1.0)
        self.volume_from_emc = bool(self.learns_poses and photons is not None and photons < s.emc_start_photons)
        if self.volume_from_emc:
            logger.info("xrai: %.0f signal photons per pattern (< %.0f): the volume is EMC's, only the encoder is "
                        "trained", photons, s.emc_start_photons)
        if photons is not None and s.scored_photons > 0:
            usable = int(self.mask.sum())
            pixels = min(usable, max(s.pixels, math.ceil(usable * s.scored_photons / photons)))
            if pixels != s.pixels:
                logger.info("xrai: %.0f signal photons per pattern: each step scores %d pixels (not %d) to see %.0f",
                            photons, pixels, s.pixels, s.scored_photons)
                s = replace(s, pixels=pixels)
        self.settings = s
        self._grid_R = None

    @property
    def poisson(self) -> bool:
        return self.likelihood == "poisson"

    # -- model
    def build_model(self, imaging: ImagingModel) -> XraiModel:
        s = self.settings
        grid = imaging.reconstruction_grid(int(self.cfg.get("volume", {}).get("grid_size", 64)))
        encoder = MultiHeadPoseEncoder(imaging.image_shape, heads=s.heads, width=s.encoder_width,
                                       generator=torch.Generator().manual_seed(int(torch.initial_seed()) % 2**62))
        return XraiModel(encoder, MergedVoxelVolume(grid, intensity=self.poisson), imaging)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam on the encoder only (the volume is merged, not learned by gradient)."""
        return torch.optim.Adam(model.encoder.parameters(), lr=self.settings.lr)

    def _mask(self, model: XraiModel) -> torch.Tensor:
        shape = model.imaging.image_shape
        m = self.mask if self.mask is not None else torch.ones(shape, dtype=torch.bool)
        return m.to(model.profile.device)

    def _background(self, model: XraiModel) -> torch.Tensor:
        shape = model.imaging.image_shape
        b = self.background if self.background is not None else torch.zeros(shape)
        return b.to(model.profile.device).reshape(-1)

    @torch.no_grad()
    def prepare(self, model: XraiModel, dataset: Any, device: torch.device) -> None:
        """The radial amplitude profile from the data (unmasked pixels), and a first volume merged at random poses.

        Poisson: the profile is the square root of the radial mean of ``counts - background``;
        Gaussian: the radial mean of the amplitudes.
        """
        s = self.settings
        n = min(len(dataset), max(PROFILE_IMAGES, s.memory_images[0]))
        batches = [self.batch(dataset.read(i, min(i + 1024, n)), device) for i in range(0, n, 1024)]
        data = torch.cat([b.counts if self.poisson else b.amplitude for b in batches])
        dec = model.decoder
        mask = self._mask(model).reshape(-1).to(device).float()
        q_abs = model.imaging.pixel_coordinates.norm(dim=-1).reshape(-1)
        # amplitude without the detector's known factors: form_image of ones is that factor
        factor = model.imaging.form_image(torch.ones(1, *model.imaging.image_shape, device=data.device))[0].reshape(-1)
        if self.poisson:
            flat = ((data.reshape(data.shape[0], -1).mean(0) - self._background(model)) / factor**2).clamp_min(0)
        else:
            flat = (data.reshape(data.shape[0], -1) / factor).mean(0)
        t = (q_abs / dec.grid.q_max * (PROFILE_BINS - 1)).clamp(0, PROFILE_BINS - 1)
        i0 = t.floor().long().clamp(max=PROFILE_BINS - 2)
        f = t - i0
        num = torch.zeros(PROFILE_BINS, device=device).index_add_(0, i0, mask * flat * (1 - f))
        num.index_add_(0, i0 + 1, mask * flat * f)
        den = torch.zeros(PROFILE_BINS, device=device).index_add_(0, i0, mask * (1 - f)).index_add_(0, i0 + 1, mask * f)
        radial = num / den.clamp_min(1e-6)
        # bins without pixels (beyond the corner, near q = 0, behind the beam stop) take the nearest observed value
        seen = den > 1e-3
        idx = torch.arange(PROFILE_BINS, device=device)
        nearest = idx[seen][(idx[:, None] - idx[seen][None]).abs().argmin(dim=1)]
        radial = radial[nearest]
        if self.poisson:  # amplitudes: the square root of the intensity profile
            radial = radial.clamp_min(1e-12 * float(radial.max().clamp_min(1e-30))).sqrt()
            flat = flat.sqrt()
        scale = float(((flat * mask).sum() / mask.sum()).clamp_min(1e-20))
        dec.scale.fill_(scale)
        dec.radial.copy_(radial / scale)
        model.update_profile()
        if self.volume_from_emc:
            self.emc_volume(model, dataset, device)
        else:
            self.initial_volume(model, data)
        logger.info("xrai: radial profile from %d images (mean amplitude %.4g, %s likelihood); volume %d^3",
                    len(data), scale, self.likelihood, dec.grid.size)

    @torch.no_grad()
    def initial_volume(self, model: XraiModel, data: torch.Tensor) -> None:
        """The first volume: images (amplitudes, or counts for Poisson) at random poses (a near-isotropic start)."""
        s = self.settings
        m = min(len(data), s.memory_images[0])
        R0 = quaternion_to_matrix(random_quaternions(m)).float().to(data.device)
        pixels = self._pixels_within(model, s.q_fraction(0))
        merged = data[:m] if self.poisson else model.normalise(data[:m]) * self._mask(model)  # z for Gaussian
        self._merge(model, R0, merged.reshape(m, -1), pixels, decay=0.0)
        logger.info("xrai: first volume merged from %d images at random poses", m)

    @torch.no_grad()
    def emc_volume(self, model: XraiModel, dataset: Any, device: torch.device) -> None:
        """The volume of EMC (soft assignments over an SO(3) grid, ``emc_start``'s schedule) on ``dataset``,
        seeded by the run's seed; it stays fixed through the steps (no merges) and no polish pass runs."""
        t0 = time.perf_counter()
        intensity = emc_intensity(self.cfg, self.settings.emc_start, dataset, model.decoder.grid, device,
                                  seed=int(torch.initial_seed()) % 2**62)
        model.decoder.set_intensity(intensity.to(model.decoder.weight))
        logger.info("xrai: volume from EMC (%d images, at most %d iterations) in %.1f s", len(dataset),
                    self.settings.emc_start.n_iterations, time.perf_counter() - t0)

    # -- helpers
    def _pixels_within(self, model: XraiModel, fraction: float) -> torch.Tensor:
        """Unmasked pixels (flat indices) with ``|q| <= fraction`` of the corner."""
        q_abs = model.imaging.pixel_coordinates.norm(dim=-1).reshape(-1)
        keep = (q_abs <= fraction * float(q_abs.max()) * (1 + 1e-6)) & self._mask(model).reshape(-1)
        return torch.nonzero(keep).flatten()

    def observe(self, model: XraiModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scored (B, H*W), encoder input (B, H, W))`` of a batch.

        Gaussian: both are ``z = amplitude / profile``. Poisson: the scores use the raw
        counts; the encoder sees ``sqrt(counts / (phi0 * profile^2))`` with ``phi0`` the
        fluence fitted to the radial profile (so its input does not depend on the pulse).
        Masked pixels read 0 in the encoder's input.
        """
        mask = self._mask(model)
        B = len(batch)
        if not self.poisson:
            z = model.normalise(batch.amplitude) * mask
            return z.reshape(B, -1), z
        counts = batch.counts.reshape(B, -1)
        keep = mask.reshape(-1)
        expected = model.profile.reshape(-1) ** 2
        phi0 = estimate_fluence(counts[:, keep], expected[keep], self._background(model)[keep]).clamp_min(1e-12)
        z = (counts / (phi0[:, None] * expected.clamp_min(1e-20))).sqrt() * keep
        return counts, z.reshape(batch.counts.shape)

    def _score_background(self, model: XraiModel, pixels: torch.Tensor) -> torch.Tensor | None:
        if not self.poisson:
            return None
        bg = self._background(model)[pixels]
        return bg if bool((bg > 0).any()) else None

    @torch.no_grad()
    def _splat(self, model: XraiModel, R: torch.Tensor, data: torch.Tensor,
               pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Splats (sums, weights) of images (``data`` (B, H*W): z, or counts for Poisson) at poses ``R``
        (B, 3, 3) on ``pixels`` (:meth:`MergedVoxelVolume.splat`; the volume is not changed).

        Poisson: the fluence of every image is fitted at its pose, the counts are split into
        their expected signal share ``c * phi mu / (phi mu + b)`` when there is a background,
        and merged with weights ``phi * profile^2`` (Poisson EM's M-step).
        """
        k = torch.einsum("bij,pj->bpi", R, model.q_pixels[pixels])
        values = data[:, pixels]
        if not self.poisson:
            return model.decoder.splat(k, values)
        bg = self._score_background(model, pixels)
        mu = model.expected_counts(k, pixels)
        phi = estimate_fluence(values, mu, bg)
        if bg is not None:
            signal = phi[:, None] * mu
            values = values * signal / (signal + bg).clamp_min(1e-12)
        weights = phi[:, None] * model.profile.reshape(-1)[pixels] ** 2
        return model.decoder.splat(k, values, weights.expand_as(values))

    @torch.no_grad()
    def _merge(self, model: XraiModel, R: torch.Tensor, data: torch.Tensor, pixels: torch.Tensor,
               decay: float) -> None:
        """Merge images (``data`` (B, H*W): z, or counts for Poisson) at poses ``R`` on ``pixels`` (:meth:`_splat`)
        into the volume, whose older content decays by ``decay``."""
        model.decoder.accumulate(*self._splat(model, R, data, pixels), decay=decay)

    def inference_grid(self, device: torch.device) -> torch.Tensor:
        """The rotations of the Hopf grid of ``infer_search_level``."""
        level = self.settings.infer_search_level
        cached = self._infer_grid_R
        if cached is None or cached[0] != level or cached[1].device != device:  # keyed by level: settings may change
            self._infer_grid_R = cached = (level, quaternion_to_matrix(so3_grid(level)).float().to(device))
        return cached[1]

    def _grid_slices(self, model: XraiModel, grid_R: torch.Tensor,
                     pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`grid_slices` of the inference grid, computed once per volume (every batch reuses them)."""
        key = (id(model.decoder), model.decoder.state_key(), grid_R.shape[0])
        c = self._slices
        if c is None or c[0] != key or not torch.equal(c[1], pixels):
            self._slices = c = (key, pixels.clone(), grid_slices(model, grid_R, pixels))
        return c[2]

    def search_grid(self, device: torch.device) -> torch.Tensor:
        if self._grid_R is None or self._grid_R.device != device:
            self._grid_R = quaternion_to_matrix(so3_grid(self.settings.search_level)).float().to(device)
        return self._grid_R

    def _lr(self, step: int) -> float:
        """Constant, then cosine decay to ``lr_final_fraction`` over the second half of the run."""
        s = self.settings
        total = int(self.tcfg["steps"])
        t = (step - total / 2) / max(1.0, total / 2)
        if t <= 0:
            return s.lr
        return s.lr * (s.lr_final_fraction + (1 - s.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    # -- per step
    def training_step(self, model: XraiModel, optimizer: torch.optim.Optimizer, batch: Batch, step: int) -> dict:
        s = self.settings
        total = int(self.tcfg["steps"])
        B = len(batch)
        data, z = self.observe(model, batch)
        inside = self._pixels_within(model, s.q_fraction(step))
        pixels = inside[torch.randperm(inside.numel(), device=inside.device)[: s.pixels]]
        zp = data[:, pixels]
        bg = self._score_background(model, pixels)

        R_heads = model.encoder(z)
        with torch.no_grad():
            cands = encoder_candidates(R_heads.detach())
            losses = candidate_losses(model, cands, zp, pixels, bg)
            best_loss, best = losses.min(dim=1)
            target = cands[torch.arange(B), best]
            searched = torch.zeros(B, dtype=torch.bool, device=z.device)
            if step < s.search_steps:
                R_grid, grid_loss = grid_search(model, self.search_grid(z.device), zp, pixels, background=bg)
                searched = grid_loss < best_loss
                target = torch.where(searched[:, None, None], R_grid, target)
            target = refine_poses(model, target, zp, pixels, s.refine_deg, background=bg)
            if not self.volume_from_emc:
                decay = max(0.0, 1.0 - B / s.memory(step, total))
                self._merge(model, target, data, inside, decay)

        for group in optimizer.param_groups:
            group["lr"] = self._lr(step)
        optimizer.zero_grad(set_to_none=True)
        loss = distillation_loss(R_heads, target)
        loss.backward()
        nn.utils.clip_grad_norm_(model.encoder.parameters(), float(self.tcfg.get("grad_clip", 1.0)))
        optimizer.step()
        log_every = int(self.tcfg.get("log_every", 50))
        if step % log_every == 0:
            logger.info("xrai step %d: q <= %.2f of the corner, grid search won %.0f%% of the targets, "
                        "volume memory %.0f images", step, s.q_fraction(step), 100 * float(searched.float().mean()),
                        s.memory(step, total))
        return {"loss": float(loss.detach()), "searched": float(searched.float().mean()),
                "q_fraction": s.q_fraction(step)}

    # -- inference
    @torch.no_grad()
    def infer_poses(self, model: XraiModel, batch: Batch, refine: bool = True,
                    posterior_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses (B, 3, 3) and branch (B,) int8 of a batch: encoder heads, best by loss, refined, and (Poisson,
        ``infer_posterior_mean_deg`` > 0, ``posterior_mean``) moved to the local posterior mean."""
        s = self.settings
        B = len(batch)
        data, z = self.observe(model, batch)
        usable = self._pixels_within(model, 1.0)
        # a fixed, evenly spread subset of the unmasked pixels: deterministic inference
        pick = torch.linspace(0, usable.numel() - 1, min(usable.numel(), s.infer_pixels), device=z.device)
        pixels = usable[pick.round().long()]
        bg = self._score_background(model, pixels)
        cands = encoder_candidates(model.encoder(z))
        best_loss, best = candidate_losses(model, cands, data[:, pixels], pixels, bg).min(dim=1)
        R = cands[torch.arange(B), best]
        branch = (best % 2).to(torch.int8)
        if s.infer_search_level >= 0:  # a fixed grid as extra candidates: the same cost for every image
            grid_R = self.inference_grid(z.device)
            slices = None if bg is not None else self._grid_slices(model, grid_R, pixels)
            R_grid, grid_loss = grid_search(model, grid_R, data[:, pixels], pixels, background=bg, slices=slices)
            won = grid_loss < best_loss
            R = torch.where(won[:, None, None], R_grid, R)
            branch = torch.where(won, torch.zeros_like(branch), branch)
        if refine and s.infer_refine_deg:
            R = refine_poses(model, R, data[:, pixels], pixels, s.infer_refine_deg, iterations=2, background=bg)
        if refine and posterior_mean and s.infer_posterior_mean_deg > 0 and model.decoder.intensity:
            R = posterior_mean_poses(model, R, data[:, pixels], pixels, s.infer_posterior_mean_deg,
                                     s.infer_posterior_mean_points, background=bg,
                                     temperature=s.infer_posterior_mean_temperature)
        return R, branch

    @torch.no_grad()
    def infer(self, model: XraiModel, batch: Batch) -> SymmetrizedLoss:
        return rendered_loss(model, batch, *self.infer_poses(model, batch), mask=self._mask(model),
                             background=self._background(model).reshape(model.imaging.image_shape))

    # -- after the steps
    @torch.no_grad()
    def finish(self, model: XraiModel, dataset: Any, device: torch.device, batch_size: int) -> bool:
        """``polish_passes`` full-data EM iterations after the steps; True if the volume changed.

        Each pass infers the pose of every training image against the current volume
        (:meth:`infer_poses`: the same encoder, grid and pattern search as the test images), and
        then replaces the volume by the merge of all of them at once at those poses, nothing
        forgotten (the M-step of hard-assignment EM over the whole set). The cost of a pass is one inference of the training set (it grows with ``N``); the
        images are streamed in batches and only the two merged sums are kept (memory stays flat).
        None when the volume is EMC's (:attr:`volume_from_emc`): at tens of photons hard passes walk
        away from it (docs/method.md).
        """
        s = self.settings
        if s.polish_passes <= 0 or self.volume_from_emc:
            return False
        was_training = model.training
        model.eval()
        try:
            for p in range(s.polish_passes):
                t0 = time.perf_counter()
                # the refined maxima: merged at posterior means the passes ended higher (docs/method.md)
                if not self._merge_dataset(model, dataset, device, batch_size,
                                           lambda batch: self.infer_poses(model, batch, posterior_mean=False)[0]):
                    return False
                amount = s.sharpen_after_pass(p)
                if amount > 0:
                    model.decoder.sharpen(s.polish_sharpen_sigma, amount)
                logger.info("xrai polish pass %d/%d: %d images re-assigned and merged in %.1f s",
                            p + 1, s.polish_passes, len(dataset), time.perf_counter() - t0)
        finally:
            model.train(was_training)
        return True

    @torch.no_grad()
    def _merge_dataset(self, model: XraiModel, dataset: Any, device: torch.device, batch_size: int,
                       poses: Callable[[Batch], torch.Tensor]) -> bool:
        """Replace the volume by every image of ``dataset`` merged once at ``poses(batch)`` (streamed in
        batches; only the two merged sums are kept). False for an empty dataset."""
        pixels = self._pixels_within(model, 1.0)
        n = len(dataset)
        sums = weights = None
        for start in range(0, n, batch_size):
            batch = self.batch(dataset.read(start, min(start + batch_size, n)), device)
            data, _ = self.observe(model, batch)
            a, b = self._splat(model, poses(batch).to(data.dtype), data, pixels)
            sums, weights = (a, b) if sums is None else (sums + a, weights + b)
        if sums is None:
            return False
        model.decoder.accumulate(sums, weights, decay=0.0)
        return True


class XraiKnownPoseRecipe(XraiRecipe):
    """``method: xrai-known-pose``: the default recipe's merged volume at the *true* poses.

    The resolution bound of ``method: xrai`` (as ``known-pose`` is the bound of the paper's
    FourierNet): the same radial normalisation, likelihood and voxel grid, every unmasked
    pixel of every batch merged at its true rotation, nothing forgotten. No encoder is
    trained. The steps' merges measure progress; :meth:`finish` then replaces the volume by
    every training image merged once at its true pose, whatever ``steps * batch_size`` covered.
    """

    name = "xrai-known-pose"
    learns_poses = False

    @torch.no_grad()
    def initial_volume(self, model: XraiModel, data: torch.Tensor) -> None:
        """Start empty: every merged image sits at its true pose."""

    @torch.no_grad()
    def training_step(self, model: XraiModel, optimizer: torch.optim.Optimizer, batch: Batch, step: int) -> dict:
        data, _ = self.observe(model, batch)
        R = batch.rotations.to(data.dtype)
        pixels = self._pixels_within(model, 1.0)
        # loss of the volume so far at the true poses (on the batch, before merging it): a progress measure
        loss = candidate_losses(model, R[:, None], data[:, pixels], pixels, self._score_background(model, pixels))
        self._merge(model, R, data, pixels, decay=1.0)
        return {"loss": float(loss.mean())}

    def finish(self, model: XraiModel, dataset: Any, device: torch.device, batch_size: int) -> bool:
        """The bound's volume: every training image merged once at its true pose (no polish passes)."""
        t0 = time.perf_counter()
        merged = self._merge_dataset(model, dataset, device, batch_size, lambda batch: batch.rotations)
        logger.info("xrai-known-pose: %d images merged at their true poses in %.1f s", len(dataset),
                    time.perf_counter() - t0)
        return merged

    @torch.no_grad()
    def infer(self, model: XraiModel, batch: Batch) -> SymmetrizedLoss:
        R = batch.rotations.to(batch.amplitude.dtype)
        return rendered_loss(model, batch, R, torch.zeros(len(batch), dtype=torch.int8, device=R.device),
                             mask=self._mask(model),
                             background=self._background(model).reshape(model.imaging.image_shape))
