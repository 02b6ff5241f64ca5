"""The independent RELION-convention check (tests/relion_reference.py) on a synthetic set with known answers.

An asymmetric volume of Gaussian blobs is projected at random known poses by a real-space
projector written here from RELION's definition (sample ``V(A^T r)``, sum along z, the particle
at the centre minus the origin, CTF applied with 2x padding), written as a RELION 3.1 STAR +
mrcs set, read back and reconstructed by direct Fourier inversion. The stated poses must give
FSC >= 0.8 up to a quarter of Nyquist; transposed poses, a flipped shift sign or an ignored
CTF must not.
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
from relion_reference import (
    euler_matrix,
    fsc,
    fsc_against_volume,
    read_particles,
    reconstruct,
    reconstruct_particles,
    relion_ctf,
    write_particles,
)
from scipy.ndimage import map_coordinates

BOX, N_IMAGES, PIXEL_A = 48, 1500, 1.5


def blob_volume(n: int, rng: np.random.Generator, n_blobs: int = 6) -> np.ndarray:
    """Sum of anisotropic Gaussian blobs at random positions: an asymmetric (n, n, n) ``[z, y, x]`` volume."""
    idx = np.arange(n) - n // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    r = np.stack([x, y, z], -1).astype(np.float64)
    vol = np.zeros((n, n, n))
    for _ in range(n_blobs):
        centre = rng.uniform(-1, 1, 3) * n * 0.18
        axes, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        inv_cov = axes @ np.diag(1 / rng.uniform(1.5, 3.5, 3) ** 2) @ axes.T
        d = r - centre
        vol += rng.uniform(0.5, 1.5) * np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, inv_cov, d))
    return vol


def project(vol: np.ndarray, A: np.ndarray, origin_px: np.ndarray, ctf_params: dict | None = None,
            pixel_size_A: float = 1.0) -> np.ndarray:
    """Real-space projections: image(x, y) = sum_z V(A^T (x + ox, y + oy, z)), then CTF (2x padded)."""
    n = vol.shape[0]
    c = n // 2
    idx = np.arange(n) - c
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    out = np.empty((len(A), n, n))
    for i in range(len(A)):
        r = np.stack([x + origin_px[i, 0], y + origin_px[i, 1], z]).reshape(3, -1)
        s = A[i].T @ r
        out[i] = map_coordinates(vol, [s[2] + c, s[1] + c, s[0] + c], order=1, cval=0.0).reshape(n, n, n).sum(0)
    if ctf_params is None:
        return out
    size = 2 * n
    off = size // 2 - c
    padded = np.zeros((len(A), size, size))
    padded[:, off:off + n, off:off + n] = out
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(padded, axes=(-2, -1))), axes=(-2, -1))
    f *= relion_ctf(size, pixel_size_A, **ctf_params)
    out = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))), axes=(-2, -1)).real
    return out[:, off:off + n, off:off + n]


def random_poses(rng: np.random.Generator, m: int) -> np.ndarray:
    """(m, 3) rot, tilt, psi (degrees), uniform over SO(3)."""
    rot, psi = rng.uniform(-180, 180, (2, m))
    return np.stack([rot, np.rad2deg(np.arccos(rng.uniform(-1, 1, m))), psi], 1)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> dict:
    rng = np.random.default_rng(0)
    vol = blob_volume(BOX, rng)
    angles = random_poses(rng, N_IMAGES)
    A = euler_matrix(*angles.T)
    origin_px = rng.normal(0, 3, (N_IMAGES, 2))
    u = rng.uniform(10000, 20000, N_IMAGES)
    ctf = {"defocus_u_A": u, "defocus_v_A": u - rng.uniform(0, 1000, N_IMAGES),
           "defocus_angle_deg": rng.uniform(-180, 180, N_IMAGES), "voltage_kv": np.full(N_IMAGES, 300.0),
           "cs_mm": np.full(N_IMAGES, 2.7), "amplitude_contrast": np.full(N_IMAGES, 0.1)}
    images = project(vol, A, origin_px, ctf, PIXEL_A)
    star = tmp_path_factory.mktemp("relion_set") / "particles.star"
    write_particles(star, images, PIXEL_A, angles=angles, origin_A=origin_px * PIXEL_A, ctf_params=ctf, n_stacks=3)
    return {"volume": vol, "star": star, "angles": angles, "origin_px": origin_px, "ctf": ctf}


def min_fsc_to_quarter_nyquist(vol: np.ndarray, reference: np.ndarray) -> float:
    return float(fsc(vol, reference)[1:BOX // 8 + 1].min())


def test_euler_matrix_is_relions_zyz_frame_rotation():
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    assert np.allclose(euler_matrix(30, 0, 0)[0], [[c, s, 0], [-s, c, 0], [0, 0, 1]])
    assert np.allclose(euler_matrix(0, 90, 0)[0], [[0, 0, -1], [0, 1, 0], [1, 0, 0]])
    A = euler_matrix(*random_poses(np.random.default_rng(1), 50).T)
    assert np.allclose(A @ np.transpose(A, (0, 2, 1)), np.eye(3)) and np.allclose(np.linalg.det(A), 1)
    # the projection direction of (rot, tilt) is A's last row: (cos rot sin tilt, sin rot sin tilt, cos tilt)
    rot, tilt = np.deg2rad(40), np.deg2rad(70)
    assert np.allclose(euler_matrix(40, 70, -25)[0, 2], [np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)])


def test_projector_puts_a_point_at_A_p_minus_origin():
    """A blob at volume position p appears at image (A p)_xy - origin: the axes of V(A^T r) and RELION's shift."""
    n, p = 32, np.array([6.0, -3.0, 4.0])
    idx = np.arange(n) - n // 2
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    vol = np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * 1.5**2))
    angles = random_poses(np.random.default_rng(2), 4)
    A, origin = euler_matrix(*angles.T), np.array([[2.0, -1.0], [0.0, 0.0], [-3.0, 2.5], [1.0, 1.0]])
    images = project(vol, A, origin)
    yy, xx = np.meshgrid(idx, idx, indexing="ij")
    centroid = np.stack([(images * xx).sum((1, 2)), (images * yy).sum((1, 2))], 1) / images.sum((1, 2))[:, None]
    assert np.allclose(centroid, (A @ p)[:, :2] - origin, atol=0.05)


