"""Evaluation metrics: the paper's pose error (appendix A.1), FSC and resolution, shell correlations.

Pose error (X-RAI appendix A.1)
    Predicted rotations live in the frame of the reconstructed volume, which is
    rotated by an unknown global ``A`` relative to the truth: ``R_true ~ A @ R_pred``.
    ``A`` is fitted to minimise the *mean* (not mean-square) angle between the view
    directions ``R_true @ z`` and ``A @ R_pred @ z``, robustly (RANSAC-style starts and
    Weiszfeld reweighting), so that a fraction of wrong poses cannot drag the fit.
    The view direction (the beam, ``+z`` in the lab, seen in the molecule's frame) is
    unchanged by the in-plane pi ambiguity ``R -> R @ RZ_PI``. Each aligned estimate is
    then folded: of ``A @ R_pred`` and ``A @ R_pred @ RZ_PI`` the one closer to the truth
    is kept, and the error is its geodesic angle to the truth.

FSC
    ``fsc(vol1, vol2, voxel_size)`` correlates the Fourier transforms of two real-space
    densities over integer shells ``round(|k| / dk)`` up to Nyquist (shell ``box / 2``).
    ``resolution_from_fsc`` reports ``box / shell`` at the first crossing of the cutoff,
    interpolated between shells, in pixels (Nyquist = 2 px, as the paper reports) and Å.

Usage::

    import torch
    from xrai.rotations import random_quaternions, quaternion_to_matrix
    from xrai.evaluation.metrics import pose_errors_deg, summarize_pose_errors
    R = quaternion_to_matrix(random_quaternions(100, torch.Generator().manual_seed(0)))
    err, A = pose_errors_deg(R, R)                 # err ~ 0, A ~ identity
    print(summarize_pose_errors(err))              # {'median_deg': ..., 'mse_deg2': ..., ...}
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from xrai.rotations import RZ_PI, angle_between, degrees
from xrai.volume import ReciprocalGrid

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------- pose error


def view_directions(R: torch.Tensor) -> torch.Tensor:
    """The beam direction ``R @ z`` seen in the molecule frame, ``(N, 3)`` (third column of ``R``)."""
    return R[..., :, 2]


def _weighted_kabsch(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Proper rotation ``A`` minimising ``sum w_i |dst_i - A src_i|^2`` (no reflection allowed)."""
    if w is None:
        w = torch.ones(src.shape[0], dtype=src.dtype, device=src.device)
    H = (dst * w[:, None]).T @ src  # 3x3: sum w dst src^T
    U, _, Vt = torch.linalg.svd(H)
    d = torch.sign(torch.det(U @ Vt))
    D = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return U @ D @ Vt


def _direction_angles(A: torch.Tensor, d_pred: torch.Tensor, d_true: torch.Tensor) -> torch.Tensor:
    """Angles (radians) between ``A @ d_pred`` and ``d_true``; ``A`` may be batched ``(K, 3, 3)``."""
    ad = d_pred @ A.transpose(-1, -2)  # (..., N, 3)
    cross = torch.linalg.cross(ad, d_true.expand_as(ad), dim=-1).norm(dim=-1)
    dot = (ad * d_true).sum(-1)
    return torch.atan2(cross, dot)  # accurate near 0 and pi, unlike acos


