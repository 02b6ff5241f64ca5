"""The symmetrized L2 loss of equation 4 (xrai.recon.losses), on images sliced from a known volume."""

from __future__ import annotations

import pytest
import torch

from xrai.recon.losses import plain_l2, rotate_pi, symmetrized_l2
from xrai.rotations import RZ_PI, angle_between, quaternion_to_matrix, random_quaternions
from xrai.volume import ReciprocalGrid, sample_volume
from xrai.xray.geometry import Beam, Detector
from xrai.xray.imaging import EwaldImaging


@pytest.fixture(scope="module")
def scene():
    """A smooth random amplitude volume, the detector's Ewald coordinates and a slicing function."""
    det = Detector(n_pixels=32, side_m=0.1, distance_m=0.2)
    beam = Beam(photon_energy_ev=4600, photons_per_pulse=1e12, focus_radius_m=0.5e-6)
    E = det.pixel_position_reciprocal(beam).float()
    grid = ReciprocalGrid(32, det.q_max(beam))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 1, 32, 32, 32, generator=g)
    kernel = torch.exp(-torch.arange(-3, 4, dtype=torch.float32) ** 2 / 4.0)
    k3 = (kernel[:, None, None] * kernel[None, :, None] * kernel[None, None, :])[None, None]
    vol = torch.nn.functional.conv3d(noise, k3 / k3.sum(), padding=3)[0, 0].abs() + 0.05

    def slice_at(R: torch.Tensor) -> torch.Tensor:
        return sample_volume(vol, EwaldImaging(E).coordinates(R), grid)

    R = quaternion_to_matrix(random_quaternions(16, torch.Generator().manual_seed(1))).float()
    return slice_at, R


def _fixed_pose_autoencoder(slice_at, R):
    """An autoencoder whose encoder answers the given poses for the images and for their pi rotations alike."""
    def pred_fn(images: torch.Tensor):
        reps = images.shape[0] // R.shape[0]
        Rb = R.repeat(reps, 1, 1)
        return slice_at(Rb), Rb
    return pred_fn


def test_equals_plain_loss_when_prediction_is_exact(scene):
    slice_at, R = scene
    images = slice_at(R)
    noisy = images + 1e-3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    pred_fn = _fixed_pose_autoencoder(slice_at, R)
    sym = symmetrized_l2(pred_fn, noisy)
    plain = plain_l2(pred_fn, noisy)
    assert plain.loss > 0
    assert (sym.branch == 0).all()
    assert torch.equal(sym.per_image, plain.per_image)
    assert torch.equal(sym.loss, plain.loss)
    assert torch.equal(sym.rotations, R)
    # and exactly 0 on exact images
    assert float(symmetrized_l2(pred_fn, images).loss) == 0.0


def test_picks_the_pi_branch_for_a_pi_rotated_input(scene):
    slice_at, R = scene
    images = slice_at(R)
    rotated = rotate_pi(images)  # true pose of these images: R @ RZ_PI
    pred_fn = _fixed_pose_autoencoder(slice_at, R)
    out = symmetrized_l2(pred_fn, rotated)
    assert (out.branch == 1).all()
    assert float(out.loss) == 0.0
    plain = plain_l2(pred_fn, rotated)
    assert (plain.per_image > 1e-4).all()  # the unsymmetrized loss sees a wrong image
    # the corrected poses are the true poses of the rotated images
    R_true = R @ RZ_PI.float()
    assert float(angle_between(out.rotations.double(), R_true.double()).max()) < 1e-5
    # and the winning prediction is in the frame of the input image
    torch.testing.assert_close(out.prediction, rotated)


def test_mixed_batch_branches_and_gradient_through_the_winner(scene):
    slice_at, R = scene
    images = slice_at(R)
    flip = torch.arange(16) % 2 == 1
    mixed = torch.where(flip[:, None, None], rotate_pi(images), images)
    scale = torch.tensor(1.1, requires_grad=True)

    def pred_fn(x):
        p, Rb = _fixed_pose_autoencoder(slice_at, R)(x)
        return p * scale, Rb

    out = symmetrized_l2(pred_fn, mixed)
    assert torch.equal(out.branch.bool(), flip)
    out.loss.backward()
    # only the winning branch (the one matching the image) carries gradient: d/ds mean(((s - 1) I)^2)
    expected = (2 * 0.1 * mixed.double() ** 2).mean()
    torch.testing.assert_close(scale.grad.double(), expected, rtol=1e-4, atol=0)
    # weights apply to both branches alike
    w = torch.zeros(32, 32)
    assert float(symmetrized_l2(pred_fn, mixed + 1.0, weights=w).loss.detach()) == 0.0
