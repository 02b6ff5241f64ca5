"""The default recipe (method ``xrai``, src/xrai/abinitio.py): its parts against known answers, and a
shortened ab-initio run at the test scale that must converge where the paper's recipe does not."""

from __future__ import annotations

import copy
import csv
import math

import h5py
import pytest
import torch

from xrai.config import validate_config
from xrai.recon.abinitio import (
    MergedVoxelVolume,
    XraiRecipe,
    XraiSettings,
    distillation_loss,
    encoder_candidates,
    grid_search,
    refine_poses,
)
from xrai.rotations import RZ_PI, axis_angle_to_matrix, quaternion_to_matrix, random_quaternions
from xrai.so3grid import so3_grid
from xrai.volume import ReciprocalGrid

#: the CI budget of the ab-initio run: train steps at the test scale (about 1.3 CPU minutes)
CI_STEPS = 300
#: the issue's bar: well below chance (a random pose is ~ 90-100 degrees off)
CI_MEDIAN_DEG = 20.0
#: the paper recipe's network, shrunk so that CI can afford the same number of steps
#: (every part of the real one: pyramid, VGG blocks + BatchNorm, MLP, FourierNet, symmetrized loss)
TINY_PAPER = {
    "encoder": {"channels": [4, 8, 8, 8, 8], "mlp": [16]},
    "decoder": {"width": 16, "envelope_layers": 1, "modulant_layers": 1},
}


def test_settings_follow_the_config(test_config):
    s = XraiSettings.from_config(test_config)
    x = test_config["train"]["xrai"]
    assert s.heads == x["heads"] and s.search_steps == x["search_steps"]
    assert s.curriculum == tuple((int(a), float(b)) for a, b in x.get("curriculum", XraiSettings().curriculum))
    # piecewise linear in the step, constant after the last point
    t = XraiSettings(curriculum=((0, 0.2), (100, 0.2), (200, 1.0)))
    assert t.q_fraction(0) == t.q_fraction(100) == pytest.approx(0.2)
    assert t.q_fraction(150) == pytest.approx(0.6)
    assert t.q_fraction(10_000) == pytest.approx(1.0)
    assert XraiSettings(memory_images=(100, 300)).memory(50, 100) == pytest.approx(200)
    # the schema's defaults (filled in when train.xrai is absent) are the dataclass's defaults
    bare = copy.deepcopy(test_config)
    del bare["train"]["xrai"]
    assert XraiSettings.from_config(validate_config(bare)) == XraiSettings()


def test_merged_volume_is_a_friedel_symmetric_running_average():
    grid = ReciprocalGrid(16, 0.1)
    vol = MergedVoxelVolume(grid)
    k = torch.tensor([[0.02, 0.01, -0.03]])
    vol.merge(k, torch.tensor([3.0]), decay=0.0)
    # the value comes back at k and at -k (Friedel), the unobserved rest reads 1
    assert float(vol.sample_relative(k)) == pytest.approx(3.0, rel=1e-5)
    assert float(vol.sample_relative(-k)) == pytest.approx(3.0, rel=1e-5)
    assert float(vol.sample_relative(torch.tensor([[0.09, 0.0, 0.0]]))) == pytest.approx(1.0)
    # decay 0.5: the new value weighs 2/3 against 1/3 for the old one
    vol.merge(k, torch.tensor([6.0]), decay=0.5)
    assert float(vol.sample_relative(k)) == pytest.approx((0.5 * 3 + 6) / 1.5, rel=1e-5)
    # amplitude = scale * radial(|k|) * v(k)
    vol.scale.fill_(2.0)
    assert float(vol(k)) == pytest.approx(2.0 * float(vol.sample_relative(k)), rel=1e-6)


def test_sharpen_is_an_unsharp_mask_of_the_merged_voxels_only():
    grid = ReciprocalGrid(16, 0.1)
    vol = MergedVoxelVolume(grid)
    idx = torch.arange(16, dtype=torch.float32)
    ramp = 1.0 + 0.05 * idx[:, None, None].expand(16, 16, 16)  # linear: a Gaussian leaves it as it is
    weight = torch.ones(16, 16, 16)
    weight[0] = 0.0  # one unmerged plane
    vol.accumulate(ramp * weight, weight, decay=0.0)
    vol.sharpen(0.75, 1.0)
    torch.testing.assert_close(vol.relative[4:12], ramp[4:12])
    assert bool((vol.relative[0] == 1.0).all())  # unmerged voxels read 1, untouched
    peak = torch.ones(16, 16, 16)
    peak[8, 8, 8] = 3.0
    vol.accumulate(peak, torch.ones(16, 16, 16), decay=0.0)
    vol.sharpen(0.75, 1.0)
    assert float(vol.relative[8, 8, 8]) > 3.0 and float(vol.relative.min()) >= 0.0
    assert float(vol.relative[0, 0, 0]) == pytest.approx(1.0)


