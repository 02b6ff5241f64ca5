"""EMC baseline: interpolation adjoint, pose recovery with the true model, ab-initio convergence, monotone likelihood, CLI."""

from __future__ import annotations

import copy
import csv
import os
import signal
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from xrai.cli import main
from xrai.data.hdf5 import DiffractionDataset
from xrai.evaluation.metrics import pose_errors_deg, shell_correlation, summarize_pose_errors
from xrai.recon.emc import EMCSettings, ExpandMaximizeCompress, friedel_symmetrize
from xrai.recon.train import TrainingInterrupted
from xrai.rotations import quaternion_to_matrix, random_quaternions
from xrai.so3grid import nominal_spacing_deg, so3_grid
from xrai.volume import ReciprocalGrid, insert_trilinear, read_volume_h5, sample_volume
from xrai.xray.geometry import Beam, Detector, reciprocal_grid
from xrai.xray.imaging import detector_pixel_factor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def test_scale(tmp_path_factory, pdb_mirror):
    """2CEX chain A at the test scale (32 px, 2048 train / 512 test images, noise-free) and its true intensity."""
    from xrai.config import load_config
    from xrai.structure import fetch_structure
    from xrai.xray.density import write_reference
    from xrai.xray.simulate import simulate_dataset

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = load_config(REPO / "config" / "test.yaml")
    d = tmp_path_factory.mktemp("emc")
    cif = d / "2CEX_A.cif"
    fetch_structure({"pdb": "2CEX", "chains": ["A"]}, {"mirror": str(pdb_mirror)}, cif, d / "2CEX_A.json")
    simulate_dataset(cfg, cif, "train", 2048, d / "train.h5")
    simulate_dataset(cfg, cif, "test", 512, d / "test.h5")
    write_reference(cfg, cif, None, d / "intensity.h5")
    return {"cfg": cfg, "dir": d, "train": d / "train.h5", "test": d / "test.h5", "intensity": d / "intensity.h5"}


class _Head:
    """The first ``n`` images of a dataset (what EMC reads: ``len``, ``read``, ``pixel_position_reciprocal``)."""

    def __init__(self, ds: DiffractionDataset, n: int) -> None:
        self.ds, self.n, self.pixel_position_reciprocal = ds, n, ds.pixel_position_reciprocal

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> dict:
        return self.ds.read(start, min(stop, self.n))


def _emc(cfg: dict, ds: DiffractionDataset | _Head, **kwargs) -> ExpandMaximizeCompress:
    c = detector_pixel_factor(cfg, ds.pixel_position_reciprocal).double() ** 2
    return ExpandMaximizeCompress(reciprocal_grid(cfg), ds.pixel_position_reciprocal, c, **kwargs)


def _true_model(cfg: dict, path: Path) -> torch.Tensor:
    """The true |F|^2 on the reconstruction grid, in the data's units (photons per unit pixel factor)."""
    intensity, _ = read_volume_h5(str(path))
    unit = float(Detector.from_config(cfg).linear_correction(Beam.from_config(cfg)).mean())
    return intensity * unit


# --------------------------------------------------------------------------- building blocks


def test_insert_trilinear_is_the_adjoint_of_sample_volume():
    gen = torch.Generator().manual_seed(0)
    grid = ReciprocalGrid(16, 0.1)
    vol = torch.rand(16, 16, 16, generator=gen, dtype=torch.float64)
    # 400 points inside the grid (voxels -8 .. 7 per axis), 100 far outside, 100 straddling the edge
    inside = (torch.rand(400, 3, generator=gen, dtype=torch.float64) * 15 - 8) * grid.dq
    outside = (torch.rand(100, 3, generator=gen, dtype=torch.float64) + 9) * grid.dq
    edge = torch.cat([torch.rand(100, 2, generator=gen, dtype=torch.float64) * 10 - 5,
                      7 + torch.rand(100, 1, generator=gen, dtype=torch.float64)], dim=1) * grid.dq
    k = torch.cat([inside, outside, edge])
    y = torch.randn(600, generator=gen, dtype=torch.float64)
    num, den = torch.zeros_like(vol), torch.zeros_like(vol)
    insert_trilinear(num, den, k, y, grid)
    assert torch.allclose((sample_volume(vol, k, grid) * y).sum(), (vol * num).sum(), rtol=1e-10)
    # weights: a point inside spreads exactly 1, outside 0, across the edge 1 - (its distance past voxel 7)
    partial = (8 - k[500:, 2] / grid.dq).sum()
    assert float(den.sum()) == pytest.approx(400 + float(partial), rel=1e-9)


