"""Cryo-EM reconstruction with known answers: the Wiener known-pose bound, the fast default, the evaluation.

A blob volume (tests/test_relion_reference.py's) is projected by the simulator's Fourier-slice
projector, filtered by CTF and shifts, given white noise at 0 dB and written as a RELION 3.1 set
with the independent writer of tests/relion_reference.py. The true poses must reconstruct it;
random poses must not; the fast default must find poses far below chance error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from relion_reference import euler_matrix, write_particles
from test_relion_reference import blob_volume, random_poses

from xrai.cryoem.imaging import CentralSliceImaging
from xrai.data.star import ParticleDataset
from xrai.evaluation.cryoem import evaluate_cryoem, fit_frame_translation, pose_metrics
from xrai.evaluation.metrics import fsc
from xrai.io import write_mrc
from xrai.recon.cryoem_train import known_pose_volume, train_cryoem

BOX, PIXEL_A, N_TRAIN, N_TEST = 32, 3.2, 1536, 256
#: 4AKE's potential at 3.2 Å: B-factor >= 2 pi^2 px^2 / 2 against aliasing
BFACTOR = 200.0


def _simulate(vol_zyx: np.ndarray, n: int, rng: np.random.Generator, snr_db: float | None) -> dict:
    from xrai.cryoem.ctf import CtfParams, fourier_filter
    from xrai.cryoem.projection import FourierProjector

    angles = random_poses(rng, n)
    A = torch.tensor(euler_matrix(*angles.T), dtype=torch.float32)
    origin_A = rng.normal(0, 2.5, (n, 2))
    u = rng.uniform(5000, 15000, n)
    ctf = dict(defocus_u_A=u, defocus_v_A=u - rng.uniform(0, 300, n), defocus_angle_deg=rng.uniform(0, 180, n),
               voltage_kv=np.full(n, 300.0), cs_mm=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1))
    clean = FourierProjector(torch.from_numpy(vol_zyx).float(), pad_factor=2).project(A)
    params = CtfParams(**{k: torch.tensor(ctf[k]) for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg")},
                       voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    images = fourier_filter(clean, PIXEL_A, ctf=params, shifts_px=-torch.tensor(origin_A) / PIXEL_A, pad_factor=2)
    if snr_db is not None:
        sigma = float(images.var()) ** 0.5 / 10 ** (snr_db / 20)
        images = images + sigma * torch.from_numpy(rng.normal(size=images.shape)).float()
    return {"images": images.numpy(), "angles": angles, "origin_A": origin_A, "ctf": ctf}


def _particle_sets(folder, vol_zyx: np.ndarray, rng: np.random.Generator) -> dict:
    write_mrc(folder / "reference.mrc", vol_zyx.transpose(2, 1, 0), PIXEL_A)
    out = {"folder": folder, "reference": folder / "reference.mrc", "volume_xyz": vol_zyx.transpose(2, 1, 0)}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        s = _simulate(vol_zyx, n, rng, snr_db=0.0)
        write_particles(folder / f"{split}.star", s["images"], PIXEL_A, angles=s["angles"], origin_A=s["origin_A"],
                        ctf_params=s["ctf"])
        out[split] = folder / f"{split}.star"
    return out


@pytest.fixture(scope="module")
def particle_sets(tmp_path_factory) -> dict:
    """An asymmetric blob volume (smooth: the known-pose test)."""
    rng = np.random.default_rng(3)
    return _particle_sets(tmp_path_factory.mktemp("blobs"), blob_volume(BOX, rng, n_blobs=8), rng)


@pytest.fixture(scope="module")
def adk_sets(tmp_path_factory, pdb_mirror) -> dict:
    """4AKE's electrostatic potential (the simulator's, from the shared PDB file) at 32 px, 3.2 Å."""
    from xrai.cryoem.potential import potential_from_file

    rng = np.random.default_rng(3)
    vol_zyx = potential_from_file(pdb_mirror / "4ake.pdb", BOX, PIXEL_A, BFACTOR)
    return _particle_sets(tmp_path_factory.mktemp("adk"), vol_zyx, rng)


def _fsc_to_quarter_nyquist(volume_xyz: np.ndarray, reference_xyz: np.ndarray) -> float:
    return float(min(fsc(volume_xyz, reference_xyz, PIXEL_A)["fsc"][1:BOX // 8 + 1]))


def test_known_pose_wiener_reconstructs_and_random_poses_do_not(particle_sets):
    torch.manual_seed(0)
    with ParticleDataset(particle_sets["train"]) as ds:
        imaging = CentralSliceImaging.for_dataset(ds, pad=2)
        volume, merge = known_pose_volume(ds, imaging)
        assert _fsc_to_quarter_nyquist(volume.numpy(), particle_sets["volume_xyz"]) >= 0.8
        ssnr = merge.ssnr()
        assert float(ssnr[2]) > 10 * float(ssnr[-1])  # the Wiener filter damps the noisy shells
        R = torch.linalg.qr(torch.randn(len(ds), 3, 3, dtype=torch.float64))[0]
        R = R * torch.linalg.det(R).sign()[:, None, None]
        random_volume, _ = known_pose_volume(ds, CentralSliceImaging.for_dataset(ds, pad=1),
                                             poses=(R.numpy(), ds.true_shifts()))
        assert _fsc_to_quarter_nyquist(random_volume.numpy(), particle_sets["volume_xyz"]) < 0.5


def test_frame_translation_and_shift_error_are_recovered():
    rng = np.random.default_rng(0)
    n = 200
    R = np.stack([np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(n)])
    R *= np.linalg.det(R)[:, None, None]
    c = np.array([1.5, -2.0, 0.7])
    true = rng.normal(0, 3, (n, 2))
    d = np.einsum("nji,j->ni", R, c)[:, :2]
    np.testing.assert_allclose(fit_frame_translation(d, R, np.ones(n)), c, atol=1e-9)
    phi = rng.uniform(0, 2 * np.pi, n)
    wrong = 0.5 * np.stack([np.cos(phi), np.sin(phi)], 1)  # every origin 0.5 Å off, on top of the frame translation
    poses = {"rotations": torch.from_numpy(R), "shifts_A": true + d + wrong, "index": np.arange(n)}
    m = pose_metrics(poses, torch.from_numpy(R), true, pixel_size_A=0.5)
    assert m["median_deg"] < 1e-5 and m["pi_flip_fraction"] == 0.0
    assert m["shift_error"]["median_A"] == pytest.approx(0.5, abs=0.1)
    assert m["shift_error"]["mse_px2"] == pytest.approx(1.0, abs=0.4)


def test_fast_default_finds_poses_far_below_chance(adk_sets, tmp_path):
    """CI scale: 1,536 images of 32 px with CTF, shifts and noise at 0 dB, 120 steps."""
    torch.manual_seed(0)
    cfg = {"train": {"seed": 0, "num_threads": 1,
                     "xrai_cryoem": {"steps": 120, "batch_size": 64, "shift_points": 3,
                                     "max_shift_A": 4.0, "memory_images": [512, 1536], "init_images": 256,
                                     "q_start_A": 20.0, "ramp_fraction": 0.7, "final_pad": 1,
                                     "encoder": False}},
           "evaluation": {"align_angular_step_deg": 30}}
    run = train_cryoem(cfg, "xrai", 0, adk_sets["train"], adk_sets["test"], tmp_path / "run0")
    metrics = evaluate_cryoem(run_dir=run, reference=adk_sets["reference"], train_data=adk_sets["train"],
                              test_data=adk_sets["test"], method="xrai", cfg=cfg)
    test = metrics["pose_error_test"]
    assert test["median_deg"] < 8.0  # chance: ~ 90 degrees (measured: 3.2)
    assert metrics["pose_error_train"]["median_deg"] < 8.0
    assert test["shift_error"]["median_A"] < 1.5
    assert metrics["resolution"]["0.5"]["A"] < 4 * 2 * PIXEL_A
    # the same metric on random poses is at chance: the assertions above can fail
    with ParticleDataset(adk_sets["test"]) as ds:
        R = torch.linalg.qr(torch.randn(len(ds), 3, 3, dtype=torch.float64))[0]
        R = R * torch.linalg.det(R).sign()[:, None, None]
        shifts = ds.true_shifts()
        chance = pose_metrics({"rotations": R, "shifts_A": shifts, "index": np.arange(len(ds))},
                              ds.true_rotations(), shifts, ds.pixel_size_A)
    assert chance["median_deg"] > 40.0
