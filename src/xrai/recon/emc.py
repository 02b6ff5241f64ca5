"""Expand-maximize-compress (EMC): the non-amortized baseline (``xrai emc``).

EMC (Loh & Elser, Phys. Rev. E 80, 026705, 2009; the Dragonfly implementation, Ayyer et
al., J. Appl. Cryst. 49, 1320, 2016) reconstructs the 3D intensity ``I`` by expectation
maximisation over a discrete set of orientations ``R_j`` (:mod:`xrai.so3grid`):

* **expand**: the model's slices ``W_jp = c_p I(R_j q_p)`` at the Ewald-sphere pixel
  coordinates ``q_p`` (``c_p``: the detector's known polarization x solid angle, normalised);
* **maximize**: per image ``i`` and orientation ``j`` the log-likelihood ``L_ij`` of the image
  ``K_i`` given the slice ``W_j``, and the tempered posterior ``P_ij ~ w_j exp(beta L_ij)``
  (deterministic annealing: ``beta < 1`` flattens it);
* **compress**: the new model from the probability-weighted images, merged into the 3D grid
  by trilinear insertion (:func:`xrai.volume.insert_trilinear`) and Friedel-symmetrised
  (``I(q) = I(-q)``).

Likelihoods (``emc.likelihood``; ``auto`` picks Poisson when the dataset says it holds
Poisson photon counts, Gaussian for noise-free data):

* Poisson: ``L_ij = sum_p K_ip log(phi W_jp) - phi W_jp - log K_ip!``;
* Gaussian: ``L_ij = -sum_p (K_ip - phi W_jp)^2 / (2 sigma_s^2) + log normalisers``, with one
  variance per resolution shell ``s`` re-estimated every iteration (the EM update), so the
  weight of each shell follows how well the model already fits it.

``phi = 1`` unless ``emc.per_image_scale`` (``auto``: on for Poisson): then each (image,
orientation) pair gets its maximum-likelihood scale (Poisson ``sum K / sum W``; Gaussian
``<K, W> / <W, W>``, clipped at 0), for data whose incident fluence varies. The Poisson
likelihood reads the raw photon counts: dividing them by the simulator's ``scale`` (as the
Gaussian path does, exactly as ``xrai train`` does for noise-free data) would turn a
2,000-photon pattern into ~12 fractional "photons" and flatten the posterior to ``1 / M``
(issue 17). Masked pixels (:attr:`xrai.data.hdf5.DiffractionDataset.mask`) are left out
of every likelihood and merge. A background is not modelled here (a warning says so).

Guarantee. The compress step is a generalised EM step: the merge gives a search
direction, and the step along it is the exact maximiser in ``[0, 1]`` of the expected
complete-data log-likelihood (computed from the slices, which are linear in the model);
when the merge is not uphill, a majorise-minimise step replaces it (see
``ExpandMaximizeCompress._compress``). So at fixed ``beta`` and orientation grid, the objective
``sum_i (1 / beta) log sum_j w_j exp(beta L_ij)`` never decreases; at ``beta = 1`` it is the
log-likelihood (``tests/test_emc.py`` checks it).

Annealing. From a random model, ``beta`` rising from 0.05 by x1.4 per iteration on the
coarse grid (576 orientations) finds the right basin in all of 4 seeds tried at the test
scale, where a fixed ``beta = 1`` stalls in a wrong optimum for some seeds. A Poisson
log-likelihood grows with the photons of a pattern, and the tempered posterior of an
``N``-photon pattern is that of a ``beta N``-photon one; so ``emc.beta.start: auto`` (the
default) starts Poisson data at :data:`AUTO_BETA_START_PHOTONS` / ``N`` (``N``: the mean signal
photons per pattern, capped at ``beta.max``) and Gaussian data at 0.05. At 20,000 photons a
start of 0.05 hardens the posterior of a random model within three iterations (max
probability 0.7) and EMC ends 42 deg off; from 0.005 it reaches its grid's resolution
(docs/benchmarks.md, issue 17). At tens of photons no annealing is needed: the posterior
is flat at ``beta = 1`` already.

Cost and memory. One iteration at grid level ``l`` (``M = 72 * 8**l`` orientations) costs two
``N x M x P`` matrix products (``P`` pixels), plus ``M x P`` interpolations. Images stream
from the dataset in chunks of ``emc.chunk_size``, so memory is ``O(M P + chunk M)``,
independent of the number of images. The orientation grid is refined on a schedule
(``emc.levels`` / ``emc.level_iterations``); ``beta`` follows
``min(beta.max, beta.start * beta.factor ** (iteration // beta.every))``. Iterations stop at
``emc.n_iterations`` or, at the last level and final ``beta``, when the relative model change
and the relative log-likelihood change both fall below ``emc.tolerance``.

Outputs (``--out-dir``, the same files as ``xrai train``): ``intensity.h5`` (``intensity``,
``amplitude`` on :func:`xrai.xray.geometry.reciprocal_grid`), ``amplitude.mrc``, ``poses_train.h5``
(the most likely orientation of each training image at the last iteration) and
``poses_test.h5`` (test images matched against the final model at the finest level),
``metrics.csv``, ``config.yaml``, ``provenance.json``. ``checkpoint.pt`` is written after
every iteration; rerunning the same command resumes from it.

Usage::

    xrai emc --config config/test.yaml --run 0 \\
        --train-data results/datasets/2CEX_A/train_2048.h5 \\
        --test-data results/datasets/2CEX_A/test_512.h5 \\
        --out-dir results/reconstructions/2CEX_A/2048/emc/run0

or from Python::

    from xrai.recon.emc import run_emc
    run_emc(load_config("config/test.yaml"), 0, "train.h5", "test.h5", "out/run0")
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from xrai.errors import XraiError
from xrai.recon.likelihood import LIKELIHOODS, resolve_likelihood, signal_photons_per_pattern
from xrai.rotations import quaternion_to_matrix
from xrai.so3grid import grid_size, so3_grid, so3_grid_weights
from xrai.volume import ReciprocalGrid, trilinear

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: ``emc.beta.start: auto`` on Poisson data: the annealing starts where a pattern weighs as
#: this many photons (``beta N``); 0.05 at 2,000 photons, the start measured good there
AUTO_BETA_START_PHOTONS = 100.0
#: ``emc.beta.start: auto`` on Gaussian (noise-free) data
AUTO_BETA_START_GAUSSIAN = 0.05
#: columns of metrics.csv (``step`` = iteration; test_pose_* only on the final row)
METRIC_COLUMNS = (
    "step", "level", "n_orientations", "beta", "log_likelihood", "objective", "model_change", "merge_step", "mm_step",
    "mean_max_probability", "train_pose_median_deg", "iteration_s", "wall_s", "rss_mb",
    "test_pose_median_deg", "test_pose_mse_deg2", "test_pose_frac_within_5",
)
#: training images whose pose error is logged every iteration (the first ones of the file)
TRAIN_POSE_IMAGES = 4096
#: floor of the Gaussian variance per shell, relative to the shell's mean squared intensity
_SIGMA2_FLOOR = 1e-8
#: floor of the Poisson model, relative to the mean slice value (log W must stay finite)
_POISSON_FLOOR = 1e-8
#: posterior terms this far (in log) below an image's best orientation count as 0
_LOG_CUTOFF = 50.0
#: elements of one (images, orientations) matrix: caps the image chunk at fine levels (256 MB)
_CHUNK_ELEMENTS = 1 << 26
#: points per trilinear expand / merge call (bounds the (points, 3) coordinate buffers)
_POINTS_PER_CALL = 1 << 22


# --------------------------------------------------------------------------- settings

#: settings a resumed run must share with its checkpoint
_RESUME_KEYS = ("levels", "level_iterations", "beta_start", "beta_factor", "beta_every", "beta_max",
                "likelihood", "per_image_scale", "seed")
#: what a checkpoint must share with the run that resumes it (else the run starts afresh)
_CHECKPOINT_KEYS = ("method", "seed", "n_train", "likelihood", "settings", "config", "train_fingerprint")


@dataclass
class EMCSettings:
    """The ``emc`` section of the config (see ``src/xrai/schemas/config.schema.yaml``)."""

    n_iterations: int = 30
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    level_iterations: list[int] = field(default_factory=lambda: [12, 4])
    beta_start: float | str = "auto"
    beta_factor: float = 1.4
    beta_every: int = 1
    beta_max: float = 1.0
    likelihood: str = "auto"
    per_image_scale: bool | str = "auto"
    chunk_size: int = 1024
    tolerance: float = 1e-3
    device: str = "auto"
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        if len(self.level_iterations) != len(self.levels) - 1:
            raise XraiError(f"config key 'emc.level_iterations': expected {len(self.levels) - 1} entries "
                            f"(one per level of emc.levels = {self.levels} but the last), got {self.level_iterations}")
        if self.likelihood not in LIKELIHOODS:
            raise XraiError(f"config key 'emc.likelihood': {self.likelihood!r} is not one of {list(LIKELIHOODS)}")
        if self.per_image_scale not in (True, False, "auto"):
            raise XraiError(f"config key 'emc.per_image_scale': expected true, false or auto, "
                            f"got {self.per_image_scale!r}")
        if self.beta_start != "auto" and not (isinstance(self.beta_start, int | float)
                                              and 0 < self.beta_start <= self.beta_max):
            raise XraiError(f"config key 'emc.beta': need start 'auto' or 0 < start <= max, got start "
                            f"{self.beta_start!r}, max {self.beta_max}")
        for level in self.levels:
            grid_size(level)  # raises for a bad level

    @classmethod
    def from_config(cls, cfg: dict) -> EMCSettings:
        """Settings from a resolved config (defaults for a missing ``emc`` section)."""
        e = dict(cfg.get("emc", {}) or {})
        beta = dict(e.pop("beta", {}) or {})
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("beta_")}
        kwargs = {k: v for k, v in e.items() if k in known}
        for k in ("start", "factor", "every", "max"):
            if k in beta:
                kwargs[f"beta_{k}"] = beta[k]
        return cls(**kwargs)

    def level_at(self, iteration: int) -> int:
        """SO(3) grid level used at ``iteration`` (0-based)."""
        edge = 0
        for level, n in zip(self.levels[:-1], self.level_iterations, strict=True):
            edge += n
            if iteration < edge:
                return level
        return self.levels[-1]

    def with_beta_start(self, likelihood: str, dataset: Any) -> EMCSettings:
        """These settings with ``beta_start: auto`` resolved for ``likelihood`` on ``dataset`` (a number stays).

        Poisson: :data:`AUTO_BETA_START_PHOTONS` / the mean signal photons per pattern (counts over the
        usable pixels less the expected background, from the first images), at most ``beta_max``;
        Gaussian: :data:`AUTO_BETA_START_GAUSSIAN`. Example::

            settings = EMCSettings().with_beta_start("poisson", DiffractionDataset("train.h5"))
        """
        if self.beta_start != "auto":
            return self
        start = AUTO_BETA_START_GAUSSIAN
        if likelihood == "poisson":
            start = min(self.beta_max, AUTO_BETA_START_PHOTONS / max(signal_photons_per_pattern(dataset), 1.0))
        return replace(self, beta_start=start)

    def beta_at(self, iteration: int) -> float:
        """Annealing exponent at ``iteration`` (0-based); ``beta_start`` must be resolved (:meth:`with_beta_start`)."""
        return min(self.beta_max, self.beta_start * self.beta_factor ** (iteration // self.beta_every))

    def is_final_stage(self, iteration: int) -> bool:
        """True once the finest level and the final beta are reached (convergence may then stop the run)."""
        return (iteration >= sum(self.level_iterations)
                and self.beta_at(iteration) >= self.beta_max * (1 - 1e-12))

    def converged(self, iteration: int, result: IterationResult, previous: dict) -> bool:
        """Whether ``iteration`` (0-based; its ``result``) ends the run: in the final stage, at the same level
        and beta as the ``previous`` iteration (its ``level``, ``beta``, ``log_likelihood``), with the relative
        model and log-likelihood changes both below ``tolerance``."""
        if not self.is_final_stage(iteration) or previous["level"] != self.level_at(iteration) \
                or previous["beta"] != self.beta_at(iteration):
            return False
        ll_change = abs(result.log_likelihood - previous["log_likelihood"]) / max(abs(result.log_likelihood), 1e-30)
        return result.model_change < self.tolerance and ll_change < self.tolerance


# --------------------------------------------------------------------------- the algorithm


@dataclass
class IterationResult:
    """What one EMC iteration measured (means are per image)."""

    log_likelihood: float
    objective: float
    model_change: float
    merge_step: float  # step along the merge direction
    mm_step: float  # step along the majorise-minimise (preconditioned gradient) direction
    mean_max_probability: float
    best: torch.Tensor  # (N,) index of the most likely orientation of every image
    seconds: float


class ExpandMaximizeCompress:
    """The EMC model (a 3D intensity on ``grid``) and its iterations over a stream of images.

    ``q_pixel`` ``(H, W, 3)`` are the detector's Ewald coordinates (Angstrom^-1) and
    ``pixel_factor`` ``(H, W)`` the known per-pixel factor the images carry
    (polarization x solid angle; ones if ``None``). Images come from ``read(start, stop)``
    dicts like :meth:`xrai.data.hdf5.DiffractionDataset.read`. Example::

        emc = ExpandMaximizeCompress(grid, q_pixel, None, likelihood="gaussian")
        emc.initialize(dataset, torch.Generator().manual_seed(0))
        for it in range(10):
            result = emc.iterate(dataset, level=2, beta=1.0)
        best, R = emc.most_likely_poses(test_dataset, level=2)
    """

    def __init__(
        self,
        grid: ReciprocalGrid,
        q_pixel: torch.Tensor,
        pixel_factor: torch.Tensor | None = None,
        *,
        likelihood: str = "gaussian",
        per_image_scale: bool = False,
        chunk_size: int = 1024,
        device: torch.device | str = "cpu",
        mask: torch.Tensor | None = None,
    ) -> None:
        if likelihood not in ("poisson", "gaussian"):
            raise ValueError(f"likelihood must be 'poisson' or 'gaussian', got {likelihood!r}")
        self.grid = grid
        self.device = torch.device(device)
        self.likelihood = likelihood
        self.per_image_scale = bool(per_image_scale)
        self.chunk_size = int(chunk_size)
        self.image_shape = tuple(q_pixel.shape[:2])
        # the unmasked pixels (flat indices): the only ones EMC ever reads
        keep = torch.ones(self.image_shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
        self.pixels = torch.nonzero(keep.reshape(-1)).flatten().to(self.device)
        q_kept = q_pixel.reshape(-1, 3)[keep.reshape(-1)]
        self.q = q_kept.to(self.device, torch.float32)
        self._origin = grid.to_normalized(torch.zeros(3, dtype=torch.float64)).float().to(self.device)
        self._q_centred = grid.to_normalized(q_kept.double()).float().to(self.device) - self._origin
        self._axis_flip = torch.eye(3, device=self.device).flip(0)
        n_pix = self.q.shape[0]
        c = torch.ones(n_pix) if pixel_factor is None else pixel_factor.reshape(-1)[keep.reshape(-1)].double()
        self.c = (c / c.mean()).to(self.device, torch.float32)
        # resolution shells of the pixels (the Gaussian's variances), in grid voxels
        self.shell = torch.round(self.q.double().norm(dim=-1) / grid.dq).long().to(self.device)
        self.n_shells = int(self.shell.max()) + 1
        self.shell_count = torch.bincount(self.shell, minlength=self.n_shells).double()
        self.volume = torch.zeros((grid.size,) * 3, device=self.device)
        self.sigma2 = torch.ones(self.n_shells, dtype=torch.float64, device=self.device)
        self._slices: tuple[int, torch.Tensor] | None = None  # (level, W) cache of the current model

    # ---------------------------------------------------------------- data
    def _chunks(self, dataset: Any, n_orientations: int = 1,
                stop: int | None = None) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """``(start, K (B, P) float32 on the device, raw batch)`` over the first ``stop`` images.

        ``B`` is ``chunk_size``, or fewer so that a (B, n_orientations) matrix stays within budget.
        ``P`` counts the unmasked pixels only. Poisson: the raw counts; Gaussian: divided by
        the simulator's ``scale`` where the file has one (noise-free data, as ``xrai train``).
        """
        n = len(dataset) if stop is None else min(stop, len(dataset))
        rows = max(16, min(self.chunk_size, _CHUNK_ELEMENTS // max(n_orientations, 1)))
        for start in range(0, n, rows):
            raw = dataset.read(start, min(start + rows, n))
            images = raw["images"].to(self.device, torch.float32)
            if "scale" in raw and self.likelihood == "gaussian":
                images = images / raw["scale"].to(self.device)[:, None, None]
            yield start, images.reshape(images.shape[0], -1)[:, self.pixels], raw

    # ---------------------------------------------------------------- expand
    def rotations(self, level: int) -> torch.Tensor:
        """The rotation matrices ``(M, 3, 3)`` float32 of the orientation grid at ``level``, on the device."""
        return quaternion_to_matrix(so3_grid(level)).float().to(self.device)

    def _sample_coords(self, rotations: torch.Tensor) -> torch.Tensor:
        """Normalised coordinates ``(m, P, 3)`` of ``R_j q_p`` for :func:`xrai.volume.trilinear`, exactly
        :meth:`ReciprocalGrid.to_normalized` (so sampling matches :func:`sample_volume`, tests/test_emc.py).

        ``to_normalized`` is affine, ``n(k) = A k + b`` with ``A`` a scaled axis reversal, so
        ``n(R q) = (A R A^-1)(n(q) - b) + b``: one small matrix product per orientation
        instead of normalising every rotated point (half the cost of an expand).
        """
        rot_n = self._axis_flip @ rotations @ self._axis_flip  # A = s F with F = F^-1: A R A^-1 = F R F
        return torch.einsum("mab,pb->mpa", rot_n, self._q_centred) + self._origin

    def expand(self, volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Slices ``W (M, P) = c_p * volume(R_j q_p)`` (trilinear, 0 outside the grid, as :func:`sample_volume`)."""
        out = torch.empty((rotations.shape[0], self.q.shape[0]), device=self.device)
        step = max(1, _POINTS_PER_CALL // self.q.shape[0])
        vol = volume[None].float()
        for s in range(0, rotations.shape[0], step):
            out[s:s + step] = trilinear(vol, self._sample_coords(rotations[s:s + step]))[0] * self.c
        return out

    def merge(self, rotations: torch.Tensor, *channels: torch.Tensor) -> list[torch.Tensor]:
        """Trilinear insertion (the adjoint of :meth:`expand` without ``c``) of each ``(M, P)`` channel.

        Returns one volume per channel, each what :func:`xrai.volume.insert_trilinear` adds
        (channels broadcast to ``(M, P)``, e.g. per-orientation weights ``(M, 1)``).
        """
        step = max(1, _POINTS_PER_CALL // self.q.shape[0])
        k = len(channels)
        probe = torch.zeros((k, *self.volume.shape), device=self.device, requires_grad=True)
        total = torch.zeros((k, *self.volume.shape), device=self.device)
        shape = (rotations.shape[0], self.q.shape[0])
        with torch.enable_grad():
            for s in range(0, rotations.shape[0], step):
                out = trilinear(probe, self._sample_coords(rotations[s:s + step]))  # (k, m, P)
                grad_out = torch.stack([ch.expand(shape)[s:s + step] for ch in channels])
                (g,) = torch.autograd.grad(out, probe, grad_out)
                total += g
        return list(total)

    def slices(self, level: int) -> torch.Tensor:
        """Slices of the current model at ``level`` (cached until the model changes)."""
        if self._slices is None or self._slices[0] != level:
            self._slices = (level, self.expand(self.volume, self.rotations(level)))
        return self._slices[1]

    # ---------------------------------------------------------------- initial model
    @torch.no_grad()
    def initialize(self, dataset: Any, generator: torch.Generator) -> None:
        """Random initial model: the data's radial mean profile times uniform noise in [0.5, 1.5), Friedel-symmetric.

        The radial profile needs no poses; the random factor breaks the symmetry that a
        purely radial model would have. One pass over the data also sets the Gaussian's
        initial shell variances (the spread of the data about the radial profile).
        """
        n_pix = self.q.shape[0]
        s1 = torch.zeros(n_pix, dtype=torch.float64, device=self.device)
        s2 = torch.zeros_like(s1)
        n = 0
        for _, K, _ in self._chunks(dataset):
            s1 += K.double().sum(0)
            s2 += (K.double() ** 2).sum(0)
            n += K.shape[0]
        if n == 0:
            raise XraiError("EMC: the training dataset holds no images")
        c = self.c.double()
        # per-shell mean of I = K / c, least squares over the shell's pixels
        profile = self._shell_sum(c * s1) / self._shell_sum(c * c * n).clamp_min(1e-30)
        resid = s2 - 2 * c * profile[self.shell] * s1 + n * (c * profile[self.shell]) ** 2
        self.sigma2 = (self._shell_sum(resid) / (n * self.shell_count.clamp_min(1))).clamp_min(1e-30)
        # the profile as a function of |k| on the volume grid, linear between shells
        r = self.grid.coordinates(device=self.device).norm(dim=-1) / self.grid.dq
        r0 = r.floor().long().clamp(max=self.n_shells - 1)
        r1 = (r0 + 1).clamp(max=self.n_shells - 1)
        f = (r - r0).clamp(0, 1)
        radial = (1 - f) * profile[r0] + f * profile[r1]
        noise = 0.5 + torch.rand(radial.shape, generator=generator, dtype=torch.float64).to(self.device)
        self.volume = friedel_symmetrize(radial.clamp_min(0) * noise).float()
        self._slices = None

    def _shell_sum(self, per_pixel: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n_shells, dtype=per_pixel.dtype, device=self.device).index_add_(0, self.shell, per_pixel)

    # ---------------------------------------------------------------- maximize
    def _prepare(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-iteration quantities of the slices used by every chunk's log-likelihoods."""
        if self.likelihood == "gaussian":
            inv_var = (1.0 / self.sigma2[self.shell]).float()
            Ws = W * inv_var
            return {"Ws": Ws, "b": (W * Ws).sum(1), "inv_var": inv_var,
                    "const": -0.5 * torch.log(2 * math.pi * self.sigma2[self.shell]).sum()}
        floor = _POISSON_FLOOR * float(W.mean().clamp_min(1e-30))
        Wf = W.clamp_min(floor)
        return {"logW": torch.log(Wf), "w": Wf.sum(1)}

    def _log_likelihood(self, K: torch.Tensor, prep: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(L (B, M) without the per-image constant, phi (B, M) or None, per-image constant (B,) float64)``."""
        if self.likelihood == "gaussian":
            C = K @ prep["Ws"].T
            a = (K.double() ** 2 * prep["inv_var"].double()).sum(1)
            const = -0.5 * a + prep["const"]
            if self.per_image_scale:
                phi = (C / prep["b"].clamp_min(1e-30)).clamp_min(0)
                return 0.5 * phi * C, phi, const
            return C - 0.5 * prep["b"], None, const
        L = K @ prep["logW"].T
        const = -torch.lgamma(K.double() + 1).sum(1)
        if self.per_image_scale:
            k = K.sum(1, keepdim=True)
            phi = k / prep["w"]
            return L + torch.xlogy(k, phi) - k, phi, const
        return L - prep["w"], None, const

    # ---------------------------------------------------------------- one iteration
    @torch.no_grad()
    def iterate(self, dataset: Any, level: int, beta: float = 1.0,
                on_chunk: Callable[[int, torch.Tensor, dict], None] | None = None) -> IterationResult:
        """One expand-maximize-compress iteration over every image of ``dataset``; updates the model.

        ``on_chunk(start, best (B,), raw batch)`` is called for every chunk (the caller's
        pose bookkeeping). Returns the log-likelihood (beta = 1) and the tempered objective
        of the model *before* the update, both per image, and the most likely orientations.
        """
        t0 = time.perf_counter()
        rot = self.rotations(level)
        M, P = rot.shape[0], self.q.shape[0]
        log_w = torch.log(so3_grid_weights(level)).float().to(self.device)
        W = self.slices(level)
        prep = self._prepare(W)
        S = torch.zeros((M, P), device=self.device)  # sum_i P_ij phi_ij K_i
        d = torch.zeros(M, dtype=torch.float64, device=self.device)  # sum_i P_ij phi_ij^(1 or 2)
        T = torch.zeros(P, dtype=torch.float64, device=self.device)  # sum_i K_i^2 (Gaussian variances)
        ll_sum = obj_sum = pmax_sum = 0.0
        n = 0
        best_all = torch.empty(len(dataset), dtype=torch.int64)
        for start, K, raw in self._chunks(dataset, M):
            L, phi, const = self._log_likelihood(K, prep)
            prob, log_norm = _softmax(beta * L + log_w)
            obj = log_norm / beta + const
            ll = obj if beta == 1.0 else _softmax(L + log_w, prob=False)[1] + const
            pmax, best = prob.max(dim=1)
            ll_sum += float(ll.sum())
            obj_sum += float(obj.sum())
            pmax_sum += float(pmax.sum())
            n += K.shape[0]
            best_all[start:start + K.shape[0]] = best.cpu()
            if on_chunk is not None:
                on_chunk(start, best.cpu(), raw)
            if phi is None:
                S.addmm_(prob.T, K)
                d += prob.sum(0).double()
            elif self.likelihood == "gaussian":
                S.addmm_((prob * phi).T, K)
                d += (prob * phi * phi).sum(0).double()
            else:
                S.addmm_(prob.T, K)
                d += (prob * phi).sum(0).double()
            if self.likelihood == "gaussian":
                T += (K.double() ** 2).sum(0)
            del L, phi, prob
        if n == 0:
            raise XraiError("EMC: the training dataset holds no images")
        change, a, b = self._compress(rot, W, S, d, T, n)
        return IterationResult(ll_sum / n, obj_sum / n, change, a, b, pmax_sum / n, best_all,
                               time.perf_counter() - t0)

    # ---------------------------------------------------------------- compress
    def _compress(self, rot: torch.Tensor, W: torch.Tensor, S: torch.Tensor, d: torch.Tensor, T: torch.Tensor,
                  n: int) -> tuple[float, float, float]:
        """The M-step: update the model (and the Gaussian's variances). Returns (change, merge step, MM step).

        * The merge (Dragonfly's compress): the probability-weighted mean of the images,
          inserted trilinearly; the step from the current model towards it is the exact
          maximiser in [0, 1] of the expected complete-data log-likelihood ``Q`` (Gaussian: a
          quadratic, since the slices are linear in the model; Poisson: a bracketed search).
        * When the merge is not uphill (it can happen once the model is sharp, as trilinear
          interpolation is not the identity), a majorise-minimise step instead: the gradient of
          ``Q`` divided by the same insertion weights (Gaussian: those are the Hessian's row sums,
          trilinear weights summing to 1; Poisson: the Richardson-Lucy / ML-EM update), which is
          always uphill, with the same exact step search.

        Either way ``Q`` does not decrease, which makes the iteration a generalised EM step.
        The merge is preferred because it smooths where voxels are sparsely sampled (the grid's
        corners), where the maximum-likelihood voxel values are poorly determined.
        """
        gaussian = self.likelihood == "gaussian"
        df = d.float()
        c = self.c
        floor = _POISSON_FLOOR * float(W.mean().clamp_min(1e-30))
        if gaussian:
            inv_var = (1.0 / self.sigma2[self.shell]).float()
            weights = df[:, None] * (c * c * inv_var)
            num, den = self.merge(rot, S * (c * inv_var), weights)
        else:
            weights = df[:, None] * c
            num, den = self.merge(rot, S, weights)
        num, den = friedel_symmetrize(num), friedel_symmetrize(den)
        observed = den > 1e-12 * float(den.max().clamp_min(1e-30))
        safe = den.clamp_min(1e-30)
        zero = torch.zeros_like(self.volume)

        def step(direction: torch.Tensor) -> tuple[float, torch.Tensor]:
            dW = self.expand(direction, rot)
            if gaussian:
                g = float(((S - df[:, None] * W) * dW * inv_var).double().sum())
                h = float((df[:, None] * dW * dW * inv_var).double().sum())
                return (min(1.0, g / h) if g > 0 and h > 0 else 0.0), dW
            return _poisson_step(W, dW, S, df), dW

        delta = torch.where(observed, num / safe - self.volume, zero)
        a, dW = step(delta)
        b = 0.0
        if a <= 0.0:  # the merge is not uphill: majorise-minimise step
            if gaussian:
                (grad,) = self.merge(rot, (S - df[:, None] * W) * (c * inv_var))
                delta = torch.where(observed, friedel_symmetrize(grad) / safe, zero)
            else:
                (grad,) = self.merge(rot, c * (S / W.clamp_min(floor) - df[:, None]))
                delta = torch.where(observed, self.volume * friedel_symmetrize(grad) / safe, zero)
            b, dW = step(delta)
        t = a + b
        old_norm = float(self.volume.double().norm())
        self.volume = self.volume + t * delta
        W_new = W + t * dW
        change = t * float(delta.double().norm()) / max(old_norm, 1e-30)
        if gaussian:  # EM update of the shell variances: mean expected squared residual
            resid2 = T - 2 * (S * W_new).double().sum(0) + (d[:, None] * W_new.double() ** 2).sum(0)
            sigma2 = self._shell_sum(resid2) / (n * self.shell_count.clamp_min(1))
            mean_sq = self._shell_sum(T) / (n * self.shell_count.clamp_min(1))
            self.sigma2 = torch.maximum(sigma2, _SIGMA2_FLOOR * mean_sq).clamp_min(1e-30)
        self._slices = (self._slices[0], W_new) if self._slices is not None else None
        return change, a, b

    # ---------------------------------------------------------------- matching
    @torch.no_grad()
    def most_likely_poses(self, dataset: Any, level: int, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Match images against the current model: the most likely grid orientation of each (index (N,), R (N, 3, 3))."""
        W = self.slices(level)
        prep = self._prepare(W)
        out = []
        for _, K, _ in self._chunks(dataset, W.shape[0], stop):
            L, _, _ = self._log_likelihood(K, prep)
            out.append(L.argmax(dim=1).cpu())
        best = torch.cat(out)
        return best, quaternion_to_matrix(so3_grid(level)[best])

    def state_dict(self) -> dict:
        return {"volume": self.volume.cpu(), "sigma2": self.sigma2.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.volume = state["volume"].to(self.device, torch.float32)
        self.sigma2 = state["sigma2"].to(self.device, torch.float64)
        self._slices = None


def _softmax(x: torch.Tensor, prob: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Row softmax of ``x`` (B, M) and its log-normaliser (B,) float64, without denormal numbers.

    Terms more than ``_LOG_CUTOFF`` below a row's maximum are set to exactly 0 (relative
    mass < M e^-50): denormal floats, which an ordinary softmax of sharp posteriors
    produces, slow the CPU matrix products that follow by an order of magnitude.
    """
    m = x.max(dim=1, keepdim=True).values
    z = x - m
    e = torch.exp(z.clamp_min(-_LOG_CUTOFF)).masked_fill_(z <= -_LOG_CUTOFF, 0.0)
    total = e.sum(dim=1, keepdim=True)
    log_norm = (m + torch.log(total)).squeeze(1).double()
    return (e.div_(total) if prob else None), log_norm


def _quadratic_steps(resid: torch.Tensor, dW1: torch.Tensor, dW2: torch.Tensor, d: torch.Tensor,
                     inv_var: torch.Tensor, max_step: float = 1.0) -> tuple[float, float]:
    """Maximiser ``(a, b)`` in ``[0, max_step]^2`` of the Gaussian expected log-likelihood along ``a dW1 + b dW2``.

    ``Q(a, b) - Q(0) = g . x - x^T H x / 2`` (a concave quadratic) with ``g_k = sum resid dW_k / sigma^2``
    and ``H_kl = sum d dW_k dW_l / sigma^2``: the best of the interior solution and the
    maximisers on the box's edges, so the gain is >= 0 (x = 0 is a candidate).
    """
    def dot(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> float:
        return float((x * y * weight).double().sum())

    dcol = d[:, None]
    g1, g2 = dot(resid, dW1, inv_var), dot(resid, dW2, inv_var)
    h11, h22, h12 = dot(dW1 * dcol, dW1, inv_var), dot(dW2 * dcol, dW2, inv_var), dot(dW1 * dcol, dW2, inv_var)

    def gain(a: float, b: float) -> float:
        return g1 * a + g2 * b - 0.5 * (h11 * a * a + 2 * h12 * a * b + h22 * b * b)

    def clip(x: float) -> float:
        return min(max(x, 0.0), max_step) if math.isfinite(x) else 0.0

    cands = [(0.0, 0.0)]
    det = h11 * h22 - h12 * h12
    if det > 0:
        cands.append((clip((h22 * g1 - h12 * g2) / det), clip((h11 * g2 - h12 * g1) / det)))
    for fixed in (0.0, max_step):  # edges: one step fixed, the other at its clipped optimum
        if h22 > 0:
            cands.append((fixed, clip((g2 - h12 * fixed) / h22)))
        if h11 > 0:
            cands.append((clip((g1 - h12 * fixed) / h11), fixed))
    return max(cands, key=lambda ab: gain(*ab))


def _poisson_steps(W: torch.Tensor, dW1: torch.Tensor, dW2: torch.Tensor, S: torch.Tensor,
                   d: torch.Tensor) -> tuple[float, float]:
    """The better of the two line searches on [0, 1] of ``f = sum S log W - d W`` along ``dW1`` or ``dW2``."""
    floor = _POISSON_FLOOR * float(W.mean().clamp_min(1e-30))

    def gain(dW: torch.Tensor, a: float) -> float:
        if a == 0.0:
            return 0.0
        ratio = (W + a * dW).clamp_min(floor) / W.clamp_min(floor)
        return float((S * torch.log(ratio)).double().sum()) - a * float((d[:, None] * dW).double().sum())

    a = _poisson_step(W, dW1, S, d)
    b = _poisson_step(W, dW2, S, d)
    ga, gb = gain(dW1, a), gain(dW2, b)
    if max(ga, gb) <= 0:
        return 0.0, 0.0
    return (a, 0.0) if ga >= gb else (0.0, b)


def _poisson_step(W: torch.Tensor, dW: torch.Tensor, S: torch.Tensor, d: torch.Tensor, n_bisect: int = 30) -> float:
    """Maximiser in [0, 1] of the concave ``f(a) = sum S log(W + a dW) - d (W + a dW)`` (bisection on f')."""
    floor = _POISSON_FLOOR * float(W.mean().clamp_min(1e-30))
    sum_d = float((d[:, None] * dW).double().sum())

    def slope(a: float) -> float:
        return float((S * dW / (W + a * dW).clamp_min(floor)).double().sum()) - sum_d

    if slope(0.0) <= 0:
        return 0.0
    if slope(1.0) >= 0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return lo


def friedel_symmetrize(volume: torch.Tensor) -> torch.Tensor:
    """``(V(q) + V(-q)) / 2`` on an FFT-centred grid (index ``i`` <-> ``size - i``; the unpaired edge plane stays)."""
    flipped = torch.roll(torch.flip(volume, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
    return 0.5 * (volume + flipped)


# --------------------------------------------------------------------------- the run: outputs as xrai train


def write_rotations(path: Path, rotations: torch.Tensor, attrs: dict, source: str = "emc") -> None:
    """``poses_*.h5`` like :func:`xrai.recon.train.write_poses` for the rotations of every image in order:
    ``rotations`` (N, 3, 3), ``branch`` zeros, ``index`` 0..N-1, ``source`` the method that found them."""
    import h5py
    import numpy as np

    from xrai.io import atomic_path

    n = rotations.shape[0]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("rotations", data=rotations.float().numpy(), chunks=(min(max(n, 1), 4096), 3, 3))
        f.create_dataset("branch", data=np.zeros(n, dtype=np.int8))
        f.create_dataset("index", data=np.arange(n, dtype=np.int64))
        f.attrs.update({k: str(v) if isinstance(v, Path) else v for k, v in attrs.items()})
        f.attrs["source"] = source


def _write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """``metrics.csv`` with :data:`METRIC_COLUMNS` (blank where not measured), atomically."""
    from xrai.io import write_csv

    write_csv(path, rows, METRIC_COLUMNS)


def _write_volume(out: Path, volume: torch.Tensor, grid: ReciprocalGrid, prov: dict) -> None:
    """``intensity.h5`` and ``amplitude.mrc``; voxels beyond the detector corner (never observed) are 0, like train."""
    from xrai.io import write_mrc
    from xrai.volume import write_volume_h5

    intensity = volume.double().cpu().clamp_min(0)
    inside = grid.coordinates().norm(dim=-1) <= grid.q_max * (1 + 1e-6)
    intensity = torch.where(inside, intensity, torch.zeros_like(intensity))
    amplitude = intensity.sqrt()
    write_volume_h5(str(out / "intensity.h5"), grid, prov, intensity=intensity, amplitude=amplitude)
    write_mrc(out / "amplitude.mrc", amplitude.numpy(), grid.voxel_size)


def _pose_summary(best: torch.Tensor, level: int, quats_true: torch.Tensor) -> dict:
    from xrai.evaluation.metrics import pose_errors_deg, summarize_pose_errors

    R_pred = quaternion_to_matrix(so3_grid(level)[best])
    return summarize_pose_errors(pose_errors_deg(R_pred, quaternion_to_matrix(quats_true.double()))[0])


def build_emc(cfg: dict, settings: EMCSettings, dataset: Any, device: torch.device | str = "cpu",
              grid: ReciprocalGrid | None = None) -> tuple[ExpandMaximizeCompress, EMCSettings, str]:
    """The EMC model for ``dataset`` under ``settings``: ``(emc, settings with beta.start resolved, likelihood)``.

    The likelihood (``auto``: from the dataset), the per-image scale (``auto``: on for Poisson) and
    ``beta.start: auto`` are resolved here; the pixel factor is the config's detector's; masked pixels
    are left out. ``grid`` defaults to the config's reconstruction grid. Example::

        emc, settings, likelihood = build_emc(cfg, EMCSettings.from_config(cfg), DiffractionDataset("train.h5"))
        emc.initialize(dataset, torch.Generator().manual_seed(0))
    """
    from xrai.xray.geometry import reciprocal_grid
    from xrai.xray.imaging import detector_pixel_factor

    likelihood = resolve_likelihood(settings.likelihood, dataset, key="emc.likelihood")
    per_image_scale = (likelihood == "poisson") if settings.per_image_scale == "auto" else bool(settings.per_image_scale)
    if settings.beta_start == "auto":
        settings = settings.with_beta_start(likelihood, dataset)
        logger.info("emc.beta.start auto: %.4g (%s likelihood)", settings.beta_start, likelihood)
    ewald = dataset.pixel_position_reciprocal
    pixel_factor = detector_pixel_factor(cfg, ewald).double() ** 2  # polarization x solid angle / mean
    emc = ExpandMaximizeCompress(grid if grid is not None else reciprocal_grid(cfg), ewald, pixel_factor,
                                 likelihood=likelihood, per_image_scale=per_image_scale,
                                 chunk_size=settings.chunk_size, device=device, mask=dataset.mask)
    if bool((dataset.background > 0).any()):
        logger.warning("emc: %s has a background (%.3g photons per image); EMC does not model it",
                       dataset.path, float(dataset.background[dataset.mask].sum()))
    return emc, settings, likelihood


def emc_intensity(cfg: dict, settings: EMCSettings, dataset: Any, grid: ReciprocalGrid,
                  device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """EMC's intensity on ``grid`` from a random start, ``settings``' schedule run in memory (no files,
    no checkpoint): the first volume of the default recipe at low photon counts
    (``train.xrai.emc_start_photons``). Stops at ``n_iterations`` or at convergence, as ``xrai emc``.

    Example::

        volume = emc_intensity(cfg, EMCSettings(levels=[1, 2], level_iterations=[35]), dataset, grid)
    """
    emc, settings, _ = build_emc(cfg, settings, dataset, device, grid)
    emc.initialize(dataset, torch.Generator().manual_seed(int(seed)))
    previous = None
    for iteration in range(settings.n_iterations):
        level, beta = settings.level_at(iteration), settings.beta_at(iteration)
        res = emc.iterate(dataset, level, beta)
        logger.info("emc start %d/%d: level %d, beta %.3g | log-lik %.6g/image, model change %.2e, max prob %.3f "
                    "| %.1f s", iteration + 1, settings.n_iterations, level, beta, res.log_likelihood,
                    res.model_change, res.mean_max_probability, res.seconds)
        if previous is not None and settings.converged(iteration, res, previous):
            break
        previous = {"level": level, "beta": beta, "log_likelihood": res.log_likelihood}
    return emc.volume


def run_emc(
    cfg: dict,
    run: int,
    train_data: str | Path,
    test_data: str | Path,
    out_dir: str | Path,
    *,
    iteration_callback: Callable[[int], None] | None = None,
) -> Path:
    """Run (or resume) EMC on ``train_data`` and write every output into ``out_dir``; return ``out_dir``.

    ``iteration_callback(iteration)`` is called after every completed (and checkpointed)
    iteration. On SIGTERM / SIGINT the run stops after the current iteration's checkpoint
    and raises :class:`xrai.recon.checkpoint.TrainingInterrupted`; rerunning resumes.
    """
    from xrai.config import config_values
    from xrai.data.hdf5 import DiffractionDataset
    from xrai.io import provenance, write_json, write_run_metadata
    from xrai.recon.checkpoint import (
        StopRequest,
        resumable_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )
    from xrai.utils import pick_device, resource_usage, seed_everything, set_cpu_threads
    from xrai.xray.geometry import reciprocal_grid

    settings = EMCSettings.from_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(settings.seed) + int(run)
    device = pick_device(settings.device)
    threads = set_cpu_threads(int(settings.num_threads)) if device.type == "cpu" else torch.get_num_threads()
    train_ds, test_ds = DiffractionDataset(train_data), DiffractionDataset(test_data)
    if train_ds.image_shape != test_ds.image_shape:
        raise XraiError(f"{test_data}: images {test_ds.image_shape} differ from the train set's {train_ds.image_shape}")
    grid = reciprocal_grid(cfg)
    emc, settings, likelihood = build_emc(cfg, settings, train_ds, device, grid)
    per_image_scale = emc.per_image_scale
    n_train = len(train_ds)
    logger.info("emc run %d: seed %d, %s likelihood%s, %d train images (%s), %d test, grid %d^3, levels %s, "
                "%s (%d threads)", run, seed, likelihood, " + per-image scale" if per_image_scale else "",
                n_train, train_ds.path, len(test_ds), grid.size,
                [f"{lv} ({grid_size(lv)})" for lv in settings.levels], device, threads)

    ckpt_path = out / "checkpoint.pt"
    info = {"method": "emc", "run": int(run), "seed": seed, "n_train": n_train, "likelihood": likelihood,
            "train_data": str(Path(train_data).resolve()),
            # what changes the result; n_iterations, tolerance, chunk size and device may change on resume
            "settings": {k: v for k, v in asdict(settings).items() if k in _RESUME_KEYS},
            "config": config_values(cfg, ("detector", "beam", "volume")), "train_fingerprint": train_ds.fingerprint()}
    rows: list[dict] = []
    wall_before = 0.0
    iteration = 0
    converged = False
    best = torch.zeros(n_train, dtype=torch.int64)
    best_level = settings.level_at(0)
    state = resumable_checkpoint(ckpt_path, info, _CHECKPOINT_KEYS)
    if state is not None:
        emc.load_state_dict(state["model"])
        set_rng_state(state["rng"])
        iteration, rows, wall_before = int(state["iteration"]), list(state["metrics"]), float(state["wall_s"])
        converged, best, best_level = bool(state["converged"]), state["best"], int(state["best_level"])
        logger.info("resumed from %s after iteration %d", ckpt_path, iteration)
    else:
        seed_everything(seed)
        t0 = time.perf_counter()
        emc.initialize(train_ds, torch.Generator().manual_seed(seed))
        wall_before = time.perf_counter() - t0

    # true orientations of the first images, for the per-iteration train pose error
    n_pose = min(n_train, TRAIN_POSE_IMAGES)
    quats_train = train_ds.read(0, n_pose)["orientations"]

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "info": info, "iteration": iteration, "model": emc.state_dict(),
            "rng": rng_state(), "metrics": rows, "wall_s": wall, "converged": converged,
            "best": best, "best_level": best_level,
        })

    stop = StopRequest()
    t_start = time.perf_counter()
    wall = wall_before
    with stop.installed():
        while iteration < settings.n_iterations and not converged and stop.signum is None:
            level, beta = settings.level_at(iteration), settings.beta_at(iteration)
            res = emc.iterate(train_ds, level, beta)
            best, best_level = res.best, level
            iteration += 1
            wall = wall_before + time.perf_counter() - t_start
            row = {"step": iteration, "level": level, "n_orientations": grid_size(level), "beta": beta,
                   "log_likelihood": res.log_likelihood, "objective": res.objective,
                   "model_change": res.model_change, "merge_step": res.merge_step, "mm_step": res.mm_step,
                   "mean_max_probability": res.mean_max_probability,
                   "train_pose_median_deg": _pose_summary(best[:n_pose], level, quats_train)["median_deg"],
                   "iteration_s": res.seconds, "wall_s": wall, "rss_mb": resource_usage(device)["rss_mb"]}
            if rows:
                converged = settings.converged(iteration - 1, res, rows[-1])
            rows.append(row)
            logger.info("iteration %d/%d: level %d (%d orientations), beta %.3g | log-lik %.6g/image, model change "
                        "%.2e, steps %.2f / %.2f, max prob %.3f | train pose median %.2f deg | %.1f s | rss %.0f MB%s",
                        iteration, settings.n_iterations, level, grid_size(level), beta, res.log_likelihood,
                        res.model_change, res.merge_step, res.mm_step, res.mean_max_probability,
                        row["train_pose_median_deg"], res.seconds, row["rss_mb"], " | converged" if converged else "")
            checkpoint()
            if iteration_callback is not None:
                iteration_callback(iteration)
        if stop.signum is not None and iteration < settings.n_iterations and not converged:
            stop.interrupt(checkpoint, iteration, f"after iteration {iteration}", ckpt_path)

    # ---- outputs: test poses matched against the final model at the finest level
    final_level = settings.levels[-1]
    t0 = time.perf_counter()
    best_test, R_test = emc.most_likely_poses(test_ds, final_level)
    match_s = time.perf_counter() - t0
    wall += match_s
    test_summary = _pose_summary(best_test, final_level, _all_orientations(test_ds))
    if rows:
        rows[-1].update(test_pose_median_deg=test_summary["median_deg"], test_pose_mse_deg2=test_summary["mse_deg2"],
                        test_pose_frac_within_5=test_summary["frac_within_5"], wall_s=wall)
    logger.info("emc done after %d iterations (%s, %.1f min); test poses matched at level %d in %.1f s: median "
                "%.2f deg; writing outputs to %s", iteration, "converged" if converged else "iteration limit",
                wall / 60, final_level, match_s, test_summary["median_deg"], out)
    prov = provenance(None, seed) | {"method": "emc", "run": int(run), "iterations": iteration,
                                      "converged": converged, "likelihood": likelihood,
                                      "train_data": info["train_data"], "test_data": str(Path(test_data).resolve()),
                                      "wall_s": wall, "settings": asdict(settings)}
    attrs = {"method": "emc", "run": int(run), "step": iteration, "seed": seed}
    write_rotations(out / "poses_test.h5", R_test, attrs | {"dataset": str(Path(test_data).resolve()),
                                                         "so3_level": final_level})
    R_train = quaternion_to_matrix(so3_grid(best_level)[best])
    write_rotations(out / "poses_train.h5", R_train, attrs | {"dataset": info["train_data"], "so3_level": best_level})
    _write_volume(out, emc.volume, grid, prov)
    _write_metrics_csv(out / "metrics.csv", rows)
    write_run_metadata(out, cfg, seed)
    write_json(out / "provenance.json", prov)
    return out


def _all_orientations(dataset: Any, block: int = 65536) -> torch.Tensor:
    return torch.cat([dataset.read(s, min(s + block, len(dataset)))["orientations"] for s in range(0, len(dataset), block)])


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai emc`` (settings come from the config's ``emc`` section)."""
    parser.add_argument("--run", type=int, default=0, help="run number k (seed = emc.seed + k)")
    parser.add_argument("--train-data", required=True, metavar="H5", help="training dataset (xrai simulate)")
    parser.add_argument("--test-data", required=True, metavar="H5", help="test dataset (matched against the final model)")
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="run directory (resumes from its checkpoint.pt)")


def run(args: argparse.Namespace) -> None:
    """``xrai emc``."""
    from xrai.config import load_config

    run_emc(load_config(args.config), args.run, args.train_data, args.test_data, args.out_dir)
