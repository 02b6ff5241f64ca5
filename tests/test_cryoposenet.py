"""cryoPoseNet (src/xrai/recon/cryoposenet.py): its projectors, their gradients, training, the end-to-end run.

The projectors are checked against the simulator (tests/cryoem_sets.py: torch-fourier-slice
projections, CTF and shifts by ``xrai.cryoem.ctf.fourier_filter``) at RELION poses that are no
symmetry of an asymmetric blob volume; the transposed pose (the other convention) must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryoem_sets import PIXEL_A, simulate
from relion_reference import euler_matrix
from test_relion_reference import blob_volume

from xrai.cryoem.imaging import CTF_KEYS, CentralSliceImaging
from xrai.data.star import ParticleDataset
from xrai.errors import XraiError
from xrai.recon.cryoposenet import CryoPoseNetRecipe, CryoPoseNetSettings, project
from xrai.rotations import sixd_to_matrix

N = 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def blob_images() -> dict:
    """Four CTF-filtered, shifted, noise-free simulator images of a blob volume, and their batch."""
    rng = np.random.default_rng(5)
    vol_zyx = blob_volume(N, rng, n_blobs=8)
    s = simulate(vol_zyx, 4, rng, snr_db=None)
    batch = {k: torch.as_tensor(s["ctf"][k]) for k in CTF_KEYS}
    batch["shifts_A"] = torch.as_tensor(s["origin_A"])
    A = torch.tensor(euler_matrix(*s["angles"].T), dtype=torch.float32)
    return {"volume_xyz": torch.from_numpy(vol_zyx.transpose(2, 1, 0).copy()).float(), "A": A,
            "images": torch.from_numpy(s["images"]), "batch": batch}


@pytest.mark.parametrize("projector", ["fourier", "real_space"])
def test_projector_matches_the_simulator_at_relion_poses(blob_images, projector):
    imaging = CentralSliceImaging(N, PIXEL_A, pad=2)  # the simulator filters on the 2x padded grid
    d = blob_images
    out = project(d["volume_xyz"], d["A"].transpose(1, 2), imaging, d["batch"], projector)
    assert out.shape == d["images"].shape
    assert _rel(out, d["images"]) < 0.05  # trilinear interpolation error (measured: 1-2 %)
    # the other convention (R = A instead of A^T) and a random rotation are far off
    assert _rel(project(d["volume_xyz"], d["A"], imaging, d["batch"], projector), d["images"]) > 0.3
    R = sixd_to_matrix(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    assert _rel(project(d["volume_xyz"], R, imaging, d["batch"], projector), d["images"]) > 0.3
    # without the CTF and shifts it is a different image: the batch's factors are applied
    assert _rel(project(d["volume_xyz"], d["A"].transpose(1, 2), imaging, None, projector), d["images"]) > 0.3


@pytest.mark.parametrize("projector", ["fourier", "real_space"])
def test_projector_gradients_reach_volume_and_rotation(blob_images, projector):
    imaging = CentralSliceImaging(N, PIXEL_A, pad=1)
    d = blob_images
    target = project(d["volume_xyz"], d["A"].transpose(1, 2), imaging, d["batch"], projector)
    volume = (d["volume_xyz"] * 0.9).requires_grad_(True)
    sixd = (torch.cat([d["A"][:, 0, :], d["A"][:, 1, :]], -1) + 0.05).requires_grad_(True)  # rows of A = columns of R

    def loss_of(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (project(v, sixd_to_matrix(x), imaging, d["batch"], projector) - target).pow(2).sum()

    loss = loss_of(volume, sixd)
    loss.backward()
    assert torch.isfinite(volume.grad).all() and float(volume.grad.abs().max()) > 0
    assert torch.isfinite(sixd.grad).all() and float(sixd.grad.abs().max()) > 0
    # the gradients are the loss's: a central finite difference along each agrees
    with torch.no_grad():
        for param, grad, other in ((sixd, sixd.grad, volume), (volume, volume.grad, sixd)):
            direction = grad / grad.norm()
            eps = 1e-2 * float(param.abs().max())
            plus = loss_of(param + eps * direction, other) if param is volume else loss_of(other, param + eps * direction)
            minus = loss_of(param - eps * direction, other) if param is volume else loss_of(other, param - eps * direction)
            fd = float(plus - minus) / (2 * eps)
            assert fd == pytest.approx(float(grad.norm()), rel=0.1)


def test_settings_are_the_papers_and_bad_keys_fail():
    s = CryoPoseNetSettings.from_config({})
    assert CryoPoseNetRecipe.default_batch_size == 32 and not CryoPoseNetRecipe.estimates_shifts
    assert (s.lr, s.channels, s.mlp, s.projector) == (5e-4, (32, 64, 128), (512, 512), "fourier")
    assert CryoPoseNetSettings.from_config({"train": {"cryoposenet": {"mlp": [64]}}}).mlp == (64,)
    with pytest.raises(XraiError, match="train.cryoposenet.projector"):
        CryoPoseNetSettings.from_config({"train": {"cryoposenet": {"projector": "nufft"}}})


def test_config_schema_defaults_are_the_settings(repo_root, tmp_path):
    from dataclasses import asdict

    import yaml

    from xrai.config import load_config

    cfg = load_config(repo_root / "config" / "cryoem-test.yaml")
    section = cfg["train"]["cryoposenet"]
    defaults = asdict(CryoPoseNetSettings())
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()} == defaults
    bad = yaml.safe_load((repo_root / "config" / "cryoem-test.yaml").read_text())
    bad["train"]["cryoposenet"] = {"projector": "nufft"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(XraiError, match="projector"):
        load_config(tmp_path / "bad.yaml")


def test_training_steps_lower_the_loss_and_state_round_trips(adk_sets):
    torch.manual_seed(0)
    # 10x the paper's learning rate: a visible drop within a few steps
    cfg = {"train": {"cryoposenet": {"batch_size": 16, "prepare_images": 64, "lr": 5e-3}}}
    with ParticleDataset(adk_sets["train"]) as ds:
        imaging = CentralSliceImaging.for_dataset(ds, pad=CryoPoseNetRecipe.imaging_pad(cfg))
        recipe = CryoPoseNetRecipe(cfg, imaging, seed=0)
        assert (recipe.steps, recipe.batch_size) == (1000, 16)
        recipe.prepare(ds)
        assert float(recipe.model.image_scale) > 0 and float(recipe.model.volume_scale) != 1.0
        optimizer = recipe.build_optimizer()
        batches = list(ds.iter_batches(16, shuffle=True, seed=0, drop_last=True))[:2]
        losses = [recipe.training_step(batches[step % 2], optimizer, step)["loss"] for step in range(30)]
        energy = float(np.mean([b["images"].pow(2).sum(dim=(-2, -1)).mean() for b in batches]))
        # the start predicts ~ nothing (loss ~ the images' energy); the trained volume explains part of it
        assert np.mean(losses[:2]) > 0.95 * energy
        assert np.mean(losses[-4:]) < 0.92 * energy  # measured: 0.89 after 30 steps
        R, shifts, branch = recipe.infer(batches[0])
        assert R.shape == (16, 3, 3) and branch.dtype == torch.int8
        assert torch.allclose(torch.linalg.det(R), torch.ones(16), atol=1e-5)
        assert torch.equal(shifts, batches[0]["shifts_A"].float())  # given, not estimated
        again = CryoPoseNetRecipe(cfg, imaging, seed=1)
        assert not torch.allclose(again.infer(batches[0])[0], R)
        again.model.load_state_dict(recipe.model.state_dict())  # the loop's checkpoint: the scales are buffers
        assert torch.allclose(again.infer(batches[0])[0], R)
        assert torch.equal(again.volume(), recipe.volume())


def test_end_to_end_run_writes_outputs_that_evaluate_cryoem_scores(adk_sets, tmp_path):
    """``train_cryoem(cfg, "cryoposenet", ...)``: the loop's outputs, scored; the shifts are the true ones."""
    import h5py

    from xrai.evaluation.cryoem import evaluate_cryoem
    from xrai.io import read_mrc
    from xrai.recon.cryoem_train import train_cryoem

    cfg = {"train": {"seed": 0, "num_threads": 1, "log_every": 10, "checkpoint_every": 1000,
                     "cryoposenet": {"steps": 20, "batch_size": 16, "prepare_images": 64}},
           "evaluation": {"align_angular_step_deg": 30}}
    run = train_cryoem(cfg, "cryoposenet", 0, adk_sets["train"], adk_sets["test"], tmp_path / "run0")
    assert read_mrc(run / "volume.mrc")[0].shape == (N, N, N)
    with h5py.File(run / "poses_test.h5") as f, ParticleDataset(adk_sets["test"]) as ds:
        assert f["rotations"].shape == (len(ds), 3, 3)
        np.testing.assert_allclose(f["shifts_A"][:], ds.true_shifts()[f["index"][:]], atol=1e-4)
    metrics = evaluate_cryoem(run_dir=run, reference=adk_sets["reference"], train_data=adk_sets["train"],
                              test_data=adk_sets["test"], method="cryoposenet", cfg=cfg)
    assert metrics["method"] == "cryoposenet"
    test = metrics["pose_error_test"]
    assert 0 <= test["median_deg"] <= 180 and test["shift_error"]["median_A"] < 1e-3  # given, not estimated
    assert metrics["resolution"]["0.5"]["A"] is None or metrics["resolution"]["0.5"]["A"] > 2 * PIXEL_A - 1e-6