def test_ctf_has_relions_sign_and_astigmatism_and_agrees_with_torch_ctf():
    n, px = 64, 1.5
    ctf = relion_ctf(n, px, 15000.0, 11000.0, 30.0, 300.0, 2.7, 0.07)[0]
    assert ctf[n // 2, n // 2] == pytest.approx(0.07)            # CTF(0) = +amplitude contrast
    assert ctf[n // 2, n // 2 + 1] > 0.07                          # rises at low frequency (underfocus, protein white)
    # defocus U lies along rlnDefocusAngle: at 45 deg the diagonal sees U, the anti-diagonal V
    astig = relion_ctf(n, px, 15000.0, 11000.0, 45.0, 300.0, 2.7, 0.07)[0]
    iso_u, iso_v = relion_ctf(n, px, [15000.0, 11000.0], [15000.0, 11000.0], 0.0, 300.0, 2.7, 0.07)
    i = np.arange(n // 2 + 1, n)
    assert np.allclose(astig[i, i], iso_u[i, i]) and np.allclose(astig[i, n - i], iso_v[i, n - i])
    assert not np.allclose(iso_u[i, i], iso_v[i, i])
    torch_ctf = pytest.importorskip("torch_ctf")
    theirs = torch_ctf.calculate_ctf_2d(defocus=1.3, astigmatism=0.2, astigmatism_angle=30.0, voltage=300.0,
                                        spherical_aberration=2.7, amplitude_contrast=0.07, phase_shift=0.0,
                                        pixel_size=px, image_shape=(n, n), rfft=False, fftshift=True).numpy()
    assert np.abs(theirs - ctf).max() < 5e-3


def test_fsc_of_itself_its_negative_and_noise():
    rng = np.random.default_rng(3)
    vol = blob_volume(32, rng)
    assert np.allclose(fsc(vol, vol), 1) and np.allclose(fsc(vol, -vol), -1)
    assert np.abs(fsc(rng.normal(size=vol.shape), rng.normal(size=vol.shape))[4:]).max() < 0.3


def test_reconstruction_at_the_stated_poses_shifts_and_ctf(synthetic_set):
    particles = read_particles(synthetic_set["star"])
    assert particles["images"].shape == (N_IMAGES, BOX, BOX) and particles["pixel_size_A"] == pytest.approx(PIXEL_A)
    assert np.allclose(particles["origin_px"], synthetic_set["origin_px"], atol=1e-5)
    vol = reconstruct_particles(particles)
    assert min_fsc_to_quarter_nyquist(vol, synthetic_set["volume"]) >= 0.8


def test_fsc_against_a_volume_file(synthetic_set, tmp_path):
    """The entry point for other sets (the simulator's): STAR + reference MRC -> FSC curve and its low-resolution minimum."""
    mrc = tmp_path / "volume.mrc"
    with mrcfile.new(mrc) as f:
        f.set_data(synthetic_set["volume"].astype(np.float32))
        f.voxel_size = PIXEL_A
    first = synthetic_set["star"].with_name("first.star")  # the first 600 particles, beside their stacks
    blocks = starfile.read(synthetic_set["star"], always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[:600]
    starfile.write(blocks, first)
    curve, low = fsc_against_volume(first, mrc)
    assert curve.shape == (BOX // 2 + 1,) and low >= 0.8 and low == curve[1:BOX // 8 + 1].min()
    with mrcfile.new(mrc, overwrite=True) as f:
        f.set_data(synthetic_set["volume"].astype(np.float32))
        f.voxel_size = 2 * PIXEL_A
    with pytest.raises(ValueError, match="voxel size"):
        fsc_against_volume(first, mrc)


@pytest.mark.parametrize("mistake", ["transposed poses", "flipped shift sign", "CTF ignored"])
def test_reconstruction_fails_with_the_wrong_convention(synthetic_set, mistake):
    p = read_particles(synthetic_set["star"])
    keep = slice(0, 500)
    A, origin, ctf = p["A"][keep], p["origin_px"][keep], {k: v[keep] for k, v in p["ctf_params"].items()}
    if mistake == "transposed poses":
        A = np.transpose(A, (0, 2, 1))
    elif mistake == "flipped shift sign":
        origin = -origin
    else:
        ctf = None
    vol = reconstruct(p["images"][keep], A, origin, ctf, p["pixel_size_A"])
    assert min_fsc_to_quarter_nyquist(vol, synthetic_set["volume"]) < 0.7