def fit_view_alignment(
    d_pred: torch.Tensor,
    d_true: torch.Tensor,
    *,
    n_ransac: int = 256,
    n_keep: int = 4,
    n_reweight: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """The proper rotation ``A`` minimising the mean angle between ``A @ d_pred`` and ``d_true``.

    Candidates: the least-squares (Kabsch) fit on all pairs and ``n_ransac`` fits on
    random triplets. The ``n_keep`` best by mean angle are refined by iteratively
    reweighted least squares with weights ``1 / angle`` (Weiszfeld's algorithm for an
    L1 cost); the refined fit with the lowest mean angle wins.
    """
    d_pred = d_pred.double()
    d_true = d_true.double()
    n = d_pred.shape[0]
    if n == 0:
        raise ValueError("no orientations to align")
    gen = torch.Generator().manual_seed(seed)
    cands = [_weighted_kabsch(d_pred, d_true)]
    if n >= 3:
        idx = torch.stack([torch.randperm(n, generator=gen)[:3] for _ in range(n_ransac)])
        H = torch.einsum("kni,knj->kij", d_true[idx], d_pred[idx])
        U, _, Vt = torch.linalg.svd(H)
        d = torch.sign(torch.det(U @ Vt))
        D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        cands.append(U @ D @ Vt)
    cand = torch.cat([c.reshape(-1, 3, 3) for c in cands])
    # score on a subset when N is large: only the ranking matters here
    sub = torch.randperm(n, generator=gen)[: min(n, 4096)]
    scores = _direction_angles(cand, d_pred[sub], d_true[sub]).mean(-1)
    order = torch.argsort(scores)[:n_keep]

    best_A, best_cost = None, math.inf
    for k in order.tolist():
        A = cand[k]
        prev = math.inf
        for _ in range(n_reweight):
            ang = _direction_angles(A, d_pred, d_true)
            cost = float(ang.mean())
            if prev - cost < 1e-12:
                break
            prev = cost
            # chord length 2 sin(theta/2) ~ theta: L1 on chords via weights 1/chord
            chord = 2.0 * torch.sin(ang / 2)
            A = _weighted_kabsch(d_pred, d_true, 1.0 / chord.clamp_min(1e-9))
        cost = float(_direction_angles(A, d_pred, d_true).mean())
        if cost < best_cost:
            best_A, best_cost = A, cost
    logger.debug("view alignment: mean view-direction error %.4f deg", math.degrees(best_cost))
    return best_A


def fold_in_plane(R_aligned: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    """Of ``R`` and ``R @ RZ_PI`` (the same image rotated in-plane by pi), keep the one closer to the truth."""
    flipped = R_aligned @ RZ_PI.to(R_aligned)
    keep = angle_between(R_aligned, R_true) <= angle_between(flipped, R_true)
    return torch.where(keep[:, None, None], R_aligned, flipped)


def pose_errors_deg(
    R_pred: torch.Tensor, R_true: torch.Tensor, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's pose error (appendix A.1) per image, in degrees, and the global alignment ``A``.

    ``R_pred`` and ``R_true`` are ``(N, 3, 3)`` proper rotations. ``A`` (3x3, proper)
    minimises the mean view-direction error; each ``A @ R_pred`` is folded against the
    in-plane pi ambiguity (:func:`fold_in_plane`) and the geodesic angle to ``R_true``
    is returned. Example::

        err, A = pose_errors_deg(R_est, R_gt)
        R_aligned = A @ R_est
    """
    R_pred = torch.as_tensor(R_pred).double()
    R_true = torch.as_tensor(R_true).double()
    if R_pred.shape != R_true.shape or R_pred.shape[-2:] != (3, 3) or R_pred.dim() != 3:
        raise ValueError(f"expected two (N, 3, 3) arrays, got {tuple(R_pred.shape)} and {tuple(R_true.shape)}")
    A = fit_view_alignment(view_directions(R_pred), view_directions(R_true), seed=seed)
    folded = fold_in_plane(A @ R_pred, R_true)
    return degrees(angle_between(folded, R_true)), A


def aligned_folded_rotations(R_pred: torch.Tensor, R_true: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``A @ R_pred`` folded against the in-plane pi ambiguity (input for :func:`frobenius_sq_error`)."""
    R_pred = torch.as_tensor(R_pred).double()
    R_true = torch.as_tensor(R_true).double()
    return fold_in_plane(A.double() @ R_pred, R_true)


def frobenius_sq_error(R_pred_aligned: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    """cryoAI's rotation error per image: ``||R_pred - R_true||_F^2`` (= 4 (1 - cos angle)); cryoAI reports the median."""
    d = torch.as_tensor(R_pred_aligned).double() - torch.as_tensor(R_true).double()
    return (d * d).sum(dim=(-1, -2))


def summarize_pose_errors(errors_deg: ArrayLike, frobenius_sq: ArrayLike | None = None) -> dict:
    """Median, mean, MSE (deg^2, the paper's "MSE") and the fractions within 2, 5 and 10 degrees."""
    e = torch.as_tensor(errors_deg).double().flatten()
    if e.numel() == 0:
        raise ValueError("no pose errors to summarise")
    out = {
        "n": int(e.numel()),
        "median_deg": float(e.median()),
        "mean_deg": float(e.mean()),
        "mse_deg2": float((e * e).mean()),
        "frac_within_2": float((e <= 2).double().mean()),
        "frac_within_5": float((e <= 5).double().mean()),
        "frac_within_10": float((e <= 10).double().mean()),
    }
    if frobenius_sq is not None:
        f = torch.as_tensor(frobenius_sq).double().flatten()
        out["frobenius_sq_median"] = float(f.median())
        out["frobenius_sq_mean"] = float(f.mean())
    return out


# --------------------------------------------------------------------------- FSC


def _as_tensor64(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()


def _centred_shell_index(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Integer radius (voxels) of every voxel from the FFT-centred origin ``n // 2`` (cubic boxes)."""
    n = shape[0]
    ax = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    return torch.round(torch.sqrt(x * x + y * y + z * z)).long()


def _shell_sums(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    keep = shells < n_shells
    return torch.zeros(n_shells, dtype=values.dtype).index_add_(0, shells[keep], values[keep])


def fsc(vol1: ArrayLike, vol2: ArrayLike, voxel_size: float) -> dict:
    """Fourier shell correlation of two real-space cubic densities (indexed [x, y, z]).

    Returns ``{"shell": [0..n/2], "freq_A_inv": shell / (n * voxel_size), "fsc": [...]}``,
    shells up to Nyquist (``n // 2``). Example::

        curve = fsc(aligned, reference, voxel_size=3.7)
        px, angstrom = resolution_from_fsc(curve, box=aligned.shape[0], voxel_size=3.7)
    """
    v1, v2 = _as_tensor64(vol1), _as_tensor64(vol2)
    if v1.shape != v2.shape or v1.dim() != 3 or len(set(v1.shape)) != 1:
        raise ValueError(f"FSC needs two equal cubic volumes, got {tuple(v1.shape)} and {tuple(v2.shape)}")
    n = v1.shape[0]
    F1 = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(v1)))
    F2 = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(v2)))
    shells = _centred_shell_index(v1.shape)
    n_shells = n // 2 + 1
    num = _shell_sums((F1 * F2.conj()).real.flatten(), shells.flatten(), n_shells)
    d1 = _shell_sums((F1.abs() ** 2).flatten(), shells.flatten(), n_shells)
    d2 = _shell_sums((F2.abs() ** 2).flatten(), shells.flatten(), n_shells)
    curve = num / torch.sqrt(d1 * d2).clamp_min(1e-300)
    s = torch.arange(n_shells, dtype=torch.float64)
    return {
        "shell": s.long().tolist(),
        "freq_A_inv": (s / (n * voxel_size)).tolist(),
        "fsc": curve.tolist(),
    }


def resolution_from_fsc(
    curve: dict, box: int, voxel_size: float, cutoff: float = 0.5
) -> tuple[float, float]:
    """Resolution ``(pixels, Å)`` where the FSC first drops below ``cutoff`` (shells >= 1).

    The crossing shell ``s`` is interpolated linearly between the two shells around it;
    resolution = ``box / s`` pixels (Nyquist = 2 px) and ``box / s * voxel_size`` Å.
    A curve that never drops below the cutoff gives the Nyquist limit (2 px).
    A curve already below the cutoff at shell 1 crosses between shells 0 and 1 and so gives
    more than ``box`` pixels: nothing was resolved.
    """
    values = list(curve["fsc"])
    shells = list(curve["shell"])
    crossing = float(shells[-1])
    for i in range(1, len(values)):
        if values[i] < cutoff:
            v0, v1 = values[i - 1], values[i]
            s0, s1 = shells[i - 1], shells[i]
            frac = (v0 - cutoff) / (v0 - v1) if v0 != v1 else 0.0
            crossing = s0 + min(max(frac, 0.0), 1.0) * (s1 - s0)
            break
    if crossing <= 0:
        return math.inf, math.inf
    px = box / crossing
    return px, px * voxel_size


def shell_correlation(amp1: ArrayLike, amp2: ArrayLike, grid: ReciprocalGrid) -> dict:
    """Per-shell Pearson correlation of two reciprocal-space volumes (e.g. amplitudes) on ``grid``.

    A phase-free check of a learned amplitude volume against the true one. The mean
    is subtracted within each shell, so a constant offset does not count as agreement.
    Shells are ``round(|q| / dq)`` up to ``grid.size // 2``. Returns
    ``{"shell", "freq_A_inv", "corr", "mean"}``; ``mean`` averages shells 1..n/2.
    Voxels that are not finite in either volume are ignored (set them to NaN to exclude
    them, e.g. beyond the detector's corner); shells left with < 2 voxels are dropped.
    """
    a, b = _as_tensor64(amp1), _as_tensor64(amp2)
    if a.shape != (grid.size,) * 3 or b.shape != a.shape:
        raise ValueError(f"expected two {(grid.size,) * 3} volumes, got {tuple(a.shape)} and {tuple(b.shape)}")
    shells = grid.radius_index().flatten()
    n_shells = grid.size // 2 + 1
    ok = torch.isfinite(a.flatten()) & torch.isfinite(b.flatten())
    a, b, shells = a.flatten()[ok], b.flatten()[ok], shells[ok]
    cnt = _shell_sums(torch.ones_like(a), shells, n_shells).clamp_min(1)
    ma = _shell_sums(a, shells, n_shells) / cnt
    mb = _shell_sums(b, shells, n_shells) / cnt
    keep = shells < n_shells
    da = torch.zeros_like(a)
    db = torch.zeros_like(b)
    da[keep] = a[keep] - ma[shells[keep]]
    db[keep] = b[keep] - mb[shells[keep]]
    num = _shell_sums(da * db, shells, n_shells)
    den = torch.sqrt(_shell_sums(da * da, shells, n_shells) * _shell_sums(db * db, shells, n_shells))
    corr = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    # shells with fewer than two finite voxels (e.g. beyond the detector's corner) carry no information
    s = torch.nonzero(_shell_sums(torch.ones_like(a), shells, n_shells) >= 2).flatten()
    corr = corr[s]
    return {
        "shell": s.tolist(),
        "freq_A_inv": (s.double() * grid.dq).tolist(),
        "corr": corr.tolist(),
        "mean": float(corr[s >= 1].mean()) if bool((s >= 1).any()) else float("nan"),
    }
