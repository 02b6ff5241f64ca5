"""The whole pipeline through Snakemake, as a user runs it: dry-runs, lint, and the test scale end to end."""

from __future__ import annotations

import os
import subprocess

import pytest
from pipeline_runs import REPO, chromium, job_counts, snakemake


@pytest.mark.parametrize("configfile", [None, "config/cryoem-test.yaml"])
def test_lint_is_clean(configfile):
    res = snakemake("--lint", *(["--configfile", str(REPO / configfile)] if configfile else []))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations" in res.stdout + res.stderr


def test_dry_run_paper_config_lists_every_job(tmp_path):
    res = snakemake("-n", "--directory", str(tmp_path))
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    # 2 proteins x (3 train sets + 1 test set); 2 x 3 x (5 X-RAI runs + 2 known-pose bounds)
    assert counts["simulate"] == 8
    assert counts["train"] == 42
    assert counts["evaluate"] == counts["phase"] == 18
    assert counts["table"] == 1
    for n in (50000, 500000, 5000000):
        assert f"results/datasets/2CEX_A/train_{n}.h5" in res.stdout
        assert f"results/datasets/1O9K/train_{n}.h5" in res.stdout
    assert "results/datasets/2CEX_A/test_10000.h5" in res.stdout


def test_dry_run_cryoposenet_table_evaluates_every_method(tmp_path):
    """cryoPoseNet's Table 1 with every cryo-EM method: each one is trained and evaluated on each dataset."""
    import yaml

    cfg = yaml.safe_load((REPO / "config/cryoposenet.yaml").read_text())
    methods = ["xrai", "known-pose", "cryoai", "cryoposenet"]
    cfg["train"]["methods"] = [{"name": m} for m in methods]
    path = tmp_path / "table1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--directory", str(tmp_path), "--configfile", str(path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    counts = job_counts(res.stdout)
    datasets = len(cfg["proteins"])
    assert counts["train_cryoem"] == counts["evaluate_cryoem"] == datasets * len(methods)
    for m in methods:
        assert f"results/metrics/4AKE_G/9000/{m}/metrics.json" in res.stdout


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, pdb_mirror):
    """Run the whole pipeline at the test scale once, then build the HTML report."""
    work = tmp_path_factory.mktemp("pipeline")
    env = {"XRAI_PDB_MIRROR": str(pdb_mirror)}
    res = snakemake("--cores", "2", "--configfile", str(REPO / "config/test.yaml"), "--directory", str(work),
                    env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    rep = snakemake("--cores", "1", "--configfile", str(REPO / "config/test.yaml"), "--directory", str(work),
                    "--report", str(work / "results/report.html"), env=env, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    return work


@pytest.mark.slow
def test_pipeline_produces_table_figures_and_report(pipeline_dir):
    import matplotlib.image

    res = pipeline_dir / "results"
    md = (res / "tables/table1.md").read_text()
    assert "2CEX_A (Train: 2048)" in md
    assert "| X-RAI |" in md and "Known poses, FourierNet (bound)" in md and "Known poses, merged volume (bound)" in md
    assert (res / "tables/table1.csv").read_text().count("\n") == 4  # header + 3 methods
    assert r"\begin{tabular}" in (res / "tables/table1.tex").read_text()
    for method in ("xrai", "known-pose", "xrai-known-pose"):  # the density figure shows these aligned maps
        assert (res / f"metrics/2CEX_A/2048/{method}/aligned_density.mrc").stat().st_size > 1000, method
    for name in ("densities", "fsc", "training_curves", "pose_errors"):
        img = matplotlib.image.imread(res / f"figures/2CEX_A/{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01, name
        assert (res / f"figures/2CEX_A/{name}.pdf").stat().st_size > 1000
    assert matplotlib.image.imread(res / "figures/2CEX_A/2048/images.png").std() > 0.01
    html = (res / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "table1.md" in html and "densities.png" in html


@pytest.mark.slow
def test_second_run_has_nothing_to_do(pipeline_dir, pdb_mirror):
    res = snakemake("-n", "--configfile", str(REPO / "config/test.yaml"), "--directory", str(pipeline_dir),
                    env={"XRAI_PDB_MIRROR": str(pdb_mirror)})
    assert res.returncode == 0
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
def test_report_renders_in_headless_chromium(pipeline_dir):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed in CI (.ci/run installs it)")
        pytest.skip("chromium not installed: apt-get install chromium")
    report = pipeline_dir / "results/report.html"
    artifacts = REPO / ".test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={pipeline_dir / 'chromium-profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Table 1" in dom.stdout, "the rendered report does not show the Table 1 category"
    subprocess.run([browser, *flags, "--window-size=1400,1000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=180, check=True)
    assert shot.stat().st_size > 10_000
