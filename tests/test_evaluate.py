"""``xrai evaluate`` end to end on a synthetic reconstruction whose every answer is known."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from xrai.cli import build_parser, main
from xrai.config import REPO_ROOT
from xrai.data.hdf5 import write_dataset
from xrai.evaluation.align import transform_volume
from xrai.io import read_mrc, write_json
from xrai.rotations import (
    RZ_PI,
    angle_between,
    axis_angle_to_matrix,
    quaternion_to_matrix,
    random_quaternions,
)
from xrai.volume import read_volume_h5, write_volume_h5

TEST_CONFIG = str(REPO_ROOT / "config" / "test.yaml")
#: the global rotation between the synthetic run's frame and the truth: R_true = G @ R_pred
G = quaternion_to_matrix(random_quaternions(1, torch.Generator().manual_seed(21)))[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pdb_mirror):
    """2CEX chain A on the test-scale grid: reference density MRC and true intensity HDF5 (xrai.xray.density)."""
    from xrai.config import load_config
    from xrai.structure import fetch_structure
    from xrai.xray.density import write_reference

    d = tmp_path_factory.mktemp("reference")
    fetch_structure({"pdb": "2CEX", "chains": ["A"]}, {"mirror": str(pdb_mirror)}, d / "2CEX_A.cif", d / "2CEX_A.json")
    write_reference(load_config(TEST_CONFIG), d / "2CEX_A.cif", d / "density.mrc", d / "intensity.h5")
    return d


def _poses(path, R_true, noise_deg: float, seed: int, source: str = "encoder") -> None:
    import h5py

    n = R_true.shape[0]
    gen = torch.Generator().manual_seed(seed)
    dR = axis_angle_to_matrix(torch.randn(n, 3, generator=gen, dtype=torch.float64),
                              torch.full((n,), math.radians(noise_deg), dtype=torch.float64))
    R = G.T @ R_true @ dR
    flip = torch.rand(n, generator=gen) < 0.5
    R = torch.where(flip[:, None, None], R @ RZ_PI, R)
    with h5py.File(path, "w") as f:
        f["rotations"] = R.float().numpy()
        f["index"] = np.arange(n)
        f["branch"] = np.zeros(n, dtype=np.int8)
        f.attrs["source"] = source


@pytest.fixture(scope="module")
def run(tmp_path_factory, reference):
    """A finished synthetic reconstruction in the rotated frame G^T, phased by ``xrai phase --best``."""
    d = tmp_path_factory.mktemp("recon")
    run_dir = d / "xrai" / "run0"
    run_dir.mkdir(parents=True)
    amp, grid = read_volume_h5(str(reference / "intensity.h5"), "amplitude")
    amp_run = transform_volume(amp.double(), G.T).float()  # V_run(k) = V_true(G k)
    write_volume_h5(str(run_dir / "intensity.h5"), grid, intensity=amp_run**2, amplitude=amp_run)
    q = np.zeros((4, 4, 3), dtype=np.float32)
    for split, n, seed in (("train", 400, 1), ("test", 200, 2)):
        quats = random_quaternions(n, torch.Generator().manual_seed(seed))
        images = np.random.default_rng(seed).poisson(5.0, (n, 4, 4)).astype(np.float32)
        write_dataset(d / f"{split}.h5", images, quats.numpy(), q)
        _poses(run_dir / f"poses_{split}.h5", quaternion_to_matrix(quats), noise_deg=2.0, seed=seed + 10)
    (run_dir / "metrics.csv").write_text("step,loss,wall_s\n100,0.5,10.0\n300,0.2,31.5\n")
    bench = d / "benchmarks" / "train" / "2CEX_A" / "400" / "xrai"
    bench.mkdir(parents=True)
    (bench / "run0.tsv").write_text("s\th:m:s\tmax_rss\n42.25\t0:00:42\t100.0\n")
    write_json(d / "xrai" / "best.json", {"run": 0, "run_dir": str(run_dir)})
    phased = d / "phased" / "density.mrc"
    assert main(["phase", "--config", TEST_CONFIG, "--best", str(d / "xrai" / "best.json"), "--out", str(phased),
                 "--history", str(phased.parent / "phasing.json")]) == 0
    return d


def _evaluate(reference, run, method: str, out) -> int:
    return main(["evaluate", "--config", TEST_CONFIG, "--protein", "2CEX_A", "--size", "400", "--method", method,
                 "--density", str(run / "phased" / "density.mrc"), "--best", str(run / "xrai" / "best.json"),
                 "--reference", str(reference / "density.mrc"),
                 "--reference-intensity", str(reference / "intensity.h5"),
                 "--train-data", str(run / "train.h5"), "--test-data", str(run / "test.h5"),
                 "--benchmarks", str(run / "benchmarks"), "--out", str(out)])


def test_evaluate_writes_known_metrics(reference, run, tmp_path):
    out = tmp_path / "metrics.json"
    assert _evaluate(reference, run, "xrai", out) == 0
    m = json.loads(out.read_text())
    for key in ("protein", "size", "method", "run", "resolution_px", "resolution_A", "fsc_cutoff", "fsc",
                "amplitude_correlation", "alignment", "pose_error_train", "pose_error_test", "time_s", "provenance"):
        assert key in m
    assert (m["protein"], m["size"], m["method"], m["run"]) == ("2CEX_A", 400, "xrai", 0)
    # the density was phased in the rotated frame: the alignment finds G back
    assert math.degrees(float(angle_between(torch.tensor(m["alignment"]["rotation"], dtype=torch.float64), G))) < 2.0
    assert m["alignment"]["cc"] > 0.85
    assert 2.0 <= m["resolution_px"] < 4.0
    assert m["resolution_A"] == pytest.approx(m["resolution_px"] * m["voxel_size_A"])
    assert set(m["fsc"]) == {"shell", "freq_A_inv", "fsc"} and len(m["fsc"]["fsc"]) == 17
    # the amplitudes, rotated back by the same rotation, match the truth (up to double interpolation)
    assert m["amplitude_correlation"]["mean"] > 0.9
    # pose errors: 2 degree perturbations behind a global rotation and in-plane pi flips
    for split in ("train", "test"):
        pe = m[f"pose_error_{split}"]
        assert abs(pe["median_deg"] - 2.0) < 0.15 and pe["frac_within_5"] == 1.0
        assert math.degrees(float(angle_between(torch.tensor(pe["global_rotation"], dtype=torch.float64), G))) < 0.5
        assert pe["frobenius_sq_median"] == pytest.approx(4 * (1 - math.cos(math.radians(2.0))), rel=0.1)
    t = m["time_s"]
    assert t["train"] == 42.25 and t["train_log_wall"] == 31.5
    assert t["phase"] is not None and t["total"] == pytest.approx(t["train"] + t["phase"])
    assert (out.parent / "provenance.json").exists()
    # the aligned density beside metrics.json is the one the FSC was computed on (the figures show it)
    from xrai.evaluation.metrics import fsc

    aligned, voxel = read_mrc(out.parent / "aligned_density.mrc")
    ref, _ = read_mrc(reference / "density.mrc")
    np.testing.assert_allclose(fsc(aligned, ref, voxel)["fsc"], m["fsc"]["fsc"], atol=1e-5)


def test_known_pose_has_no_pose_error(reference, run, tmp_path):
    """Poses files that hold the ground truth (a known-pose bound) give no pose error, whatever the method."""
    import shutil

    import h5py

    known = tmp_path / "known"
    shutil.copytree(run, known)
    best = json.loads((known / "xrai" / "best.json").read_text())
    best["run_dir"] = str(known / "xrai" / "run0")
    (known / "xrai" / "best.json").write_text(json.dumps(best))
    for split in ("train", "test"):
        with h5py.File(known / "xrai" / "run0" / f"poses_{split}.h5", "a") as f:
            f.attrs["source"] = "ground_truth"
    out = tmp_path / "metrics.json"
    assert _evaluate(reference, known, "xrai-known-pose", out) == 0
    m = json.loads(out.read_text())
    assert m["pose_error_train"] is None and m["pose_error_test"] is None
    assert m["time_s"]["train"] == 31.5  # no benchmark file for this method: the training log's clock


def test_cli_matches_the_snakemake_script():
    script = (REPO_ROOT / "scripts" / "evaluate.py").read_text()
    flags = re.findall(r'"(--[a-z-]+)"', script)
    assert len(flags) == 11
    args = build_parser("evaluate").parse_args(["evaluate", *[x for f in flags for x in (f, "v")]])
    assert args.reference_intensity == "v" and args.benchmarks == "v" and args.out == "v"


def test_missing_reference_is_a_user_error(run, tmp_path):
    assert _evaluate(tmp_path, run, "xrai", tmp_path / "m.json") == 2
