"""Config validation: the shipped scales load, every kind of mistake is one line naming the key,
and Snakemake refuses a bad config before any job starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xrai.config import load_config, validate_config
from xrai.errors import XraiError


def _write_config(tmp_path: Path, repo_root: Path, edit) -> Path:
    """config/test.yaml with ``edit(cfg)`` applied, written to a temporary YAML file."""
    cfg = yaml.safe_load((repo_root / "config" / "test.yaml").read_text())
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _rename(section: str, old: str, new: str):
    def edit(cfg):
        cfg[section][new] = cfg[section].pop(old)
    return edit


@pytest.mark.parametrize("name", ["config.yaml", "config/demo.yaml", "config/test.yaml",
                                  "config/photon-curve.yaml"])
def test_shipped_configs_load(name, repo_root):
    cfg = load_config(repo_root / name)
    assert cfg["structure"]["download_url"].startswith("https://")  # defaults were filled in
    assert cfg["simulation"]["test_seed"] != cfg["simulation"]["seed"]


def test_paper_config_matches_the_paper(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    assert [p if isinstance(p, str) else p["name"] for p in cfg["proteins"]] == ["1O9K", "2CEX_A"]
    assert cfg["simulation"]["train_sizes"] == [50_000, 500_000, 5_000_000]
    assert cfg["simulation"]["test_size"] == 10_000
    assert cfg["detector"] == {"n_pixels": 128, "side_m": 0.1, "distance_m": 0.2}
    assert cfg["beam"]["photon_energy_ev"] == 4600 and cfg["beam"]["photons_per_pulse"] == 1e12
    assert cfg["train"]["batch_size"] == 64
    assert cfg["train"]["steps"] * 64 == 50_000 * 100


@pytest.mark.parametrize("edit, names", [
    (_rename("detector", "n_pixels", "n_pixel"), ["unknown config key 'detector.n_pixel'", "n_pixels"]),
    (lambda c: c.update(detectr=c.pop("detector")), ["unknown config key 'detectr'", "detector"]),
    (lambda c: c["structure"].update(keep_water=True), ["'structure.keep_water'", "keep_waters"]),
    (lambda c: c["simulation"].update(dtype="float64"), ["'simulation.dtype'", "'float64'", "float32"]),
    (lambda c: c["train"].update(methods=[{"name": "xray"}]), ["'train.methods[0].name'", "'xray'", "xrai"]),
    (lambda c: c["simulation"].update(test_seed=c["simulation"]["seed"]),
     ["'simulation.test_seed'", "'simulation.seed'"]),
    (lambda c: c.update(proteins=["2CEX-A"]), ["'proteins[0]'", "'2CEX-A'", "2CEX_A"]),
    (lambda c: c.update(proteins=[{"name": "x", "pdb": "2CEX", "chain": ["A"]}]), ["'proteins[0]'", "chains"]),
    (lambda c: c["structure"].update(timeout_s=-1), ["'structure.timeout_s'"]),
    (lambda c: c["detector"].pop("side_m"), ["'detector'", "side_m"]),
    (lambda c: c.update(proteins=[{"name": "x", "pdb": "2CEX", "train": {"lr": 1e-3}}]), ["'proteins[0]'"]),
])
def test_bad_config_is_one_readable_line(edit, names, tmp_path, repo_root):
    path = _write_config(tmp_path, repo_root, edit)
    with pytest.raises(XraiError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(XraiError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("detector: [1, 2\n")
    with pytest.raises(XraiError) as err:
        load_config(bad)
    assert "not valid YAML" in str(err.value) and "\n" not in str(err.value)


def _snakemake(repo_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_snakemake_rejects_a_misspelled_key_before_any_job(tmp_path, repo_root):
    config = _write_config(tmp_path, repo_root, _rename("detector", "n_pixels", "n_pixel"))
    res = _snakemake(repo_root, "-n", "--directory", str(tmp_path / "work"), "--configfile", str(config))
    output = res.stdout + res.stderr
    assert res.returncode != 0
    assert "unknown config key 'detector.n_pixel'" in output
    assert "Job stats" not in output and "rule fetch_pdb" not in output
    assert not (tmp_path / "work" / "results").exists()


def test_snakemake_fetches_2cex_chain_a_from_the_mirror(tmp_path, repo_root, pdb_mirror):
    # the target comes first: --configfile takes every argument after it
    res = _snakemake(repo_root, "results/structures/2CEX_A.cif", "--cores", "1", "--directory", str(tmp_path),
                     "--configfile", str(repo_root / "config" / "test.yaml"),
                     env={"XRAI_PDB_MIRROR": str(pdb_mirror)})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "results/structures/2CEX_A.json").read_text())
    assert summary["n_atoms"] == 2362 and summary["chains"] == ["A"]
    assert summary["removed_atoms"]["other_chains"] == 2362
    assert summary["source"] == str(pdb_mirror / "2cex.pdb")
    assert (tmp_path / "results/structures/2CEX_A.cif").stat().st_size > 0
    assert (tmp_path / "results/logs/fetch_pdb/2CEX_A.log").is_file()


def test_a_proteins_train_overrides_apply_to_its_reconstructions_only(repo_root):
    """``proteins[i].train`` edits the train section for that protein: before the methods' own
    overrides, absent from its spec (so its fetch and simulation do not see it), one line for a
    name that is not in the config."""
    from xrai.config import protein_config, step_config

    cfg = load_config(repo_root / "config" / "test.yaml")
    cfg["proteins"] = ["2CEX_A", {"name": "2CEX_B", "pdb": "2cex", "chains": ["B"],
                                  "train": {"steps": 7, "xrai": {"lr": 0.5}}}]
    cfg = validate_config(cfg)
    known = next(m for m in cfg["train"]["methods"] if m["name"] == "xrai-known-pose")
    assert protein_config(cfg, "2CEX_A") is cfg and protein_config(cfg, None) is cfg
    own = protein_config(cfg, "2CEX_B")["train"]
    assert own["steps"] == 7 and own["xrai"]["lr"] == 0.5
    assert own["xrai"]["heads"] == cfg["train"]["xrai"]["heads"]  # merged into the section, not replacing it
    assert cfg["train"]["steps"] != 7  # the config itself is untouched
    view = step_config(cfg, method="xrai", protein="2CEX_B")
    assert view["train"]["steps"] == 7 and "train" not in view["protein"]
    assert step_config(cfg, method="xrai-known-pose", protein="2CEX_B")["train"]["steps"] == known["steps"]
    assert step_config(cfg, protein="2CEX_B")["protein"] == step_config(cfg, protein="2CEX_A")["protein"] | {
        "chains": ["B"]}
    with pytest.raises(XraiError, match="'2CEX_C' is not in the config's proteins"):
        protein_config(cfg, "2CEX_C")


def test_overrides_merge_at_every_depth(repo_root):
    """A protein's override two levels down keeps the section's other keys there, and the config's own nested
    dicts are not changed through the merged copy."""
    from xrai.config import protein_config

    cfg = load_config(repo_root / "config" / "test.yaml")
    cfg["train"]["xrai"]["poisson"] = {"polish_passes": 4, "infer_pixels": 4096}
    cfg["proteins"] = [{"name": "2CEX_A", "pdb": "2cex", "chains": ["A"],
                        "train": {"xrai": {"poisson": {"polish_passes": 2}}}}]
    cfg = validate_config(cfg)
    own = protein_config(cfg, "2CEX_A")["train"]["xrai"]["poisson"]
    assert own == {"polish_passes": 2, "infer_pixels": 4096}
    assert cfg["train"]["xrai"]["poisson"] == {"polish_passes": 4, "infer_pixels": 4096}
    own["polish_passes"] = 9
    assert cfg["train"]["xrai"]["poisson"]["polish_passes"] == 4


def test_a_proteins_simulation_overrides_change_its_datasets_only(repo_root):
    """``proteins[i].simulation`` merges into the simulation section for that protein's steps: its
    datasets' config hash changes, the others' stays what it was; the cross-key rules hold for it
    too (named by its index); a cryo-EM protein cannot take one."""
    from xrai.config import config_hash, has_photon_curve, protein_config, step_config

    base = load_config(repo_root / "config" / "test.yaml")
    cfg = load_config(repo_root / "config" / "test.yaml")
    cfg["proteins"] = ["2CEX_A", {"name": "2CEX_A_200", "pdb": "2CEX", "chains": ["A"],
                                  "simulation": {"min_total_intensity": 200, "poisson_noise": True,
                                                 "background": {"uniform": 0.01}}}]
    cfg = validate_config(cfg)
    assert has_photon_curve(cfg) and not has_photon_curve(base)
    sim = protein_config(cfg, "2CEX_A_200")["simulation"]
    assert sim["min_total_intensity"] == 200 and sim["poisson_noise"] and sim["background"]["uniform"] == 0.01
    assert sim["background"]["radial"] == base["simulation"]["background"]["radial"]  # merged, not replaced
    assert cfg["simulation"] == base["simulation"]  # the config itself is untouched

    def simulate_hash(c, protein):
        return config_hash(step_config(c, protein=protein, split="train"), ["detector", "beam", "simulation"])

    assert simulate_hash(cfg, "2CEX_A") == simulate_hash(base, "2CEX_A")
    assert simulate_hash(cfg, "2CEX_A_200") != simulate_hash(cfg, "2CEX_A")
    # its structure is 2CEX_A's: the overrides are not part of the protein's spec that fetch_pdb hashes
    assert step_config(cfg, protein="2CEX_A_200")["protein"] == step_config(cfg, protein="2CEX_A")["protein"]

    bad = load_config(repo_root / "config" / "test.yaml")
    bad["proteins"] = ["2CEX_A", {"name": "x", "pdb": "2CEX", "simulation": {"storage": "sparse"}}]
    with pytest.raises(XraiError, match=r"proteins\[1\]\.simulation\.storage"):
        validate_config(bad)
    cryo = load_config(repo_root / "config" / "cryoem-test.yaml")
    cryo["proteins"] = [{"name": "4AKE_x", "pdb": "4AKE", "simulation": {"min_total_intensity": 200}}]
    with pytest.raises(XraiError, match=r"proteins\[0\]\.simulation.*cryo-EM"):
        validate_config(cryo)


def test_the_photon_curve_config_plans_one_curve(tmp_path, repo_root, pdb_mirror):
    """config/photon-curve.yaml: five datasets pairs, every method on each, one photon-curve figure."""
    from pipeline_runs import job_counts

    res = _snakemake(repo_root, "-n", "--directory", str(tmp_path),
                     "--configfile", str(repo_root / "config" / "photon-curve.yaml"),
                     env={"XRAI_PDB_MIRROR": str(pdb_mirror)})
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout + res.stderr)
    assert counts["photon_curve"] == 1 and counts["simulate"] == 10 and counts["evaluate"] == 15
