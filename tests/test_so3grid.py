"""The Hopf-fibration SO(3) grid: sizes, HEALPix layout, uniqueness and quasi-uniformity as documented."""

from __future__ import annotations

import math

import pytest
import torch

from xrai.rotations import quaternion_to_matrix, random_quaternions
from xrai.so3grid import (
    grid_size,
    healpix_centres,
    nearest_grid_distance_deg,
    nominal_spacing_deg,
    so3_grid,
    so3_grid_weights,
)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_size_and_unit_quaternions(level):
    q = so3_grid(level)
    assert q.shape == (72 * 8**level, 4) == (grid_size(level), 4)
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(q), dtype=q.dtype))
    assert (q[:, 0] >= 0).all()
    assert nominal_spacing_deg(level) == 60.0 / 2**level
    w = so3_grid_weights(level)
    assert w.shape == (len(q),) and float(w.sum()) == pytest.approx(1.0)


def test_healpix_rings_and_equal_area_layout():
    nside = 4
    theta, phi = healpix_centres(nside)
    assert theta.shape == (12 * nside**2,)
    z = torch.cos(theta)
    rings, counts = torch.unique(z.round(decimals=9), return_counts=True)
    # 4 nside - 1 rings: 4, 8, ..., 4 nside pixels in the caps, 4 nside in the equatorial belt
    assert len(rings) == 4 * nside - 1
    assert counts.tolist() == [4, 8, 12] + [16] * 9 + [12, 8, 4]
    # equal areas: the pixel centres' z are uniform on [-1, 1] in the mean, and symmetric north/south
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float((z**2).mean()) == pytest.approx(1 / 3, abs=0.01)
    assert bool(((phi >= 0) & (phi <= 2 * math.pi)).all())
    # within each ring the azimuths are equally spaced and distinct
    for ring, count in zip(rings.tolist(), counts.tolist(), strict=True):
        a = torch.sort(phi[(z.round(decimals=9) == ring)] % (2 * math.pi)).values
        gaps = torch.diff(torch.cat([a, a[:1] + 2 * math.pi]))
        torch.testing.assert_close(gaps, torch.full_like(gaps, 2 * math.pi / count))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_quasi_uniform_spacing_and_covering_radius(level):
    """Nearest-neighbour spacing, covering radius and mean distance to a random rotation, as in the module doc."""
    # float32 at level 3 keeps it fast; its angles are good to ~0.05 degree
    dtype = torch.float32 if level == 3 else torch.float64
    grid = so3_grid(level, dtype)
    spacing = nominal_spacing_deg(level)
    gen = torch.Generator().manual_seed(level)
    sample = grid[torch.randperm(len(grid), generator=gen)[:500]]
    dots = (sample @ grid.T).abs()
    dots[dots > 1 - 1e-6] = -1.0  # the point itself
    nn = torch.rad2deg(2 * torch.arccos(dots.max(dim=1).values.double().clamp(max=1.0)))
    assert 0.95 * spacing <= float(nn.median()) <= 1.0 * spacing + 1e-6
    assert float(nn.min()) >= 0.78 * spacing  # no two grid points coincide or crowd
    probes = random_quaternions(5000 if level == 3 else 20000, generator=gen, dtype=dtype)
    dist, _ = nearest_grid_distance_deg(probes, grid)
    assert float(dist.max()) < 0.95 * spacing  # covering radius
    assert float(dist.mean()) == pytest.approx(0.47 * spacing, rel=0.05)


def test_grid_is_uniform_in_the_haar_moments():
    """For Haar-uniform rotations E[R] = 0 and E[R_ij^2] = 1/3; the level-2 grid reproduces both."""
    R = quaternion_to_matrix(so3_grid(2))
    assert float(R.mean(0).abs().max()) < 0.01
    torch.testing.assert_close((R**2).mean(0), torch.full((3, 3), 1 / 3, dtype=R.dtype), atol=0.01, rtol=0)


def test_bad_level_is_an_error():
    with pytest.raises(ValueError, match="level"):
        so3_grid(-1)
    with pytest.raises(ValueError, match="level"):
        grid_size(7)
