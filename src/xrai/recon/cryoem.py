"""Cryo-EM reconstruction: the known-pose Wiener bound and the fast default (bounded search + closed-form merge).

Both work on RELION particle sets (:class:`xrai.data.star.ParticleDataset`) through the
cryo-EM imaging model (:class:`xrai.cryoem.imaging.CentralSliceImaging`: slice × CTF × shift
phase) and the CTF-weighted Wiener merge (:class:`xrai.recon.wiener.WienerMerge`).

* ``cryoem-known-pose``: one streamed pass at the true poses, shifts and CTF; the Wiener
  filter's SSNR from the two half sets. The best volume the data allow (a row of every table).
* ``xrai`` on a cryo-EM set (:class:`CryoemSearchRecipe`): the X-ray default's idea carried over
  to CTF, shifts and noise (``docs/method.md``). Every step takes one batch: a bounded search over
  a Hopf grid of rotations × a grid of shifts, scored by the least-squares fit of the CTF-modulated
  slice after its best scale (one complex matrix product per batch), on random Fourier pixels
  within the current resolution limit; a pattern-search refinement of rotation and shift; then the
  batch is merged into the running Wiener sums (older content decays, so the volume is the
  average of the last ``memory`` images: an online EM). The limit rises from ``q_start_A`` to
  ``q_end_A`` over the first ``ramp_fraction`` of the steps. The final volume is one more
  closed-form merge of the training set at its inferred poses, on a 2x padded grid.

The loop that runs them on a particle set is :func:`xrai.recon.cryoem_train.train_cryoem`.

Usage::

    recipe = CryoemSearchRecipe(cfg, imaging, seed=0)       # imaging: CentralSliceImaging of the set
    recipe.initialise(dataset)
    for step, batch in enumerate(batches):
        recipe.training_step(batch, step)
    R, origins_A = recipe.infer(batch)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xrai.config import settings_from_section
from xrai.fourier import sample_fourier
from xrai.imaging import ImagingModel
from xrai.recon.abinitio import MultiHeadPoseEncoder, pattern_moves
from xrai.recon.wiener import WienerMerge
from xrai.rotations import quaternion_to_matrix, random_quaternions, sixd_to_matrix
from xrai.so3grid import nominal_spacing_deg, so3_grid

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scoring


def fit_losses(obs: torch.Tensor, ctf: torch.Tensor | None, slices: torch.Tensor) -> torch.Tensor:
    """Least-squares misfit after the best non-negative scale: ``||F||² - max(<F, c S>, 0)² / ||c S||²``.

    ``obs`` (B, C, P) complex (already un-shifted), ``ctf`` (B, 1, P) or None, ``slices`` (B, C, P).
    """
    pred = slices if ctf is None else slices * ctf
    corr = (obs.conj() * pred).real.sum(-1)
    norm = (pred.abs() ** 2).sum(-1).clamp_min(1e-30)
    return (obs.abs() ** 2).sum(-1) - corr.clamp_min(0) ** 2 / norm


def shift_phases(k2: torch.Tensor, shifts_A: torch.Tensor) -> torch.Tensor:
    """``exp(+2 pi i k · origin)`` for pixels ``k2`` (P, 2) and origins (..., 2) in Å: (..., P) complex."""
    phase = 2 * math.pi * (shifts_A.to(k2) @ k2.T)
    return torch.polar(torch.ones_like(phase), phase)


def shift_grid(max_shift_A: float, points: int) -> torch.Tensor:
    """``points``² origins (x, y) in Å spanning ``[-max_shift_A, max_shift_A]`` (the origin alone if 1 point)."""
    if points <= 1 or max_shift_A <= 0:
        return torch.zeros(1, 2)
    ax = torch.linspace(-max_shift_A, max_shift_A, points)
    return torch.stack(torch.meshgrid(ax, ax, indexing="xy"), dim=-1).reshape(-1, 2)


# --------------------------------------------------------------------------- settings


@dataclass
class CryoemSearchSettings:
    """Knobs of the cryo-EM fast default (config ``train.xrai_cryoem``); the defaults are the measured ones."""

    steps: int = 400
    batch_size: int = 64
    search_level: int = 2
    search_pixels: int = 512
    search_q_A: float = 6.0
    shift_points: int = 5
    max_shift_A: float = 8.0
    refine_deg: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0)
    refine_shift_A: tuple[float, ...] = (1.0, 0.5)
    refine_pixels: int = 1024
    refine_q_deg: float = 1.0
    refine_repeats: int = 1
    refine_shift_per_deg: float = 0.25
    fsc_margin: float = 1.25
    infer_refine_deg: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
    infer_refine_shift_A: tuple[float, ...] = (1.0, 0.5, 0.25)
    infer_pixels: int = 4096
    infer_candidates: int = 4
    infer_candidates_until_deg: float = 2.0
    infer_refine_repeats: int = 2
    memory_images: tuple[int, int] = (1024, 4096)
    init_images: int = 512
    q_start_A: float = 20.0
    q_end_A: float = 0.0
    ramp_fraction: float = 0.6
    final_pad: int = 2
    polish_passes: int = 0
    encoder: bool = True
    heads: int = 8
    encoder_width: int = 16
    encoder_max_size: int = 64
    encoder_lr: float = 1e-3
    infer: str = "search"
    score_weighting: str = "whiten"
    train_snr_db: float | None = None

    #: read only after the training steps (final inference, polish, final merge): a change of them
    #: keeps the checkpoint of the steps valid
    POST_TRAINING = ("infer", "infer_refine_deg", "infer_refine_shift_A", "infer_pixels", "infer_candidates",
                     "infer_candidates_until_deg", "infer_refine_repeats", "polish_passes", "final_pad")

    def __post_init__(self) -> None:
        if self.score_weighting not in ("whiten", "none"):  # checked at construction, not at the first step
            raise ValueError(f"train.xrai_cryoem.score_weighting: expected 'whiten' or 'none', got {self.score_weighting!r}")

    @classmethod
    def from_config(cls, cfg: dict) -> CryoemSearchSettings:
        """``train.steps``, ``train.batch_size`` and ``train.xrai_cryoem`` (which overrides both) over the defaults."""
        train = cfg.get("train") or {}
        section = {k: train[k] for k in ("steps", "batch_size") if k in train} | dict(train.get("xrai_cryoem") or {})
        return settings_from_section(cls, section)

    def q_limit(self, step: int, q_nyquist: float) -> float:
        """The resolution limit (Å⁻¹) of ``step``: ``1 / q_start_A`` rising linearly to ``1 / q_end_A`` (0: Nyquist)."""
        q0 = min(1.0 / self.q_start_A, q_nyquist)
        q1 = q_nyquist if self.q_end_A <= 0 else min(1.0 / self.q_end_A, q_nyquist)
        t = min(1.0, step / max(1.0, self.ramp_fraction * self.steps))
        return q0 + t * (q1 - q0)

    def memory(self, step: int) -> float:
        a, b = self.memory_images
        return a + (b - a) * min(1.0, step / max(1, self.steps))


# --------------------------------------------------------------------------- the amortized encoder


class PoseShiftEncoder(MultiHeadPoseEncoder):
    """The X-ray default's multi-head CNN on standardised cryo-EM images, with a 2D origin (Å) per head.

    ``forward(images)`` -> rotations (B, K, 3, 3) and origins (B, K, 2); trained by winner-takes-all
    distillation of the search's targets (:func:`pose_shift_distillation`). Images larger than
    ``max_size`` are average-pooled by an integer factor first: the encoder only needs a start for
    the refinement, and at 128 px its full-size convolutions cost 4x the rest of a step.
    """

    def __init__(self, image_shape: tuple[int, int], heads: int = 8, width: int = 16, shift_scale_A: float = 4.0,
                 generator: torch.Generator | None = None, max_size: int = 64) -> None:
        self.pool = max(1, math.ceil(max(image_shape) / max(int(max_size), 1)))
        pooled = (image_shape[0] // self.pool, image_shape[1] // self.pool)
        super().__init__(pooled, heads=heads, width=width, generator=generator)
        self.shift_scale_A = float(shift_scale_A)
        self.shift = nn.Linear(256, 2 * self.heads)
        nn.init.zeros_(self.shift.weight)
        nn.init.zeros_(self.shift.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool > 1:
            images = nn.functional.avg_pool2d(images.unsqueeze(1), self.pool).squeeze(1)
        x = images - images.mean(dim=(-2, -1), keepdim=True)
        x = (x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).unsqueeze(1)
        feat = self.mlp(self.features(x))
        R = sixd_to_matrix(self.out(feat).reshape(len(images), self.heads, 6))
        return R, self.shift_scale_A * self.shift(feat).reshape(len(images), self.heads, 2)


def pose_shift_distillation(R_heads: torch.Tensor, t_heads: torch.Tensor, R_target: torch.Tensor,
                            t_target: torch.Tensor, shift_scale_A: float) -> torch.Tensor:
    """Squared Frobenius distance of the closest head to the target pose, plus its origin error in ``shift_scale_A``."""
    d = ((R_heads - R_target[:, None]) ** 2).sum(dim=(-1, -2))
    win = d.argmin(dim=1)
    n = torch.arange(len(win))
    shift = ((t_heads[n, win] - t_target) ** 2).sum(-1) / shift_scale_A**2
    return (d[n, win] + shift).mean()


# --------------------------------------------------------------------------- the search recipe


class CryoemSearchRecipe:
    """The fast default on cryo-EM data (this module's docstring); poses and shifts per image from a bounded search."""

    name = "xrai"
    learns_poses = True

    def __init__(self, cfg: dict, imaging: ImagingModel, seed: int = 0) -> None:
        self.s = CryoemSearchSettings.from_config(cfg)
        self.imaging = imaging
        self.gen = torch.Generator().manual_seed(int(seed))
        self.merge = WienerMerge(imaging.reconstruction_grid())
        self.volume = None  # complex (M,)*3, refreshed after each merge
        self.q_fsc = math.inf  # where the half-set FSC falls below 0.5 (Å⁻¹)
        self.grid_R = quaternion_to_matrix(so3_grid(self.s.search_level)).float()
        self.grid_step_deg = nominal_spacing_deg(self.s.search_level)
        self.shifts = shift_grid(self.s.max_shift_A, self.s.shift_points)
        q = imaging.pixel_coordinates.norm(dim=-1)
        self.q = q
        self.q_nyquist = 0.5 / imaging.pixel_size_A
        self.timings: dict[str, float] = {"search": 0.0, "refine": 0.0, "merge": 0.0, "encoder": 0.0}
        self.encoder = PoseShiftEncoder(imaging.image_shape, heads=self.s.heads, width=self.s.encoder_width,
                                        shift_scale_A=max(self.s.max_shift_A / 2, 1.0), generator=self.gen,
                                        max_size=self.s.encoder_max_size)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=self.s.encoder_lr)
        self.score_weight: torch.Tensor | None = None  # per Fourier pixel, set by initialise
        self.train_noise_sd: float | None = None  # set by initialise where train_snr_db is given

    def _shell_whitening(self, batch: dict) -> torch.Tensor:
        """``1 / sqrt(mean |F|²)`` of each Fourier shell over ``batch``, flattened over pixels (mean weight² 1).

        Without it the least-squares score is ruled by the lowest shells, whose power (the particle's
        overall shape) barely depends on the orientation; with a CTF the low shells are damped anyway.

        Usage::

            recipe.score_weight = recipe._shell_whitening(dataset.read(0, 512))
        """
        shells = torch.round(self.q / self.q[self.q > 0].min()).long().flatten()
        power = self.imaging.spectrum(batch["images"]).abs().pow(2).mean(0).flatten()
        mean = torch.zeros(int(shells.max()) + 1).index_add_(0, shells, power)
        mean = mean / torch.bincount(shells, minlength=len(mean)).clamp_min(1)
        weight = mean[shells].clamp_min(mean[mean > 0].min()).rsqrt()
        return weight / weight.pow(2).mean().sqrt()

    # -- pieces
    def _pixels(self, q_limit: float, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """Indices of ``count`` random Fourier pixels with ``0 < |k| <= q_limit`` (all of them if fewer)."""
        inside = torch.nonzero(((self.q > 0) & (self.q <= q_limit)).flatten()).flatten()
        if len(inside) <= count:
            return inside
        return inside[torch.randperm(len(inside), generator=generator)[:count]]

    def _observations(self, batch: dict) -> dict:
        """The batch's spectra, CTF and pixel coordinates, flattened over the Fourier pixels."""
        ctf = self.imaging.ctf(batch)
        spectrum = self.imaging.spectrum(batch["images"]).flatten(1)
        ctf = None if ctf is None else ctf.flatten(1)
        if self.score_weight is not None:  # weighted least squares: both sides times the weight
            spectrum = spectrum * self.score_weight
            ctf = self.score_weight[None] if ctf is None else ctf * self.score_weight
        return {"spectrum": spectrum, "ctf": ctf, "k": self.imaging.pixel_coordinates.reshape(-1, 3)}

    @staticmethod
    def _subset(data: dict, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        ctf = data["ctf"]
        return data["spectrum"][:, pixels], None if ctf is None else ctf[:, pixels], data["k"][pixels]

    def _slices(self, R: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Volume values at ``R @ k``: ``R`` (..., 3, 3), ``k`` (P, 3) -> (..., P) complex."""
        return sample_fourier(self.volume, torch.einsum("...ij,pj->...pi", R, k), self.merge.grid)

    def grid_search(self, obs: torch.Tensor, ctf: torch.Tensor | None, k: torch.Tensor, chunk: int = 1152,
                    top: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top`` best (grid rotation, grid shift) pairs per image, best first: ``(B, top, 3, 3)``, ``(B, top, 2)``.

        One matrix product per chunk of rotations: ``corr[b, s, g] = Re <F_b conj(phase_s), c_b S_g>``.
        """
        B, S = obs.shape[0], len(self.shifts)
        unshifted = obs[:, None, :] * shift_phases(k[:, :2], self.shifts).conj()[None]  # (B, S, P)
        weighted = unshifted if ctf is None else unshifted * ctf[:, None, :]
        w2 = torch.ones_like(obs.real) if ctf is None else ctf**2
        best_loss = torch.full((B, top), math.inf)
        best_flat = torch.zeros(B, top, dtype=torch.long)  # shift index * len(grid_R) + rotation index
        energy = (obs.abs() ** 2).sum(-1)
        G = len(self.grid_R)
        for g0 in range(0, G, chunk):
            slices = self._slices(self.grid_R[g0:g0 + chunk], k)  # (C, P)
            corr = (weighted.conj().reshape(B * S, -1) @ slices.T).real.reshape(B, S, -1)
            norm = (w2 @ (slices.abs() ** 2).T).clamp_min(1e-30)  # (B, C)
            loss = energy[:, None, None] - corr.clamp_min(0) ** 2 / norm[:, None, :]
            value, arg = loss.reshape(B, -1).topk(min(top, S * loss.shape[2]), dim=1, largest=False)
            flat = (arg // loss.shape[2]) * G + g0 + arg % loss.shape[2]
            best_loss, order = torch.cat([best_loss, value], 1).topk(top, dim=1, largest=False, sorted=True)
            best_flat = torch.cat([best_flat, flat], 1).gather(1, order)
        return self.grid_R[best_flat % G], self.shifts[best_flat // G].clone()

    def refine(self, data: dict, q_limit: float, R: torch.Tensor, t: torch.Tensor, rot_steps: tuple[float, ...],
               shift_steps: tuple[float, ...], generator: torch.Generator | None,
               pixels: int | None = None, repeats: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pattern search: rotations by ±step about x, y, z, then shifts by ±step in x, y, each kept if better.

        Each step scores ``pixels`` random Fourier pixels (default ``refine_pixels``) and makes up to
        ``repeats`` moves (default ``refine_repeats``): one move turns about one axis only, so an error
        about two or three axes needs as many moves at the step that fits it.

        A rotation step of ``d`` degrees is scored on pixels up to ``refine_q_deg / d`` Å⁻¹ (at most
        ``q_limit``): big steps see low resolution, where the misfit has no local minima that close.
        """
        n, count = torch.arange(len(R)), pixels or self.s.refine_pixels
        for step in rot_steps:
            obs, ctf, k = self._subset(data, self._pixels(min(q_limit, self.s.refine_q_deg / step), count, generator))
            ctf1 = None if ctf is None else ctf[:, None, :]
            for _ in range(self.s.refine_repeats if repeats is None else repeats):
                cand = R[:, None] @ pattern_moves(step).to(R)[None]  # (B, 7, 3, 3)
                loss = fit_losses(obs[:, None, :] * shift_phases(k[:, :2], t).conj()[:, None, :], ctf1,
                                  self._slices(cand, k))
                R = cand[n, loss.argmin(1)]
                # a shift error of a fraction of the resolution would mislead the next, finer rotation step
                t = self._shift_move(obs, ctf1, k, R, t, step * self.s.refine_shift_per_deg)
        obs, ctf, k = self._subset(data, self._pixels(q_limit, count, generator))
        ctf1 = None if ctf is None else ctf[:, None, :]
        for step in shift_steps:
            t = self._shift_move(obs, ctf1, k, R, t, step)
        return R, t

    def _shift_move(self, obs: torch.Tensor, ctf1: torch.Tensor | None, k: torch.Tensor, R: torch.Tensor,
                    t: torch.Tensor, step: float) -> torch.Tensor:
        """One pattern-search move of the origins: ``t`` or ``t ± step`` in x or y, the best fit kept."""
        moves = torch.tensor([[0.0, 0.0], [1, 0], [-1, 0], [0, 1], [0, -1]])
        cand = t[:, None, :] + step * moves[None]  # (B, 5, 2)
        loss = fit_losses(obs[:, None, :] * shift_phases(k[:, :2], cand).conj(), ctf1, self._slices(R, k)[:, None, :])
        return cand[torch.arange(len(t)), loss.argmin(1)]

    def align(self, batch: dict, q_limit: float, search: bool = True, generator: torch.Generator | None = None,
              rot_steps: tuple[float, ...] | None = None, shift_steps: tuple[float, ...] | None = None,
              R0: torch.Tensor | None = None, t0: torch.Tensor | None = None,
              candidates: int = 1, pixels: int | None = None, candidates_until_deg: float = 0.0,
              repeats: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation and origin (Å) per image of ``batch`` against the current volume: search, then refinement.

        ``candidates > 1``: that many of the grid's best (rotation, shift) pairs are each refined, and the
        one that fits best at ``q_limit`` is kept (a multi-start against a wrong basin of the coarse grid).
        ``pixels``: Fourier pixels per refinement score (default ``refine_pixels``).
        ``candidates_until_deg > 0``: the candidates are refined only with the rotation steps of at least
        that many degrees, on ``refine_pixels``; the winner (chosen on ``pixels``) alone takes the finer
        steps and the shift steps on ``pixels`` (the cost of the large sample is paid once per image).
        ``repeats``: moves per refinement step (default ``refine_repeats``).
        """
        t_start = time.perf_counter()
        data = data_single = self._observations(batch)
        top = max(1, int(candidates)) if search else 1
        if search:
            q_search = min(q_limit, 1.0 / self.s.search_q_A)  # a coarse grid sees only low resolution
            R, t = self.grid_search(*self._subset(data, self._pixels(q_search, self.s.search_pixels, generator)),
                                    top=top)
            R, t = R.reshape(-1, 3, 3), t.reshape(-1, 2)
            if top > 1:  # every candidate refined as an image of its own (a shared (1, P) weight stays shared)
                data = {key: v if key == "k" or v is None or len(v) == 1 else v.repeat_interleave(top, 0)
                        for key, v in data.items()}
        else:
            R, t = R0, t0
        t_mid = time.perf_counter()
        rot_steps = self.s.refine_deg if rot_steps is None else tuple(rot_steps)
        shift_steps = self.s.refine_shift_A if shift_steps is None else tuple(shift_steps)
        fine: tuple[float, ...] = ()
        if top > 1 and candidates_until_deg > 0:
            fine = tuple(step for step in rot_steps if step < candidates_until_deg)
            rot_steps = tuple(step for step in rot_steps if step >= candidates_until_deg)
        R, t = self.refine(data, q_limit, R, t, rot_steps, () if fine else shift_steps, generator,
                           None if fine else pixels, repeats)
        if top > 1:  # the refined candidate that fits best at the full limit
            obs, ctf, k = self._subset(data, self._pixels(q_limit, pixels or self.s.refine_pixels, generator))
            loss = fit_losses(obs * shift_phases(k[:, :2], t).conj(), ctf, self._slices(R, k)).reshape(-1, top)
            n, best = torch.arange(len(loss)), loss.argmin(1)
            R, t = R.reshape(-1, top, 3, 3)[n, best], t.reshape(-1, top, 2)[n, best]
        if fine:
            R, t = self.refine(data_single, q_limit, R, t, fine, shift_steps, generator, pixels, repeats)
        self.timings["search"] += t_mid - t_start
        self.timings["refine"] += time.perf_counter() - t_mid
        return R, t

    def merge_batch(self, batch: dict, R: torch.Tensor, t: torch.Tensor, q_insert: float) -> None:
        t0 = time.perf_counter()
        spectrum = self.imaging.spectrum(batch["images"])
        factors_batch = {key: v for key, v in batch.items() if key != "shifts_A"} | {"shifts_A": t}
        self.merge.insert(self.imaging, spectrum, R, factors_batch, pixels=self.q <= q_insert)
        self.use_merge(self.merge)
        self.timings["merge"] += time.perf_counter() - t0

    def use_merge(self, merge: WienerMerge) -> None:
        """Align against ``merge``'s volume from now on (any grid of the images' pixel size, e.g. a polish
        pass's full-data merge on a finer, padded grid); the resolution limit follows its half-set FSC."""
        self.merge = merge
        self.volume = merge.spectrum()
        fsc = merge.half_fsc()
        below = torch.nonzero(fsc[1:] < 0.5).flatten()
        shell = (int(below[0]) + 1) if len(below) else len(fsc) - 1
        self.q_fsc = shell / (merge.grid.size * self.imaging.pixel_size_A)

    # -- checkpoints
    def state_dict(self) -> dict:
        """Everything the training steps change: the running merge, the encoder and its optimizer, the RNG,
        the whitening weight and the training-noise level (a resumed run continues bit for bit on the CPU)."""
        return {"merge": {"num": self.merge.num, "den": self.merge.den}, "encoder": self.encoder.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.gen.get_state(),
                "score_weight": self.score_weight, "train_noise_sd": self.train_noise_sd,
                "timings": dict(self.timings)}

    def load_state_dict(self, state: dict) -> None:
        self.merge.num.copy_(state["merge"]["num"])
        self.merge.den.copy_(state["merge"]["den"])
        self.use_merge(self.merge)
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.score_weight, self.train_noise_sd = state["score_weight"], state["train_noise_sd"]
        self.timings = dict(state["timings"])

    # -- training
    def initialise(self, dataset: Any) -> None:
        """The first volume: ``init_images`` images merged at random rotations, no shift (a near-isotropic blob)."""
        n = min(len(dataset), self.s.init_images)
        batch = dataset.read(0, n)
        if self.s.train_snr_db is not None:
            self.train_noise_sd = self.imaging.white_noise_sd(batch["images"], self.s.train_snr_db)
            batch = self.with_training_noise(batch)
        if self.s.score_weighting == "whiten":
            self.score_weight = self._shell_whitening(batch)
        R = quaternion_to_matrix(random_quaternions(n, generator=self.gen)).float()
        self.merge_batch(batch, R, torch.zeros(n, 2), self.s.q_limit(0, self.q_nyquist))

    def alignment_limit(self, step: int) -> float:
        """The schedule's resolution limit, capped at ``fsc_margin`` x where the half-set FSC falls below 0.5."""
        return min(self.s.q_limit(step, self.q_nyquist), self.s.fsc_margin * self.q_fsc, self.q_nyquist)

    def with_training_noise(self, batch: dict) -> dict:
        """``batch`` with white noise of ``train_noise_sd`` added to its images (``train_snr_db``; else as it is).

        Measured on noise-free images (dataset A of cryoPoseNet's Table 1): the same search that
        converges at 10 dB stalls in a wrong, self-consistent volume without noise; the noise is
        added to the training steps only, the final inference and merge use the images as recorded.
        """
        if self.train_noise_sd is None:
            return batch
        noise = torch.randn(batch["images"].shape, generator=self.gen) * self.train_noise_sd
        return batch | {"images": batch["images"].float() + noise}

    def training_step(self, batch: dict, step: int) -> dict:
        batch = self.with_training_noise(batch)
        q_limit = self.alignment_limit(step)
        R, t = self.align(batch, q_limit, generator=self.gen)
        self.merge.decay(1.0 - len(R) / self.s.memory(step))
        self.merge_batch(batch, R, t, min(self.q_nyquist, 1.5 * q_limit))
        info = {"q_limit_A": 1.0 / q_limit}
        if self.s.encoder:
            info["encoder_loss"] = self.distil(batch, R, t)
        return info

    def distil(self, batch: dict, R: torch.Tensor, t: torch.Tensor) -> float:
        """One Adam step of the encoder towards the batch's search targets (winner-takes-all)."""
        t0 = time.perf_counter()
        self.encoder.train()
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            loss = pose_shift_distillation(*self.encoder(batch["images"].float()), R, t.float(),
                                           self.encoder.shift_scale_A)
            loss.backward()
            self.optimizer.step()
        self.timings["encoder"] += time.perf_counter() - t0
        return float(loss.detach())

    @torch.no_grad()
    def encoder_poses(self, batch: dict, refine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Amortized inference: the best-fitting head (one encoder pass), then the bounded refinement."""
        self.encoder.eval()
        R_heads, t_heads = self.encoder(batch["images"].float())
        q_limit = self.alignment_limit(self.s.steps)
        gen = torch.Generator().manual_seed(1)
        data = self._observations(batch)
        obs, ctf, k = self._subset(data, self._pixels(q_limit, self.s.infer_pixels, gen))
        unshifted = obs[:, None, :] * shift_phases(k[:, :2], t_heads).conj()
        loss = fit_losses(unshifted, None if ctf is None else ctf[:, None, :], self._slices(R_heads, k))
        n = torch.arange(len(R_heads))
        R, t = R_heads[n, loss.argmin(1)], t_heads[n, loss.argmin(1)]
        if refine:
            R, t = self.refine(data, q_limit, R, t, self.s.infer_refine_deg, self.s.infer_refine_shift_A, gen,
                               self.s.infer_pixels, self.s.infer_refine_repeats)
        return R, t

    @torch.no_grad()
    def infer(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pose and origin of each image at the final resolution limit: ``infer: search`` (grid search and the
        finer refinement) or ``infer: encoder`` (one encoder pass, then the same refinement)."""
        if self.s.infer == "encoder":
            return self.encoder_poses(batch)
        q_limit = self.alignment_limit(self.s.steps)
        gen = torch.Generator().manual_seed(1)
        return self.align(batch, q_limit, generator=gen, rot_steps=self.s.infer_refine_deg,
                          shift_steps=self.s.infer_refine_shift_A, candidates=self.s.infer_candidates,
                          pixels=self.s.infer_pixels, candidates_until_deg=self.s.infer_candidates_until_deg,
                          repeats=self.s.infer_refine_repeats)
