"""Encoder, FourierNet and the Ewald-sphere query of the autoencoder (xrai.recon.models)."""

from __future__ import annotations

import pytest
import torch

from xrai.recon.losses import rotate_pi
from xrai.recon.models import Autoencoder, FourierNet, GaussianPyramid, VGGEncoder
from xrai.rotations import (
    RZ_PI,
    matrix_to_sixd,
    quaternion_to_matrix,
    random_quaternions,
    sixd_to_matrix,
)
from xrai.xray.geometry import Beam, Detector
from xrai.xray.imaging import EwaldImaging


def _ewald(n_pixels: int = 32) -> torch.Tensor:
    det = Detector(n_pixels=n_pixels, side_m=0.1, distance_m=0.2)
    beam = Beam(photon_energy_ev=4600, photons_per_pulse=1e12, focus_radius_m=0.5e-6)
    return det.pixel_position_reciprocal(beam).float()


def _rotations(n: int, seed: int) -> torch.Tensor:
    return quaternion_to_matrix(random_quaternions(n, torch.Generator().manual_seed(seed))).float()


def _assert_proper(R: torch.Tensor, atol: float = 1e-5) -> None:
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=atol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[0], dtype=R.dtype), atol=atol, rtol=0)


def test_sixd_gives_proper_rotations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 2000, dtype=torch.float64)[:, None]
    R = sixd_to_matrix(x)
    _assert_proper(R, atol=1e-10)
    # nearly parallel input vectors still give a proper rotation
    a = torch.randn(100, 3, generator=g, dtype=torch.float64)
    R2 = sixd_to_matrix(torch.cat([a, a + 1e-6 * torch.randn(100, 3, generator=g, dtype=torch.float64)], dim=-1))
    _assert_proper(R2, atol=1e-6)
    # a rotation's own 6D representation maps back to it
    R3 = _rotations(50, 1).double()
    torch.testing.assert_close(sixd_to_matrix(matrix_to_sixd(R3)), R3)


def test_encoder_outputs_proper_rotations_at_every_detector_size():
    for n_px, blocks in ((16, 4), (32, 5), (64, 5)):
        enc = VGGEncoder((n_px, n_px), channels=[8, 8, 16, 16, 16], mlp=[32, 16])
        assert enc.n_blocks == blocks
        R = enc(torch.rand(3, n_px, n_px))
        assert R.shape == (3, 3, 3)
        _assert_proper(R.detach())
    enc.eval()
    # batch-norm layers are there and trainable; the pyramid is not
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert all("pyramid" not in name for name, _ in enc.named_parameters())


def test_gaussian_pyramid_is_fixed_low_pass():
    pyr = GaussianPyramid(kernel_size=11, num_octaves=4)
    assert list(pyr.parameters()) == []
    assert pyr.kernels.shape == (4, 1, 11, 11)
    torch.testing.assert_close(pyr.kernels.sum(dim=(-1, -2)), torch.ones(4, 1))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = pyr(x)
    assert y.shape == (2, 5, 32, 32)
    assert torch.equal(y[:, 0], x[:, 0])  # channel 0 is the input itself
    # normalised kernels + reflect padding: a constant image stays constant, edges included
    c = pyr(torch.full((1, 1, 32, 32), 3.0))
    torch.testing.assert_close(c, torch.full_like(c, 3.0))
    # each octave blurs more: the variance of white noise decreases monotonically
    var = y.var(dim=(0, 2, 3))
    assert all(var[i + 1] < var[i] for i in range(4)), var


def test_fouriernet_is_exactly_centrosymmetric_and_non_negative():
    torch.manual_seed(0)
    net = FourierNet(q_max=0.13, width=64)
    k = torch.randn(4096, 3) * 0.08
    # also after training steps, not only at initialisation
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.rand(4096)
    for _ in range(3):
        opt.zero_grad()
        ((net(k) - target) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        a, b = net(k), net(-k)
    assert torch.equal(a, b)  # bit for bit, by construction
    assert (a >= 0).all()
    assert a.std() > 1e-3 * a.mean()  # not trivially constant
    # on a grid too (sample_grid chunks the evaluation)
    ax = torch.linspace(-0.1, 0.1, 9)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1)
    v = net.sample_grid(grid, chunk=100)
    assert torch.equal(v, v.flip(0, 1, 2))


def test_fouriernet_is_not_centrosymmetric_by_accident_of_the_input():
    # the symmetry comes from the even first layer: an odd input feature breaks it for a plain SIREN layer
    from xrai.recon.models import SineLayer

    torch.manual_seed(1)
    layer = SineLayer(3, 16, omega0=30, is_first=True)
    k = torch.randn(100, 3) * 0.5
    assert not torch.allclose(layer(k), layer(-k))


def test_ewald_coordinates_rotate_with_the_pose():
    E = _ewald(32)
    R = _rotations(5, 2)
    k = EwaldImaging(E).coordinates(R)
    assert k.shape == (5, 32, 32, 3)
    # k[b, h, w] = R[b] @ E[h, w]
    for b, (h, w) in [(0, (0, 0)), (3, (17, 5)), (4, (31, 31))]:
        torch.testing.assert_close(k[b, h, w], R[b] @ E[h, w])
    # |k| = |q|: a rotation keeps the Ewald sphere's radii
    torch.testing.assert_close(k.norm(dim=-1), E.norm(dim=-1).expand(5, 32, 32))
    # the decoder is queried at R @ E (an Ewald slice, not a central slice: k_z != 0 in the detector frame)
    torch.manual_seed(0)
    dec = FourierNet(q_max=float(E.norm(dim=-1).max()), width=32)
    model = Autoencoder(dec, EwaldImaging(E))
    with torch.no_grad():
        pred, R_out = model(torch.zeros(5, 32, 32), R)
        assert torch.equal(R_out, R)
        torch.testing.assert_close(pred, dec(torch.einsum("bij,hwj->bhwi", R, E)))
    assert E[..., 2].abs().max() > 1e-3  # the curvature is there


def test_pi_rotated_image_is_the_pose_times_rz_pi():
    # docs/architecture.md: rot90(img, 2) has the pose R @ RZ_PI, for the real detector layout
    E = _ewald(32)
    R = _rotations(4, 3)
    torch.manual_seed(0)
    model = Autoencoder(FourierNet(q_max=float(E.norm(dim=-1).max()), width=32), EwaldImaging(E))
    with torch.no_grad():
        img = model.render(R)
        img_pi = model.render(R @ RZ_PI.float())
    torch.testing.assert_close(rotate_pi(img), img_pi, rtol=1e-5, atol=1e-6)


def test_autoencoder_without_encoder_needs_poses():
    E = _ewald(16)
    model = Autoencoder(FourierNet(q_max=0.1, width=16), EwaldImaging(E))
    with pytest.raises(ValueError, match="poses"):
        model(torch.rand(2, 16, 16))


def test_separable_pyramid_equals_the_2d_convolution():
    pyr = GaussianPyramid(kernel_size=11, num_octaves=4)
    x = torch.rand(3, 1, 24, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pyr = pyr.double()
    direct = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (5, 5, 5, 5), mode="reflect"), pyr.kernels.double())
    torch.testing.assert_close(pyr(x)[:, 1:], direct)
