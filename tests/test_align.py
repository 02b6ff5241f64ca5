"""Known-answer tests for volume alignment: rotation, shift and hand, on analytic Gaussian-blob densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrai.evaluation.align import align_volumes, invert_volume, rotation_grid, transform_volume
from xrai.rotations import angle_between, quaternion_to_matrix, random_quaternions

N = 32


def _blobs(centres: np.ndarray, n: int = N, sigma: float = 1.2) -> np.ndarray:
    """Sum of Gaussians evaluated analytically (not by resampling: an independent moved copy)."""
    ax = np.arange(n) - n // 2
    X = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    return sum(np.exp(-((X - c) ** 2).sum(-1) / (2 * sigma**2)) for c in centres)


@pytest.fixture(scope="module")
def centres() -> np.ndarray:
    return np.random.default_rng(0).normal(0, N / 12, size=(40, 3))


@pytest.mark.parametrize("inverted", [False, True])
def test_alignment_recovers_rotation_shift_and_hand(centres, inverted):
    A = quaternion_to_matrix(random_quaternions(1, torch.Generator().manual_seed(3 + inverted)))[0].numpy()
    t = np.array([1.3, -2.2, 0.7])
    # moving = reference rotated by A and shifted by t (and inverted through the origin)
    moved = (centres @ A.T) * (-1 if inverted else 1) + t
    res = align_volumes(_blobs(moved), _blobs(centres), angular_step_deg=15)
    # aligned(x) = src(R^T (x - s)) puts blob A c + t (src: A c -/+ t) at c: R = A^T, s = -/+ A^T t
    expected_shift = A.T @ t if inverted else -A.T @ t
    assert res.inverted is inverted
    assert math.degrees(float(angle_between(torch.tensor(res.rotation), torch.tensor(A.T)))) < 1.0
    assert np.linalg.norm(res.shift - expected_shift) < 0.5
    assert res.cc > 0.99
    assert res.aligned.shape == (N, N, N)
    assert set(res.as_dict()) == {"cc", "rotation", "shift", "inverted"}


def test_transform_and_invert_conventions(centres):
    vol = torch.from_numpy(_blobs(centres))
    # inversion through voxel n // 2 is exact on the grid and an involution
    assert torch.allclose(invert_volume(vol), torch.from_numpy(_blobs(-centres)), atol=1e-12)
    assert torch.equal(invert_volume(invert_volume(vol)), vol)
    # a 90-degree rotation about z matches the analytic copy; a pure shift moves by whole voxels exactly
    Rz = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(transform_volume(vol, Rz), torch.from_numpy(_blobs(centres @ Rz.numpy().T)), atol=1e-9)
    s = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
    shifted = transform_volume(vol, torch.eye(3, dtype=torch.float64), s)
    assert torch.allclose(shifted, torch.from_numpy(_blobs(centres + s.numpy())), atol=1e-6)


def test_rotation_grid_covers_so3():
    grid = rotation_grid(30.0)
    assert grid.shape == (576, 3, 3)
    probes = quaternion_to_matrix(random_quaternions(200, torch.Generator().manual_seed(0)))
    nearest = torch.stack([angle_between(grid, p).min() for p in probes])
    assert math.degrees(float(nearest.max())) < 30.0


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        align_volumes(np.zeros((8, 8, 8)), np.zeros((10, 10, 10)))
