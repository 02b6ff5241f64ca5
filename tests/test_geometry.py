"""Detector / beam geometry: known answers, image layout, and skopi's SimpleSquareDetector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrai.rotations import RZ_PI
from xrai.xray.geometry import Beam, Detector, reciprocal_grid, simulation_mesh

PAPER = dict(n_pixels=128, side_m=0.1, distance_m=0.2)
BEAM = dict(photon_energy_ev=4600.0, photons_per_pulse=1e12, focus_radius_m=0.5e-6)


def test_beam_wavelength_and_fluence():
    beam = Beam(**BEAM)
    assert beam.wavelength_A == pytest.approx(12398.4197386209 / 4600, rel=1e-12)
    assert beam.wavelength_A == pytest.approx(2.6953, abs=1e-4)
    assert beam.fluence_per_m2 == pytest.approx(1e12 / (math.pi * 0.25e-12), rel=1e-12)


def test_pixels_lie_on_the_ewald_sphere():
    det, beam = Detector(**PAPER), Beam(**BEAM)
    q = det.pixel_position_reciprocal(beam)
    assert q.shape == (128, 128, 3) and q.dtype == torch.float64
    # |q + k_in| = |k_out| = 1 / lambda, with k_in = z / lambda
    k_out = q + torch.tensor([0.0, 0.0, 1.0 / beam.wavelength_A], dtype=torch.float64)
    assert torch.allclose(k_out.norm(dim=-1), torch.full((128, 128), 1 / beam.wavelength_A, dtype=torch.float64))
    # corner pixel centre: 2 theta = atan(r / d), |q| = 2 sin(theta) / lambda
    half = 0.05 - 0.1 / 128 / 2
    two_theta = math.atan(math.hypot(half, half) / 0.2)
    assert det.q_max(beam) == pytest.approx(2 * math.sin(two_theta / 2) / beam.wavelength_A, rel=1e-12)


def test_image_layout_rows_follow_y_and_rot90_is_rz_pi():
    det, beam = Detector(16, 0.1, 0.2), Beam(**BEAM)
    q = det.pixel_position_reciprocal(beam)
    # rows follow y, columns follow x
    assert q[0, 0, 0] < 0 and q[0, -1, 0] > 0 and q[0, 0, 1] < 0 and q[-1, 0, 1] > 0
    pos = det.pixel_positions_m()
    assert torch.equal(pos[:, 3, 0], pos[0, 3, 0].expand(16)) and torch.equal(pos[5, :, 1], pos[5, 0, 1].expand(16))
    # rotating the image by pi maps each pixel's q to RZ_PI @ q (documented in xrai.rotations)
    assert torch.allclose(torch.rot90(q, 2, dims=(0, 1)), q @ RZ_PI.T)
    # and the corrections are symmetric under it
    for corr in (det.polarization(beam), det.solid_angle()):
        assert torch.allclose(torch.rot90(corr, 2), corr)


def test_polarization_and_solid_angle_known_answers():
    det, beam = Detector(**PAPER), Beam(**BEAM)
    d = det.pixel_directions()
    assert torch.allclose(det.polarization(beam), 1 - d[..., 0] ** 2)
    # polarized along x: scattering in the x-z plane is weaker than in the y-z plane
    pol = det.polarization(beam)
    assert pol[64, -1] < pol[-1, 64]
    # the pixels' solid angles add up to the square's solid angle, 4 asin(a^2 / (a^2 + d^2)) with a = side / 2
    a, dist = 0.05, 0.2
    exact = 4 * math.asin(a * a / (a * a + dist * dist))
    assert float(det.solid_angle().sum()) == pytest.approx(exact, rel=1e-4)


def test_from_config_and_reciprocal_grid(test_config):
    det, beam = Detector.from_config(test_config), Beam.from_config(test_config)
    assert det.n_pixels == test_config["detector"]["n_pixels"]
    grid = reciprocal_grid(test_config)
    assert grid.size == test_config["volume"]["grid_size"]
    assert grid.q_max == pytest.approx(det.q_max(beam))
    # the corner (the largest |q| of any rotated pixel) is inside the grid's positive half
    assert (grid.size // 2 - 1) * grid.dq == pytest.approx(det.q_max(beam))


@pytest.mark.parametrize("mesh_size", [31, 32, 151])
def test_simulation_mesh_covers_every_rotated_pixel(mesh_size):
    det, beam = Detector(**PAPER), Beam(**BEAM)
    mesh = simulation_mesh(det, beam, mesh_size)
    ax = mesh.axis()
    q_corner = det.q_max(beam)
    assert ax[-1] >= q_corner - 1e-12 and ax[0] <= -q_corner + 1e-12
    if mesh_size % 2:  # skopi's mesh: linspace(-q_corner, q_corner, mesh_size)
        assert torch.allclose(ax, torch.linspace(-q_corner, q_corner, mesh_size, dtype=torch.float64), atol=1e-15)


def _skopi_detector(n_pixels: int):
    sk = pytest.importorskip("skopi", reason="skopi (dev extra) is the reference implementation")
    beam = sk.Beam(photon_energy=BEAM["photon_energy_ev"], fluence=BEAM["photons_per_pulse"],
                   focus_radius=BEAM["focus_radius_m"])
    return sk.SimpleSquareDetector(n_pixels, 0.1, 0.2, beam=beam)


@pytest.mark.parametrize("n_pixels", [128, 32])
def test_matches_skopi_simple_square_detector(n_pixels):
    """Pixel q (skopi: m^-1 -> ours: 1e-10 x, Angstrom^-1), polarization, solid angle, correction: < 1e-6."""
    det_s = _skopi_detector(n_pixels)
    det, beam = Detector(n_pixels, 0.1, 0.2), Beam(**BEAM)

    def rel(ours, theirs):
        theirs = np.asarray(theirs)
        return np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max()

    # skopi's unassembled panel [0] has our [row=y, col=x] layout
    assert rel(det.pixel_positions_m(), det_s.pixel_position[0]) < 1e-12
    assert rel(det.pixel_position_reciprocal(beam), det_s.pixel_position_reciprocal[0] * 1e-10) < 1e-6
    assert rel(det.polarization(beam), det_s.polarization_correction[0]) < 1e-6
    assert rel(det.solid_angle(), det_s.solid_angle_per_pixel[0]) < 1e-6
    assert rel(det.linear_correction(beam), det_s.linear_correction[0]) < 1e-6
    assert det.q_max(beam) == pytest.approx(float(det_s.pixel_distance_reciprocal.max()) * 1e-10, rel=1e-9)
    # the mesh skopi would slice, for the same number of points
    mesh_s, voxel = det_s.get_reciprocal_mesh(31)
    mesh = simulation_mesh(det, beam, 31)
    assert mesh.dq == pytest.approx(voxel * 1e-10, rel=1e-12)
    assert np.allclose(mesh.axis().numpy(), mesh_s[:, 0, 0, 0] * 1e-10, rtol=0, atol=1e-15)
