"""Config edits re-run exactly the steps they change, with the real Snakemake (issue 18).

A finished pipeline is stood in for by empty outputs that ``snakemake --touch`` records as
made by the current config (metadata with the rules' params, as a real run leaves it).
Each test edits one kind of key and reads ``snakemake --summary``'s plan of every output.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
METHODS = ("xrai", "known-pose", "xrai-known-pose", "emc")
DOWNSTREAM_OF_RUNS = {"select_best", "phase", "evaluate"}
REPORT = {"table", "figures_protein", "figures_images"}


def _snakemake(workdir: Path, *args: str) -> str:
    env = {**os.environ, "XRAI_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the workflow puts its own src/ first
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
         "--configfile", str(workdir / "config.yaml"), *args],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _summary(workdir: Path) -> dict[str, tuple[str, str]]:
    """``{output file: (rule, plan)}`` from ``snakemake --summary``."""
    rows = [line.split("\t") for line in _snakemake(workdir, "--summary").splitlines()[1:] if "\t" in line]
    return {r[0]: (r[2], r[5]) for r in rows}


def _job(path: str, rule: str) -> str:
    """A job's name for the assertions: the rule, with the method for per-method outputs."""
    parts = Path(path).parts
    if parts[1] in ("reconstructions", "phased", "metrics") and len(parts) > 4 and parts[4] in METHODS:
        return f"{rule}/{parts[4]}"
    return rule


def _finished_workdir(workdir: Path, base: dict, rules: set[str]) -> tuple[Path, dict]:
    """``workdir`` with every output of config ``base`` made (empty) and recorded as up to date; ``rules`` must be
    among the jobs."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    outputs = _summary(workdir)
    assert {rule for rule, _ in outputs.values()} >= rules
    for f in outputs:
        (workdir / f).parent.mkdir(parents=True, exist_ok=True)
        (workdir / f).touch()
    _snakemake(workdir, "--touch", "--forceall", "--cores", "1", "--quiet")
    assert all(plan == "no update" for _, plan in _summary(workdir).values())
    return workdir, base


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A work directory whose every output is up to date for config/test.yaml (+ the emc baseline)."""
    base = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    base["train"]["methods"].append({"name": "emc", "runs": 1})
    return _finished_workdir(tmp_path_factory.mktemp("finished"), base,
                             {"fetch_pdb", "simulate", "train", "emc", "table"})


def _rerun_after(finished, edit) -> set[str]:
    """Jobs whose outputs Snakemake would remake after ``edit(config)``; the config is restored after."""
    workdir, base = finished
    cfg = copy.deepcopy(base)
    edit(cfg)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        return {_job(f, rule) for f, (rule, plan) in _summary(workdir).items() if plan != "no update"}
    finally:
        (workdir / "config.yaml").write_text(yaml.safe_dump(base, sort_keys=False))


def _chain(*methods: str) -> set[str]:
    """Training of ``methods`` and everything after it."""
    jobs = {("emc" if m == "emc" else "train") + f"/{m}" for m in methods}
    return jobs | {f"{rule}/{m}" for rule in DOWNSTREAM_OF_RUNS for m in methods} | REPORT


def test_detector_edit_reruns_simulation_and_everything_after(finished):
    def edit(cfg):
        cfg["detector"]["n_pixels"] = 24

    assert _rerun_after(finished, edit) == {"simulate", "reference"} | _chain(*METHODS)


def test_simulation_edit_reruns_datasets_not_structure_or_reference(finished):
    def edit(cfg):
        cfg["simulation"]["min_total_intensity"] = 30000

    assert _rerun_after(finished, edit) == {"simulate"} | _chain(*METHODS)


def test_train_steps_rerun_training_of_methods_without_their_own_steps_threads_nothing(finished):
    def edit(cfg):
        cfg["train"]["steps"] = 400

    # xrai-known-pose sets its own steps (32) and emc does not train by steps
    assert _rerun_after(finished, edit) == _chain("xrai", "known-pose")

    def how_it_runs(cfg):  # keys that say how training runs, not what it computes
        cfg["train"]["num_threads"] = 1
        cfg["train"]["checkpoint_every"] = 50
        cfg["resources"]["train"]["mem_mb"] = 8000

    assert _rerun_after(finished, how_it_runs) == set()


def test_a_proteins_train_override_reruns_only_its_training(finished):
    def edit(cfg):
        cfg["proteins"] = [{"name": "2CEX_A", "pdb": "2CEX", "chains": ["A"], "train": {"steps": 400}}]

    # as train.steps for this protein: neither its structure nor its datasets change
    assert _rerun_after(finished, edit) == _chain("xrai", "known-pose")


def test_a_proteins_photon_statistics_rerun_its_datasets_not_its_structure(finished):
    def edit(cfg):
        cfg["proteins"] = [{"name": "2CEX_A", "pdb": "2CEX", "chains": ["A"],
                            "simulation": {"min_total_intensity": 2000}}]

    # as simulation.min_total_intensity for this protein, and the photon-curve figure appears
    assert _rerun_after(finished, edit) == {"simulate", "photon_curve"} | _chain(*METHODS)


def test_one_methods_override_reruns_only_that_method(finished):
    def edit(cfg):
        next(m for m in cfg["train"]["methods"] if m["name"] == "known-pose")["lr"] = 1e-3

    assert _rerun_after(finished, edit) == _chain("known-pose")


def test_emc_edit_reruns_only_emc(finished):
    def edit(cfg):
        cfg["emc"]["n_iterations"] = 10

    assert _rerun_after(finished, edit) == _chain("emc")


def test_phasing_edit_reruns_phasing_and_after(finished):
    def edit(cfg):
        cfg["phasing"]["n_iterations"] = 200

    assert _rerun_after(finished, edit) == {f"{r}/{m}" for r in ("phase", "evaluate") for m in METHODS} | REPORT


def test_evaluation_edit_reruns_evaluation_and_report(finished):
    def edit(cfg):
        cfg["evaluation"]["fsc_cutoff"] = 0.143

    assert _rerun_after(finished, edit) == {f"evaluate/{m}" for m in METHODS} | REPORT


@pytest.fixture(scope="module")
def finished_cryoem(tmp_path_factory):
    """A work directory whose every output is up to date for config/cryoem-test.yaml (with the default)."""
    base = yaml.safe_load((REPO / "config" / "cryoem-test.yaml").read_text())
    base.setdefault("train", {})["methods"] = [{"name": "xrai"}]
    return _finished_workdir(tmp_path_factory.mktemp("finished_cryoem"), base,
                             {"fetch_pdb", "simulate_cryoem", "potential", "train_cryoem"})


def test_a_cryoem_proteins_imaging_override_reruns_its_particles_not_its_structure_or_potential(finished_cryoem):
    def edit(cfg):
        cfg["proteins"] = [{"name": "4AKE", "pdb": "4AKE", "cryoem": {"snr_db": -5}}]

    # the noise changes the particle sets and all after them; the atoms and their potential stay
    rerun = _rerun_after(finished_cryoem, edit)
    assert "fetch_pdb" not in rerun and "potential" not in rerun
    assert {"simulate_cryoem", "train_cryoem/xrai", "evaluate_cryoem/xrai"} <= rerun

    def blur(cfg):
        cfg["cryoem"]["bfactor"] = 80

    assert {"potential", "simulate_cryoem"} <= _rerun_after(finished_cryoem, blur)