def test_distillation_is_winner_takes_all_modulo_the_in_plane_flip():
    R = quaternion_to_matrix(random_quaternions(3, torch.Generator().manual_seed(1))).float()
    other = quaternion_to_matrix(random_quaternions(3, torch.Generator().manual_seed(2))).float()
    heads = torch.stack([other, R @ RZ_PI.float()], dim=1)  # head 1 is the target, pi-rotated in-plane
    assert encoder_candidates(heads).shape == (3, 4, 3, 3)
    assert float(distillation_loss(heads, R)) == pytest.approx(0.0, abs=1e-10)
    assert float(distillation_loss(heads[:, :1], R)) > 0.1


@pytest.fixture(scope="module")
def true_volume_model(test_scale_data):
    """An xrai model whose volume is the *true* amplitude, profile from the data (prepare)."""
    from xrai.data.hdf5 import DiffractionDataset
    from xrai.recon.train import imaging_model
    from xrai.volume import read_volume_h5

    cfg = copy.deepcopy(test_scale_data["cfg"])
    recipe = XraiRecipe(cfg)
    ds = DiffractionDataset(test_scale_data["test"])
    torch.manual_seed(0)
    model = recipe.build_model(imaging_model(cfg, ds))
    recipe.prepare(model, ds, torch.device("cpu"))
    true_int, grid = read_volume_h5(str(test_scale_data["intensity"]), "intensity")
    dec = model.decoder
    assert grid.size == dec.grid.size and math.isclose(grid.q_max, dec.grid.q_max, rel_tol=1e-4)
    dec.set_intensity(true_int)
    return recipe, model, ds


def test_grid_search_and_refinement_find_the_true_poses(true_volume_model):
    """Against the true volume, a 15-degree grid search + pattern search lands within ~1 degree."""
    from xrai.evaluation.metrics import fold_in_plane
    from xrai.recon.recipe import Batch
    from xrai.rotations import angle_between

    recipe, model, ds = true_volume_model
    batch = Batch(ds.read(0, 48), torch.device("cpu"))
    z = model.normalise(batch.amplitude).reshape(len(batch), -1)
    pixels = torch.arange(z.shape[1])
    R_grid, _ = grid_search(model, quaternion_to_matrix(so3_grid(2)).float(), z, pixels)
    R = refine_poses(model, R_grid, z, pixels, (8.0, 4.0, 2.0, 1.0, 0.5, 0.25), iterations=2)
    truth = batch.rotations.double()
    err_grid = torch.rad2deg(angle_between(fold_in_plane(R_grid.double(), truth), truth))
    err = torch.rad2deg(angle_between(fold_in_plane(R.double(), truth), truth))
    assert float(err_grid.median()) < 13.0  # the grid's covering radius
    assert float(err.median()) < 1.0 and float((err < 3.0).float().mean()) > 0.9

    # a pose 6 degrees off comes back by refinement alone
    axis = torch.nn.functional.normalize(torch.randn(len(batch), 3, generator=torch.Generator().manual_seed(3)), dim=-1)
    off = axis_angle_to_matrix(axis, torch.full((len(batch),), math.radians(6.0))).float()
    R = refine_poses(model, batch.rotations @ off, z, pixels, (4.0, 2.0, 1.0, 0.5), iterations=2)
    err = torch.rad2deg(angle_between(R.double(), truth))
    assert float(err.median()) < 1.0


