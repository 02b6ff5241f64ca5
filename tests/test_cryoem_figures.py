"""The cryo-EM report figures: the montage's clean / CTF images against the simulator's, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_relion_reference import blob_volume

from xrai.cli import main
from xrai.cryoem.projection import FourierProjector
from xrai.cryoem.simulate import image_parameters, noise_free_images
from xrai.report.cryoem_figures import particle_images
from xrai.rotations import relion_euler_to_matrix

BOX, PIXEL_A, N = 32, 2.0, 6
EM = {"ctf": True, "voltage_kv": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1, "shift_sigma_A": 3.0,
      "pad_factor": 2, "defocus": {"distribution": "uniform", "min_um": 0.5, "max_um": 1.5},
      "astigmatism": {"max_um": 0.05}}


@pytest.fixture(scope="module")
def simulated() -> dict:
    """A blob volume's noise-free particles from the simulator, and the STAR-style batch describing them."""
    vol_zyx = blob_volume(BOX, np.random.default_rng(0)).astype(np.float32)
    params = image_parameters(EM, seed=5, split="test", start=0, stop=N, pixel_size=PIXEL_A)
    projector = FourierProjector(torch.from_numpy(vol_zyx), pad_factor=2)
    with_ctf = noise_free_images(projector, EM, params, PIXEL_A)
    clean = noise_free_images(projector, EM | {"ctf": False}, params, PIXEL_A)
    A = relion_euler_to_matrix(*(torch.from_numpy(params[k]) for k in ("rot", "tilt", "psi")))
    batch = {"rotations": A.transpose(-1, -2).float(), "index": torch.arange(N),
             "shifts_A": torch.from_numpy(np.stack([params["origin_x_A"], params["origin_y_A"]], 1)).float(),
             "defocus_u_A": torch.from_numpy(params["defocus_u_A"]), "defocus_v_A": torch.from_numpy(params["defocus_v_A"]),
             "defocus_angle_deg": torch.from_numpy(params["defocus_angle_deg"]),
             "voltage_kv": torch.full((N,), 300.0), "cs_mm": torch.full((N,), 2.7),
             "amplitude_contrast": torch.full((N,), 0.1)}
    return {"volume_xyz": vol_zyx.transpose(2, 1, 0).copy(), "batch": batch, "clean": clean, "with_ctf": with_ctf}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b**2).sum())


def test_montage_images_are_the_simulators_noise_free_particles(simulated):
    clean, with_ctf = particle_images(simulated["volume_xyz"], simulated["batch"], PIXEL_A)
    assert _relative_error(clean, simulated["clean"]) < 1e-3  # measured: 1e-5
    assert _relative_error(with_ctf, simulated["with_ctf"]) < 1e-3  # measured: 1e-5
    # a wrong pose or a shift of the wrong sign is far off: the comparison above can fail
    wrong = dict(simulated["batch"], rotations=simulated["batch"]["rotations"].roll(1, dims=0))
    assert _relative_error(particle_images(simulated["volume_xyz"], wrong, PIXEL_A)[1], simulated["with_ctf"]) > 0.5
    flipped = dict(simulated["batch"], shifts_A=-simulated["batch"]["shifts_A"])
    assert _relative_error(particle_images(simulated["volume_xyz"], flipped, PIXEL_A)[0], simulated["clean"]) > 0.5


def test_xray_metrics_are_refused_with_one_line(tmp_path, capsys):
    path = tmp_path / "results/metrics/2CEX_A/2048/xrai/metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"protein": "2CEX_A", "size": 2048, "method": "xrai"}))
    assert main(["figures-cryoem", "--metrics", str(path), "--out-dir", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a cryo-EM metrics.json" in err[0] and str(path) in err[0]
