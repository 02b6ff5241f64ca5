"""Phasing known answers: the exact amplitudes of 2CEX_A at the test scale phase back to its reference density."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xrai.cli import main
from xrai.config import REPO_ROOT
from xrai.evaluation.align import align_volumes
from xrai.evaluation.metrics import fsc
from xrai.io import read_mrc, write_json
from xrai.volume import read_volume_h5, write_volume_h5
from xrai.xray.phasing import measured_mask, phase_er_hio

TEST_CONFIG = str(REPO_ROOT / "config" / "test.yaml")


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


def _fsc_after_alignment(density: np.ndarray, ref: np.ndarray, voxel: float) -> np.ndarray:
    al = align_volumes(density, ref)
    return np.array(fsc(al.aligned, ref, voxel)["fsc"])


def test_phasing_exact_amplitudes_recovers_the_reference(reference, tmp_path):
    out, history = tmp_path / "phased" / "density.mrc", tmp_path / "phased" / "phasing.json"
    code = main(["phase", "--config", TEST_CONFIG, "--volume", str(reference / "intensity.h5"),
                 "--dataset", "intensity", "--out", str(out), "--history", str(history)])
    assert code == 0
    density, voxel = read_mrc(out)
    ref, ref_voxel = read_mrc(reference / "density.mrc")
    assert voxel == pytest.approx(ref_voxel, rel=1e-5) and density.shape == ref.shape
    curve = _fsc_after_alignment(density, ref, ref_voxel)
    n = ref.shape[0]
    # FSC >= 0.9 in every shell up to 0.8 of Nyquist (shell n / 2)
    assert curve[1 : int(0.8 * n / 2) + 1].min() >= 0.9, np.round(curve, 3)
    h = json.loads(history.read_text())
    assert len(h["error_history"]) == h["settings"]["n_starts"] == 2
    assert len(h["error_history"][0]) == h["settings"]["n_iterations"]
    assert h["final_errors"][h["best_start"]] == min(h["final_errors"]) < 0.05
    assert (out.parent / "provenance.json").exists() and (out.parent / "config.yaml").exists()
    # centred by centre of mass on voxel n // 2
    ax = np.arange(n) - n // 2
    com = [(density.clip(0) * g).sum() / density.clip(0).sum() for g in np.meshgrid(ax, ax, ax, indexing="ij")]
    assert np.abs(com).max() <= 0.5 + 1e-6


def test_missing_low_q_centre_floats(reference):
    """Unmeasured voxels (a beam-stop hole of radius 2 voxels, NaN amplitudes) are left free and recovered."""
    intensity, grid = read_volume_h5(str(reference / "intensity.h5"), "intensity")
    amp = intensity.sqrt()
    hole = grid.coordinates().norm(dim=-1) < 2 * grid.dq
    amp_nan = torch.where(hole, torch.full_like(amp, float("nan")), amp)
    res = phase_er_hio(amp_nan, n_starts=2, n_iterations=300, mask=measured_mask(grid), seed=1)
    assert res.density.shape == amp.shape and bool((res.density >= 0).all())
    ref, voxel = read_mrc(reference / "density.mrc")
    curve = _fsc_after_alignment(res.density.numpy(), ref, voxel)
    assert curve[1:13].min() >= 0.8, np.round(curve, 3)
    # the free low-q amplitudes were recovered, not left at zero
    F = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(res.density.double()))).abs()
    scale = (F[~hole] * amp[~hole]).sum() / (F[~hole] ** 2).sum()
    rel = ((scale * F[hole] - amp[hole]).norm() / amp[hole].norm()).item()
    assert rel < 0.2


def test_phase_from_best_json_and_errors(reference, tmp_path):
    run_dir = tmp_path / "run0"
    amp, grid = read_volume_h5(str(reference / "intensity.h5"), "amplitude")
    write_volume_h5(str(run_dir / "intensity.h5"), grid, intensity=amp**2, amplitude=amp)
    write_json(tmp_path / "best.json", {"run": 0, "run_dir": str(run_dir)})
    out = tmp_path / "density.mrc"
    assert main(["phase", "--config", TEST_CONFIG, "--best", str(tmp_path / "best.json"), "--out", str(out),
                 "--history", str(tmp_path / "h.json"), "--n-iterations", "40", "--n-starts", "1"]) == 0
    assert read_mrc(out)[1] == pytest.approx(grid.voxel_size, rel=1e-5)
    # user errors: one line, exit code 2
    write_json(tmp_path / "bad.json", {"run": 0})
    assert main(["phase", "--config", TEST_CONFIG, "--best", str(tmp_path / "bad.json"), "--out", str(out),
                 "--history", str(tmp_path / "h.json")]) == 2
    assert main(["phase", "--config", TEST_CONFIG, "--volume", str(tmp_path / "missing.h5"), "--out", str(out),
                 "--history", str(tmp_path / "h.json")]) == 2
    with pytest.raises(ValueError):
        phase_er_hio(torch.zeros(8, 8, 8), n_starts=1, n_iterations=2)