def _config(data: dict, path, **train) -> str:
    import yaml

    cfg = copy.deepcopy(data["cfg"])
    cfg["train"].update(copy.deepcopy(train))
    validate_config(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _train(data: dict, config: str, method: str, out) -> dict:
    from xrai.cli import main
    from xrai.evaluation.evaluate import pose_error_summary

    argv = ["train", "--config", config, "--method", method, "--run", "0", "--train-data", str(data["train"]),
            "--test-data", str(data["test"]), "--out-dir", str(out)]
    assert main(argv) == 0
    return pose_error_summary(out / "poses_test.h5", data["test"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["xrai", "xrai-paper"])
def test_ab_initio_run_beats_chance_where_the_paper_recipe_does_not(test_scale_data, tmp_path, method):
    """The issue's CI check: CI_STEPS steps at the test scale (2048 train / 512 test, 32 px, noise-free).

    ``xrai`` must reach a median test pose error below CI_MEDIAN_DEG; the paper's recipe, given
    the same steps and batches (with a tiny network, so that CI can afford it), must not.
    """
    data = test_scale_data
    extra = TINY_PAPER if method == "xrai-paper" else {}
    config = _config(data, tmp_path / "config.yaml", steps=CI_STEPS, eval_every=CI_STEPS, checkpoint_every=CI_STEPS,
                     eval_images=256, device="cpu", **extra)
    out = tmp_path / method
    summary = _train(data, config, method, out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert int(rows[-1]["step"]) == CI_STEPS
    if method == "xrai":
        assert summary["median_deg"] < CI_MEDIAN_DEG, summary
        with h5py.File(out / "poses_test.h5") as f:
            R = torch.from_numpy(f["rotations"][...]).double()
            assert f.attrs["source"] == "encoder" and R.shape == (512, 3, 3)
        torch.testing.assert_close(torch.linalg.det(R), torch.ones(len(R), dtype=torch.float64), atol=1e-5, rtol=0)
        with h5py.File(out / "intensity.h5") as f:
            amp = torch.from_numpy(f["amplitude"][...])
        assert torch.isfinite(amp).all() and float(amp.max()) > 0
    else:
        assert summary["median_deg"] > CI_MEDIAN_DEG, summary


def test_resume_is_bit_identical(test_scale_data, tmp_path):
    """xrai's state (encoder, optimizer, merged volume, RNG) survives a SIGTERM half-way, bit for bit (CPU)."""
    import os
    import signal

    from xrai.config import load_config
    from xrai.recon.train import TrainingInterrupted, train

    data = test_scale_data
    xrai = dict(data["cfg"]["train"]["xrai"], infer_refine_deg=[1.0])  # cheaper pose files: not under test here
    cfg = load_config(_config(data, tmp_path / "config.yaml", steps=12, eval_every=6, log_every=3,
                              checkpoint_every=100, eval_images=32, device="cpu", xrai=xrai))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(copy.deepcopy(cfg), "xrai", 0, data["train"], data["test"], straight)

    def kill_at_7(step: int) -> None:
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        train(copy.deepcopy(cfg), "xrai", 0, data["train"], data["test"], resumed, step_callback=kill_at_7)
    train(copy.deepcopy(cfg), "xrai", 0, data["train"], data["test"], resumed)
    a = torch.load(straight / "checkpoint.pt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 12
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert "decoder.weighted_sum" in a["model"] and float(a["model"]["decoder.weight"].sum()) > 0
    with h5py.File(straight / "poses_test.h5") as fa, h5py.File(resumed / "poses_test.h5") as fb:
        assert (fa["rotations"][...] == fb["rotations"][...]).all()


def test_known_pose_merge_is_the_default_recipes_bound(test_scale_data, tmp_path):
    """``xrai-known-pose``: every image merged once at its true pose recovers the true amplitude, whatever
    the steps covered (here a quarter of the images: the final volume merges them all).

    Against sqrt(true intensity), the shell correlation is >= 0.95 on every shell the detector
    covers in full, and the poses files hold the ground truth (no pose error is reported).
    """
    from xrai.evaluation.metrics import shell_correlation
    from xrai.volume import read_volume_h5
    from xrai.xray.geometry import Beam, Detector

    data = test_scale_data
    n = int(data["cfg"]["simulation"]["train_sizes"][0])
    steps = n // int(data["cfg"]["train"]["batch_size"]) // 4
    config = _config(data, tmp_path / "config.yaml", steps=steps, eval_every=steps, checkpoint_every=steps,
                     eval_images=64, device="cpu")
    out = tmp_path / "xrai-known-pose"
    assert _train(data, config, "xrai-known-pose", out) is None  # ground-truth poses: no pose error
    with h5py.File(out / "poses_train.h5") as f, h5py.File(data["train"]) as d:
        assert f.attrs["source"] == "ground_truth"
        R_true = quaternion_to_matrix(torch.from_numpy(d["orientations"][...]).double())
        torch.testing.assert_close(torch.from_numpy(f["rotations"][...]).double(), R_true, atol=1e-6, rtol=0)
    amp, grid = read_volume_h5(str(out / "intensity.h5"), "amplitude")
    true_amp, true_grid = read_volume_h5(str(data["intensity"]), "amplitude")
    assert grid == true_grid
    det, beam = Detector.from_config(data["cfg"]), Beam.from_config(data["cfg"])
    covered = int(float(det.pixel_position_reciprocal(beam)[det.n_pixels // 2, 0].norm()) / grid.dq)
    corr = shell_correlation(amp, true_amp, grid)["corr"]
    assert min(corr[1:covered + 1]) >= 0.95, corr[1:covered + 1]  # measured 0.959-0.98 (2048 images)