def test_expand_and_merge_match_sample_volume_and_insert_trilinear():
    gen = torch.Generator().manual_seed(1)
    grid = ReciprocalGrid(24, 0.12)
    q = (torch.rand(12, 12, 3, generator=gen) - 0.5) * 0.16
    emc = ExpandMaximizeCompress(grid, q, None)
    R = quaternion_to_matrix(random_quaternions(40, gen)).float()
    vol = torch.rand(24, 24, 24, generator=gen)
    k = torch.einsum("mab,pb->mpa", R, q.reshape(-1, 3))
    torch.testing.assert_close(emc.expand(vol, R), sample_volume(vol, k, grid), atol=1e-5, rtol=1e-5)
    y, w = torch.rand(40, 144, generator=gen), torch.rand(40, 1, generator=gen)
    num, den = emc.merge(R, y, w)
    ref_num, ref_den = torch.zeros_like(vol), torch.zeros_like(vol)
    insert_trilinear(ref_num, ref_den, k, y, grid, weights=w)
    torch.testing.assert_close(num, ref_num, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(den, ref_den, atol=1e-4, rtol=1e-5)


def test_friedel_symmetrize_makes_samples_at_q_and_minus_q_equal():
    grid = ReciprocalGrid(16, 0.1)
    vol = friedel_symmetrize(torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    k = (torch.rand(200, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.5) * 0.15
    torch.testing.assert_close(sample_volume(vol, k, grid), sample_volume(vol, -k, grid))


def test_settings_schedule_and_errors():
    s = EMCSettings(levels=[1, 2, 3], level_iterations=[2, 3], beta_start=0.25, beta_factor=2.0, beta_every=2)
    assert [s.level_at(i) for i in range(7)] == [1, 1, 2, 2, 2, 3, 3]
    assert [s.beta_at(i) for i in range(6)] == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    from xrai.errors import XraiError

    with pytest.raises(XraiError, match="emc.level_iterations"):
        EMCSettings(levels=[1, 2], level_iterations=[])
    with pytest.raises(XraiError, match="emc.beta"):
        EMCSettings(beta_start="slow")
    # 'auto' on noise-free data: the Gaussian start; a number is kept as it is
    assert EMCSettings().with_beta_start("gaussian", None).beta_start == 0.05
    assert s.with_beta_start("poisson", None) is s


# --------------------------------------------------------------------------- with simulated data


@pytest.mark.parametrize(("likelihood", "level"), [("gaussian", 3), ("poisson", 2)])
def test_true_model_recovers_test_poses_within_the_grid_resolution(test_scale, likelihood, level):
    """With the true intensity as the model, matching gives each test image a grid point within the spacing."""
    cfg = test_scale["cfg"]
    ds = DiffractionDataset(test_scale["test"])
    # Poisson reads the recorded counts (never divided by the simulator's scale): a fluence per image
    emc = _emc(cfg, ds, likelihood=likelihood, per_image_scale=likelihood == "poisson")
    if likelihood == "gaussian":
        emc.initialize(ds, torch.Generator().manual_seed(0))  # the shell variances of a flat model
    emc.volume = _true_model(cfg, test_scale["intensity"]).float()
    n = 256
    _, R = emc.most_likely_poses(ds, level, stop=n)
    R_true = quaternion_to_matrix(ds.read(0, n)["orientations"].double())
    err, A = pose_errors_deg(R, R_true)
    spacing = nominal_spacing_deg(level)
    summary = summarize_pose_errors(err)
    # an exact nearest-grid-point search gives a median of 0.49 x spacing (xrai.so3grid); the model is trilinear
    assert summary["median_deg"] < 0.6 * spacing
    assert float((err <= spacing).double().mean()) >= 0.95
    # no global rotation is needed: the model is in the molecule's frame
    assert float(torch.linalg.matrix_norm(A - torch.eye(3, dtype=A.dtype))) < 0.02


def test_poisson_photon_data_selects_the_poisson_likelihood_and_matches(test_scale, tmp_path):
    """Photon-counting data (simulation.poisson_noise): 'auto' picks Poisson, and the true model finds the poses."""
    from xrai.recon.emc import resolve_likelihood
    from xrai.xray.simulate import simulate_dataset

    cfg = copy.deepcopy(test_scale["cfg"])
    cfg["simulation"]["poisson_noise"] = True
    simulate_dataset(cfg, test_scale["dir"] / "2CEX_A.cif", "test", 256, tmp_path / "poisson.h5")
    ds = DiffractionDataset(tmp_path / "poisson.h5")
    assert resolve_likelihood("auto", ds) == "poisson"
    assert resolve_likelihood("auto", DiffractionDataset(test_scale["test"])) == "gaussian"
    # the raw counts (never divided by the simulator's scale): the fluence is fitted per image
    # 'auto' annealing starts the Poisson posterior at 100 photons' worth of a pattern
    with h5py.File(tmp_path / "poisson.h5", "r") as f:
        photons = float(f["images"][...].sum(axis=(1, 2)).mean())
    assert EMCSettings().with_beta_start("poisson", ds).beta_start == pytest.approx(100 / photons, rel=1e-6)
    assert EMCSettings(beta_max=1e-4).with_beta_start("poisson", ds).beta_start == 1e-4
    emc = _emc(cfg, ds, likelihood="poisson", per_image_scale=True)
    emc.volume = _true_model(cfg, test_scale["intensity"]).float()
    _, R = emc.most_likely_poses(ds, 2)
    err, _ = pose_errors_deg(R, quaternion_to_matrix(ds.read(0, 256)["orientations"].double()))
    assert summarize_pose_errors(err)["median_deg"] < 0.6 * nominal_spacing_deg(2)


def _aligned_amplitude_correlation(volume: torch.Tensor, truth: torch.Tensor, A: torch.Tensor,
                                   grid: ReciprocalGrid) -> list[float]:
    """Per-shell correlation of sqrt(model) with sqrt(truth) seen in the model's frame: I_true(A k)."""
    coords = grid.coordinates()
    aligned = sample_volume(truth.double(), coords.reshape(-1, 3) @ A.double().T, grid).reshape(truth.shape)
    return shell_correlation(volume.double().clamp_min(0).sqrt(), aligned.clamp_min(0).sqrt(), grid)["corr"]


def test_random_start_converges_to_the_true_intensity(test_scale):
    """Ab initio on the test-scale dataset: poses at the grid's resolution, amplitude correlation >= 0.9."""
    cfg = test_scale["cfg"]
    ds = DiffractionDataset(test_scale["train"])
    emc = _emc(cfg, ds, likelihood="gaussian")
    emc.initialize(ds, torch.Generator().manual_seed(0))
    # config/test.yaml's schedule: deterministic annealing on the coarse grid, then the finer grid
    schedule = [(1, min(1.0, 0.05 * 1.4**i)) for i in range(12)] + [(2, 1.0)] * 3
    for level, beta in schedule:
        result = emc.iterate(ds, level, beta)
    R_true = quaternion_to_matrix(ds.read(0, len(ds))["orientations"].double())
    err, A = pose_errors_deg(quaternion_to_matrix(so3_grid(2)[result.best]), R_true)
    assert summarize_pose_errors(err)["median_deg"] < 0.6 * nominal_spacing_deg(2)
    grid = reciprocal_grid(cfg)
    corr = _aligned_amplitude_correlation(emc.volume, _true_model(cfg, test_scale["intensity"]), A, grid)
    # shells 1 .. size/2 - 2: inside the detector corner's |q| (shell size/2 - 1) with full voxel shells
    detector_shells = corr[1:grid.size // 2 - 1]
    assert sum(detector_shells) / len(detector_shells) >= 0.9
    assert min(detector_shells) >= 0.75


@pytest.mark.parametrize(("likelihood", "scale", "beta"), [("gaussian", False, 1.0), ("gaussian", True, 0.5),
                                                           ("poisson", True, 1.0)])
def test_objective_never_decreases_at_fixed_beta(test_scale, likelihood, scale, beta):
    """At beta = 1 the objective is the log-likelihood; below 1 the tempered free energy (both EM-monotone)."""
    ds = _Head(DiffractionDataset(test_scale["train"]), 1024)
    emc = _emc(test_scale["cfg"], ds, likelihood=likelihood, per_image_scale=scale)
    emc.initialize(ds, torch.Generator().manual_seed(1))
    values = [emc.iterate(ds, 1, beta).objective for _ in range(4)]
    for before, after in zip(values, values[1:], strict=False):
        assert after >= before - 1e-6 * abs(before), values
    assert values[-1] > values[0]


# --------------------------------------------------------------------------- the command line


def _config_file(test_scale, tmp_path: Path, **emc) -> Path:
    cfg = copy.deepcopy(test_scale["cfg"])
    cfg["emc"].update(levels=[0], level_iterations=[], **emc)  # 72 orientations: the plumbing, fast
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cli(config: Path, test_scale, out: Path) -> int:
    return main(["emc", "--config", str(config), "--run", "0", "--train-data", str(test_scale["train"]),
                 "--test-data", str(test_scale["test"]), "--out-dir", str(out)])


def test_cli_writes_the_outputs_of_train_and_resumes(test_scale, tmp_path):
    out = tmp_path / "run0"
    assert _cli(_config_file(test_scale, tmp_path, n_iterations=1), test_scale, out) == 0
    for name in ("intensity.h5", "amplitude.mrc", "poses_train.h5", "poses_test.h5", "metrics.csv",
                 "checkpoint.pt", "config.yaml", "provenance.json"):
        assert (out / name).exists(), name
    with h5py.File(out / "poses_test.h5") as f:
        assert f["rotations"].shape == (512, 3, 3) and f["branch"].shape == (512,) and f["index"][-1] == 511
        assert f.attrs["dataset"] == str(test_scale["test"].resolve())
    with h5py.File(out / "poses_train.h5") as f:
        R = torch.from_numpy(f["rotations"][...]).double()
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-5, rtol=0)
    grid = reciprocal_grid(test_scale["cfg"])
    amplitude, g = read_volume_h5(str(out / "intensity.h5"), "amplitude")
    assert g == grid and float(amplitude.max()) > 0
    rows_1 = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows_1] == ["1"] and float(rows_1[0]["test_pose_median_deg"]) > 0

    # more iterations: resumes from the checkpoint after iteration 1 and matches a fresh 2-iteration run
    assert _cli(_config_file(test_scale, tmp_path, n_iterations=2), test_scale, out) == 0
    rows_2 = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows_2] == ["1", "2"]
    assert rows_2[0]["log_likelihood"] == rows_1[0]["log_likelihood"]
    fresh = tmp_path / "fresh"
    assert _cli(_config_file(test_scale, tmp_path, n_iterations=2), test_scale, fresh) == 0
    torch.testing.assert_close(read_volume_h5(str(fresh / "intensity.h5"))[0], read_volume_h5(str(out / "intensity.h5"))[0])

    # a changed algorithm setting: the checkpoint is set aside with one line saying why
    assert _cli(_config_file(test_scale, tmp_path, n_iterations=1, per_image_scale=True), test_scale, out) == 0
    rows_3 = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows_3] == ["1"] and rows_3[0]["log_likelihood"] != rows_1[0]["log_likelihood"]


def test_sigterm_checkpoints_and_the_rerun_resumes(test_scale, tmp_path):
    from xrai.recon.emc import run_emc

    cfg = copy.deepcopy(test_scale["cfg"])
    cfg["emc"].update(levels=[0], level_iterations=[], n_iterations=2)
    out = tmp_path / "run0"
    with pytest.raises(TrainingInterrupted) as info:
        run_emc(cfg, 0, test_scale["train"], test_scale["test"], out,
                iteration_callback=lambda it: os.kill(os.getpid(), signal.SIGTERM))
    assert info.value.code == 128 + signal.SIGTERM
    assert (out / "checkpoint.pt").exists() and not (out / "intensity.h5").exists()
    run_emc(cfg, 0, test_scale["train"], test_scale["test"], out)
    assert [r["step"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["1", "2"]
