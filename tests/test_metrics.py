"""Known-answer tests for the pose error (X-RAI appendix A.1), FSC, resolution and shell correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrai.evaluation.metrics import (
    aligned_folded_rotations,
    frobenius_sq_error,
    fsc,
    pose_errors_deg,
    resolution_from_fsc,
    shell_correlation,
    summarize_pose_errors,
)
from xrai.rotations import (
    RZ_PI,
    angle_between,
    axis_angle_to_matrix,
    quaternion_to_matrix,
    random_quaternions,
)
from xrai.volume import ReciprocalGrid

N = 1500


@pytest.fixture(scope="module")
def truth() -> torch.Tensor:
    return quaternion_to_matrix(random_quaternions(N, torch.Generator().manual_seed(1)))


def _global_rotation(seed: int) -> torch.Tensor:
    return quaternion_to_matrix(random_quaternions(1, torch.Generator().manual_seed(seed)))[0]


def _random_flips(R: torch.Tensor, seed: int) -> torch.Tensor:
    flip = torch.rand(R.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(flip[:, None, None], R @ RZ_PI, R)


def test_pose_error_of_truth_against_itself_is_zero(truth):
    err, A = pose_errors_deg(truth, truth)
    assert err.max() < 1e-4
    assert torch.allclose(A, torch.eye(3, dtype=A.dtype), atol=1e-6)


def test_pose_error_is_invariant_to_one_global_rotation_and_in_plane_flips(truth):
    G = _global_rotation(7)
    # predictions live in a rotated volume frame: R_true = G @ R_pred
    pred = _random_flips(G.T @ truth, seed=3)
    err, A = pose_errors_deg(pred, truth)
    assert err.max() < 1e-4
    assert math.degrees(float(angle_between(A, G))) < 1e-4
    assert torch.linalg.det(A) > 0  # a proper rotation, never a reflection


def test_known_three_degree_perturbation_is_measured(truth):
    gen = torch.Generator().manual_seed(11)
    axes = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    dR = axis_angle_to_matrix(axes, torch.full((N,), math.radians(3.0), dtype=torch.float64))
    G = _global_rotation(5)
    pred = _random_flips(G.T @ truth @ dR, seed=4)
    err, _ = pose_errors_deg(pred, truth)
    assert abs(float(err.median()) - 3.0) < 0.1
    assert abs(float(err.mean()) - 3.0) < 0.1
    s = summarize_pose_errors(err)
    assert abs(s["mse_deg2"] - 9.0) < 0.6
    assert s["frac_within_5"] == 1.0 and s["frac_within_2"] < 0.05


def test_alignment_is_robust_to_thirty_percent_outliers(truth):
    G = _global_rotation(9)
    pred = G.T @ truth
    n_out = int(0.3 * N)
    pred[:n_out] = quaternion_to_matrix(random_quaternions(n_out, torch.Generator().manual_seed(2)))
    err, A = pose_errors_deg(pred, truth)
    assert math.degrees(float(angle_between(A, G))) < 0.05
    assert err[n_out:].max() < 0.05
    assert float(err[:n_out].median()) > 30  # the outliers stay outliers
    # a least-squares fit would be pulled away; the paper's metric is the mean error


def test_frobenius_error_matches_angle(truth):
    G = _global_rotation(13)
    gen = torch.Generator().manual_seed(12)
    dR = axis_angle_to_matrix(torch.randn(N, 3, generator=gen, dtype=torch.float64),
                              torch.full((N,), math.radians(10.0), dtype=torch.float64))
    pred = G.T @ truth @ dR
    err, A = pose_errors_deg(pred, truth)
    fro = frobenius_sq_error(aligned_folded_rotations(pred, truth, A), truth)
    # ||R1 - R2||_F^2 = 4 (1 - cos theta)
    assert torch.allclose(fro, 4 * (1 - torch.cos(torch.deg2rad(err))), atol=1e-9)
    s = summarize_pose_errors(err, fro)
    assert abs(s["frobenius_sq_median"] - 4 * (1 - math.cos(math.radians(10)))) < 1e-3


def test_bad_pose_shapes_raise():
    with pytest.raises(ValueError):
        pose_errors_deg(torch.eye(3)[None].repeat(4, 1, 1), torch.eye(3)[None].repeat(5, 1, 1))


# --------------------------------------------------------------------------- FSC


def _blob_volume(n: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ax = np.arange(n) - n // 2
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((n, n, n))
    for c in rng.normal(0, n / 10, size=(60, 3)):
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 1.0**2))
    return vol


def test_fsc_with_itself_is_one():
    vol = _blob_volume()
    curve = fsc(vol, vol, voxel_size=2.0)
    assert np.allclose(curve["fsc"], 1.0, atol=1e-9)
    assert curve["shell"][-1] == 16 and abs(curve["freq_A_inv"][-1] - 0.25) < 1e-12  # Nyquist = 1 / (2 * 2 Å)
    assert resolution_from_fsc(curve, box=32, voxel_size=2.0) == (2.0, 4.0)


def test_fsc_against_independent_noise_is_near_zero():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 32, 32, 32))
    curve = fsc(a, b, voxel_size=1.0)
    # shells >= 3 hold >= 100 voxels: |fsc| ~ 1/sqrt(count)
    assert np.abs(curve["fsc"][3:]).max() < 0.2
    assert abs(np.mean(curve["fsc"][3:])) < 0.03


@pytest.mark.parametrize("cut_shell", [6, 11])
def test_resolution_of_low_passed_volume_is_found_within_one_shell(cut_shell):
    rng = np.random.default_rng(cut_shell)
    n = 32
    ref = rng.normal(size=(n, n, n))
    F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(ref)))
    ax = np.arange(n) - n // 2
    r = np.sqrt(sum(g**2 for g in np.meshgrid(ax, ax, ax, indexing="ij")))
    # beyond the cut the low-passed copy holds independent noise of the same power
    noise = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rng.normal(size=(n, n, n)))))
    G = np.where(r <= cut_shell, F, noise)
    low = np.real(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(G))))
    curve = fsc(low, ref, voxel_size=1.5)
    px, angstrom = resolution_from_fsc(curve, box=n, voxel_size=1.5, cutoff=0.5)
    assert n / (cut_shell + 1) <= px <= n / (cut_shell - 1)
    assert abs(angstrom - 1.5 * px) < 1e-12


def test_shell_correlation_is_phase_free_check():
    grid = ReciprocalGrid(24, 0.1)
    rng = np.random.default_rng(3)
    amp = np.abs(rng.normal(size=(24,) * 3)) + 1.0
    same = shell_correlation(amp, 3.0 * amp + 5.0, grid)  # scale and offset do not matter
    assert np.allclose(same["corr"][1:], 1.0, atol=1e-9)
    other = shell_correlation(amp, np.abs(rng.normal(size=(24,) * 3)) + 1.0, grid)
    assert abs(other["mean"]) < 0.1
    # the DC shell holds one voxel: no correlation there
    assert same["shell"] == list(range(1, 13)) and abs(same["freq_A_inv"][0] - grid.dq) < 1e-15
    # voxels set to NaN (e.g. beyond the detector corner) are ignored
    masked = np.where(grid.radius_index().numpy() > 9, np.nan, amp)
    assert shell_correlation(masked, amp, grid)["shell"] == list(range(1, 10))
