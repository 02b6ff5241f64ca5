"""config/cryoem-test.yaml end to end: metrics, tables, figures, the report."""

from __future__ import annotations

import os
import subprocess

import pytest
from pipeline_runs import REPO, chromium, snakemake

# --------------------------------------------------------------------------- cryo-EM

CRYOEM_FIGURES = ("cryoem_images", "cryoem_fsc", "cryoem_pose_errors", "cryoem_densities")


@pytest.fixture(scope="module")
def cryoem_pipeline_dir(tmp_path_factory, pdb_mirror):
    """config/cryoem-test.yaml end to end (simulate, potential, train, evaluate, table, figures), then the report."""
    import time

    work = tmp_path_factory.mktemp("pipeline_cryoem")
    # 80 of the config's 200 steps: the whole config is ~4 min of CPU (170 s of it training), and 80
    # steps are enough for "far below chance" (test_cryoem_pipeline_poses_far_below_chance)
    override = work / "ci-override.yaml"
    override.write_text("train:\n  steps: 80\n")
    cfg = [str(REPO / "config/cryoem-test.yaml"), str(override)]
    env = {"XRAI_PDB_MIRROR": str(pdb_mirror)}
    t0 = time.perf_counter()
    res = snakemake("--cores", "2", "--configfile", *cfg, "--directory", str(work), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    rep = snakemake("--cores", "1", "--configfile", *cfg, "--directory", str(work),
                    "--report", str(work / "results/report.html"), env=env, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    print(f"cryo-EM pipeline and report: {time.perf_counter() - t0:.0f} s wall")
    return work


@pytest.mark.slow
def test_cryoem_pipeline_metrics_table_figures_and_report(cryoem_pipeline_dir):
    import json

    import matplotlib.image

    res = cryoem_pipeline_dir / "results"
    for method in ("xrai", "known-pose"):
        m = json.loads((res / f"metrics/4AKE/2048/{method}/metrics.json").read_text())
        for cutoff in ("0.5", "0.143"):
            assert 3.2 <= m["resolution"][cutoff]["A"] <= 102.4, (method, cutoff)  # Nyquist .. box
        for split in ("train", "test"):
            pose = m[f"pose_error_{split}"]
            if method == "known-pose":  # reconstructs from the true poses: nothing to score
                assert pose is None
                continue
            assert pose["median_deg"] >= 0 and pose["mae_deg"] >= pose["median_deg"] * 0.5, (method, split)
            assert pose["shift_error"]["median_A"] >= 0, (method, split)
    md = (res / "tables/cryoem_table.md").read_text()
    assert "| 4AKE 2048 | xrai (fast default) |" in md and "| 4AKE 2048 | known-pose bound |" in md
    for name in CRYOEM_FIGURES:
        img = matplotlib.image.imread(res / f"figures/4AKE/{name}.png")
        assert img.shape[0] > 300 and img.shape[1] > 300 and img.std() > 0.01, name
        assert (res / f"figures/4AKE/{name}.pdf").stat().st_size > 1000, name
    html = (res / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "cryoem_table.md" in html
    for name in CRYOEM_FIGURES:
        assert f"{name}.png" in html, name


@pytest.mark.slow
def test_cryoem_pipeline_writes_star_stacks_and_potential(cryoem_pipeline_dir):
    """The simulate and reference rules' outputs: RELION STAR files naming stacks that exist, the potential."""
    import mrcfile
    import starfile

    res = cryoem_pipeline_dir / "results"
    for name in ("train_2048", "test_512"):
        parts = starfile.read(res / "datasets" / "4AKE" / f"{name}.star")["particles"]
        assert len(parts) == int(name.split("_")[1])
        for stack in {s.split("@")[1] for s in parts["rlnImageName"]}:
            assert (res / "datasets" / "4AKE" / stack).is_file()
    with mrcfile.open(res / "reference" / "4AKE" / "potential.mrc") as mrc:
        assert mrc.data.shape == (64, 64, 64) and mrc.voxel_size.x == pytest.approx(1.6)


@pytest.mark.slow
def test_cryoem_pipeline_poses_far_below_chance(cryoem_pipeline_dir):
    """The fast default's median test pose error, against the same metric on random rotations."""
    import json

    import numpy as np
    import torch

    from xrai.data.star import ParticleDataset
    from xrai.evaluation.cryoem import pose_metrics
    from xrai.rotations import quaternion_to_matrix, random_quaternions

    res = cryoem_pipeline_dir / "results"
    m = json.loads((res / "metrics/4AKE/2048/xrai/metrics.json").read_text())
    assert m["pose_error_test"]["median_deg"] < 10.0  # measured: ~1.6
    assert m["pose_error_train"]["median_deg"] < 10.0
    assert m["pose_error_test"]["shift_error"]["median_A"] < 2.0  # shifts drawn with sigma 4 A per axis
    with ParticleDataset(res / "datasets/4AKE/test_512.star") as ds:
        R = quaternion_to_matrix(random_quaternions(len(ds), generator=torch.Generator().manual_seed(0)))
        shifts = ds.true_shifts()
        chance = pose_metrics({"rotations": R.double(), "shifts_A": shifts, "index": np.arange(len(ds))},
                              ds.true_rotations(), shifts, ds.pixel_size_A)
    assert chance["median_deg"] > 40.0
    print(f"cryo-EM fast default: median test pose error {m['pose_error_test']['median_deg']:.2f} deg "
          f"(random rotations: {chance['median_deg']:.1f}), resolution {m['resolution']['0.5']['A']:.2f} A")


@pytest.mark.slow
def test_cryoem_montage_matches_the_recorded_particles(cryoem_pipeline_dir):
    """The montage's clean images at the STAR poses are the recorded particles less noise; wrong poses are not."""
    import torch

    from xrai.data.star import ParticleDataset
    from xrai.io import read_mrc
    from xrai.report.cryoem_figures import particle_images

    res = cryoem_pipeline_dir / "results"
    ref, _ = read_mrc(res / "reference/4AKE/potential.mrc")
    with ParticleDataset(res / "datasets/4AKE/test_512.star") as ds:
        batch = ds.read(0, 16)
    _, with_ctf = particle_images(ref, batch, ds.pixel_size_A)
    wrong = dict(batch, rotations=batch["rotations"].roll(1, dims=0))
    _, with_ctf_wrong = particle_images(ref, wrong, ds.pixel_size_A)

    def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a - a.mean(dim=(1, 2), keepdim=True), b - b.mean(dim=(1, 2), keepdim=True)
        return (a * b).sum(dim=(1, 2)) / (a.norm(dim=(1, 2)) * b.norm(dim=(1, 2)))

    # at 0 dB the recorded image is signal + noise of equal variance: correlation 1/sqrt(2) = 0.71
    assert float(corr(with_ctf, batch["images"]).min()) > 0.6
    assert float(corr(with_ctf_wrong, batch["images"]).abs().median()) < 0.3


@pytest.mark.slow
def test_cryoem_report_renders_in_headless_chromium(cryoem_pipeline_dir):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed in CI (.ci/run installs it)")
        pytest.skip("chromium not installed: apt-get install chromium")
    report = cryoem_pipeline_dir / "results/report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={cryoem_pipeline_dir / 'chromium-profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Cryo-EM tables" in dom.stdout, "the rendered report does not show the cryo-EM tables category"
