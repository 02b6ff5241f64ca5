"""The cryo-EM imaging model against independent real-space projections (tests/test_relion_reference.py's).

A slice of a blob volume's transform at pose ``A^T`` times the CTF and shift phase of the
batch must equal the transform of the RELION-convention projection (real-space sum, CTF on a
2x padded grid); the transposed pose or a flipped shift sign must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from relion_reference import euler_matrix, relion_ctf
from test_relion_reference import blob_volume, project, random_poses

from xrai.cryoem.imaging import CentralSliceImaging, batch_ctf
from xrai.fourier import fourier_volume, sample_fourier

BOX, PIXEL_A, N = 32, 1.5, 6


@pytest.fixture(scope="module")
def projected() -> dict:
    rng = np.random.default_rng(0)
    vol_zyx = blob_volume(BOX, rng)
    angles = random_poses(rng, N)
    A = euler_matrix(*angles.T)
    origin_A = rng.normal(0, 2.0, (N, 2))
    ctf = dict(defocus_u_A=rng.uniform(8000, 12000, N), defocus_v_A=rng.uniform(8000, 12000, N),
               defocus_angle_deg=rng.uniform(0, 180, N), voltage_kv=np.full(N, 300.0), cs_mm=np.full(N, 2.7),
               amplitude_contrast=np.full(N, 0.1))
    images = project(vol_zyx, A, origin_A / PIXEL_A, ctf, PIXEL_A)
    batch = {k: torch.tensor(v) for k, v in ctf.items()} | {"shifts_A": torch.tensor(origin_A)}
    return {"volume": torch.from_numpy(vol_zyx.transpose(2, 1, 0).copy()), "A": torch.tensor(A),
            "images": torch.tensor(images, dtype=torch.float32), "batch": batch}


def _relative_error(imaging: CentralSliceImaging, data: dict, R: torch.Tensor, batch: dict) -> tuple[float, float]:
    spectrum, grid = fourier_volume(data["volume"], PIXEL_A, pad=2)
    predicted = imaging.form_image(sample_fourier(spectrum, imaging.coordinates(R.float()), grid), batch)
    observed = imaging.spectrum(data["images"])
    band = imaging.pixel_coordinates.norm(dim=-1) < 0.25 / PIXEL_A  # half of Nyquist
    fourier = float(((predicted - observed).abs() ** 2)[:, band].sum() / (observed.abs() ** 2)[:, band].sum())
    real = imaging.to_images(predicted)
    return fourier, float(((real - data["images"]) ** 2).sum() / (data["images"] ** 2).sum())


@pytest.mark.parametrize("pad", [1, 2])
def test_slice_times_ctf_and_shift_is_the_projection(projected, pad):
    imaging = CentralSliceImaging(BOX, PIXEL_A, pad=pad)
    fourier, real = _relative_error(imaging, projected, projected["A"].transpose(1, 2), projected["batch"])
    assert fourier < 0.02
    assert real < (0.02 if pad == 1 else 2e-3)  # unpadded: the CTF's point spread wraps around


def test_wrong_pose_or_shift_sign_does_not_match(projected):
    imaging = CentralSliceImaging(BOX, PIXEL_A, pad=2)
    batch = projected["batch"]
    transposed, _ = _relative_error(imaging, projected, projected["A"], batch)
    flipped, _ = _relative_error(imaging, projected, projected["A"].transpose(1, 2),
                                 batch | {"shifts_A": -batch["shifts_A"]})
    no_ctf, _ = _relative_error(imaging, projected, projected["A"].transpose(1, 2), {"shifts_A": batch["shifts_A"]})
    assert min(transposed, flipped, no_ctf) > 0.3


def test_ctf_is_relions_including_v_above_u():
    n = 24
    params = dict(defocus_u_A=np.array([9000.0, 11000.0]), defocus_v_A=np.array([10500.0, 9000.0]),
                  defocus_angle_deg=np.array([20.0, 125.0]), voltage_kv=np.full(2, 300.0), cs_mm=np.full(2, 2.7),
                  amplitude_contrast=np.full(2, 0.07))
    reference = relion_ctf(n, 1.2, **params)  # centred full grid
    ours = batch_ctf({k: torch.tensor(v) for k, v in params.items()}, 1.2, n)
    # to the rfft layout; the Nyquist column is kx = -1/2 there, +1/2 in the rfft (CTF(kx, ky) != CTF(-kx, ky))
    centred = np.fft.ifftshift(reference, axes=(-2, -1))[..., : n // 2]
    np.testing.assert_allclose(ours[..., : n // 2].numpy(), centred, atol=1e-3)
    assert float(ours[0, 0, 0]) == pytest.approx(0.07, abs=1e-5)  # CTF(0) = +Q0


def test_imaging_model_shapes_and_grid():
    imaging = CentralSliceImaging(20, 2.0, pad=2)
    assert imaging.image_shape == (20, 20)
    assert tuple(imaging.pixel_coordinates.shape) == (40, 21, 3)
    assert imaging.reconstruction_grid().voxel_size == pytest.approx(2.0)
    images = torch.randn(3, 20, 20)
    torch.testing.assert_close(imaging.to_images(imaging.spectrum(images)), images, atol=1e-5, rtol=0)


def test_matches_the_simulators_projector_and_filter(projected):
    """The simulator's path (Fourier-slice projection, then CTF and shift on a 2x padded grid) gives the same images."""
    from xrai.cryoem.ctf import CtfParams, fourier_filter
    from xrai.cryoem.projection import FourierProjector

    b = dict(projected["batch"])
    # U >= V: the simulator's filter (torch-ctf) gives NaN for V > U
    b["defocus_u_A"], b["defocus_v_A"] = (torch.maximum(b["defocus_u_A"], b["defocus_v_A"]),
                                          torch.minimum(b["defocus_u_A"], b["defocus_v_A"]))
    clean = FourierProjector(projected["volume"].permute(2, 1, 0).float(), pad_factor=2).project(projected["A"].float())
    ctf = CtfParams(defocus_u_A=b["defocus_u_A"], defocus_v_A=b["defocus_v_A"], defocus_angle_deg=b["defocus_angle_deg"],
                    voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    simulated = fourier_filter(clean, PIXEL_A, ctf=ctf, shifts_px=-b["shifts_A"] / PIXEL_A, pad_factor=2)
    imaging = CentralSliceImaging(BOX, PIXEL_A, pad=2)
    spectrum, grid = fourier_volume(projected["volume"], PIXEL_A, pad=2)
    ours = imaging.to_images(imaging.form_image(
        sample_fourier(spectrum, imaging.coordinates(projected["A"].transpose(1, 2).float()), grid), b))
    assert float(((ours - simulated) ** 2).sum() / (simulated**2).sum()) < 2e-3
