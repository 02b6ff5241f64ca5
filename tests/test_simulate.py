"""``xrai simulate``: file layout, paper scaling, seeds, options, shards and disk checks, via the CLI."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch
import yaml

from xrai.cli import main
from xrai.data.hdf5 import DiffractionDataset
from xrai.errors import XraiError
from xrai.random_streams import orientations_for
from xrai.xray.geometry import Beam, Detector
from xrai.xray.scattering import PatternSimulator, centred_positions
from xrai.xray.simulate import dataset_bytes, planned_bytes, simulate_dataset


def _config(tmp_path, base: dict, **simulation) -> str:
    cfg = copy.deepcopy(base)
    cfg["simulation"].update(simulation)
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _simulate(cfg_path, cif, split, n, out) -> int:
    return main(["simulate", "--config", cfg_path, "--structure", str(cif), "--split", split,
                 "--n-images", str(n), "--out", str(out)])


def test_dataset_layout_scaling_and_physics(tmp_path, test_config, chain_a_cif):
    cfg_path = _config(tmp_path, test_config, batch_size=128)
    out = tmp_path / "train_300.h5"
    assert _simulate(cfg_path, chain_a_cif, "train", 300, out) == 0
    with h5py.File(out, "r") as f:
        assert f["images"].shape == (300, 32, 32) and f["images"].dtype == np.float32
        assert f["images"].chunks == (128, 32, 32)  # whole batches
        assert f["orientations"].shape == (300, 4) and f["scale"].shape == (300,)
        assert f["pixel_position_reciprocal"].attrs["units"] == "1/angstrom"
        assert f["polarization"].shape == (32, 32) and f["solid_angle"].shape == (32, 32)
        for key in ("detector", "beam", "scaling", "seed", "xrai_version", "config", "split", "structure_sha256"):
            assert key in f.attrs
    ds = DiffractionDataset(out)
    assert ds.attrs["config"]["simulation"]["batch_size"] == 128 and ds.attrs["split"] == "train"
    assert ds.attrs["seed"] == test_config["simulation"]["seed"]
    data = ds.read(0, 300)
    images, quats = data["images"], data["orientations"].double()
    assert torch.allclose(quats.norm(dim=1), torch.ones(300, dtype=torch.float64), atol=1e-6)
    assert (quats[:, 0] >= 0).all()
    # appendix A.1: every image scaled to a total of at least 20,000 photons (unscaled totals are far lower)
    totals = images.double().sum(dim=(1, 2))
    assert (totals >= 20000 * (1 - 1e-5)).all() and (data["scale"] > 1).all()
    assert torch.allclose(totals, torch.full_like(totals, 20000.0), rtol=1e-5)
    # the stored images are the simulator's patterns (skopi-checked) times the stored scale
    from xrai.structure import read_atoms

    pos, elements = read_atoms(chain_a_cif)
    det, beam = Detector.from_config(test_config), Beam.from_config(test_config)
    sim = PatternSimulator.from_atoms(centred_positions(pos, elements), elements, det, beam,
                                      test_config["simulation"]["mesh_size"])
    expected = sim.patterns(quats[:5]) * data["scale"][:5, None, None]
    assert torch.allclose(images[:5], expected, rtol=1e-4)
    assert torch.allclose(ds.pixel_position_reciprocal, det.pixel_position_reciprocal(beam).float())


def test_seeds_prefix_and_test_split(tmp_path, test_config, chain_a_cif):
    # image i gets the same orientation whatever the batch size or the set size
    a = orientations_for(0, "train", 0, 5000)
    assert torch.equal(orientations_for(0, "train", 4000, 4200), a[4000:4200])
    assert _simulate(_config(tmp_path, test_config, batch_size=64), chain_a_cif, "train", 200, tmp_path / "t200.h5") == 0
    assert _simulate(_config(tmp_path, test_config, batch_size=96), chain_a_cif, "train", 150, tmp_path / "t150.h5") == 0
    assert _simulate(_config(tmp_path, test_config), chain_a_cif, "test", 150, tmp_path / "test150.h5") == 0
    big, small, test = (DiffractionDataset(tmp_path / n).read(0, 150) for n in ("t200.h5", "t150.h5", "test150.h5"))
    assert torch.equal(big["orientations"], small["orientations"])
    assert torch.allclose(big["images"], small["images"], rtol=1e-6)
    # the test split uses test_seed: different orientations
    cos = (test["orientations"] * big["orientations"]).sum(1).abs()
    assert cos.max() < 0.9999
    assert DiffractionDataset(tmp_path / "test150.h5").attrs["seed"] == test_config["simulation"]["test_seed"]


def test_float16_gzip_and_poisson_options(tmp_path, test_config, chain_a_cif):
    ref = tmp_path / "ref.h5"
    assert _simulate(_config(tmp_path, test_config), chain_a_cif, "train", 64, ref) == 0
    half = tmp_path / "half.h5"
    assert _simulate(_config(tmp_path, test_config, dtype="float16", compression="gzip"), chain_a_cif, "train", 64, half) == 0
    with h5py.File(half, "r") as f:
        assert f["images"].dtype == np.float16 and f["images"].compression == "gzip"
    r, h = DiffractionDataset(ref).read(0, 64)["images"], DiffractionDataset(half).read(0, 64)["images"]
    assert torch.linalg.norm(h - r) / torch.linalg.norm(r) < 1e-3
    noisy = tmp_path / "noisy.h5"
    cfg_noise = _config(tmp_path, test_config, poisson_noise=True, batch_size=16)
    assert _simulate(cfg_noise, chain_a_cif, "train", 64, noisy) == 0
    n = DiffractionDataset(noisy).read(0, 64)["images"]
    assert torch.equal(n, n.round()) and (n >= 0).all()  # photon counts
    # Poisson: mean = rate; the normalised residual has unit variance over bright pixels
    bright = r > 20
    z = (n[bright] - r[bright]) / r[bright].sqrt()
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    # reproducible with another batch size
    noisy2 = tmp_path / "noisy2.h5"
    assert _simulate(_config(tmp_path, test_config, poisson_noise=True, batch_size=64), chain_a_cif, "train", 64, noisy2) == 0
    assert torch.equal(DiffractionDataset(noisy2).read(0, 64)["images"], n)


def test_shards_read_as_one_and_are_reused(tmp_path, test_config, chain_a_cif):
    cfg_path = _config(tmp_path, test_config, shard_size=100, batch_size=64)
    out = tmp_path / "train_250.h5"
    assert _simulate(cfg_path, chain_a_cif, "train", 250, out) == 0
    shards = sorted((tmp_path / "train_250_shards").glob("shard*.h5"))
    assert [p.name for p in shards] == ["shard000.h5", "shard001.h5", "shard002.h5"]
    ds = DiffractionDataset(out)
    assert len(ds) == 250
    whole = tmp_path / "whole.h5"
    assert _simulate(_config(tmp_path, test_config), chain_a_cif, "train", 250, whole) == 0
    assert torch.allclose(ds.read(0, 250)["images"], DiffractionDataset(whole).read(0, 250)["images"], rtol=1e-6)
    # a restarted job (master missing, two shards done) redoes only the missing shard
    out.unlink()
    shards[2].unlink()
    mtimes = [p.stat().st_mtime_ns for p in shards[:2]]
    log = tmp_path / "simulate.log"
    assert main(["simulate", "--config", cfg_path, "--log", str(log), "--structure", str(chain_a_cif),
                 "--split", "train", "--n-images", "250", "--out", str(out)]) == 0
    assert "reusing 2 finished shards" in log.read_text()
    assert [p.stat().st_mtime_ns for p in shards[:2]] == mtimes
    assert torch.allclose(DiffractionDataset(out).read(200, 250)["images"],
                          DiffractionDataset(whole).read(200, 250)["images"], rtol=1e-6)


def test_refuses_without_disk_space(tmp_path, test_config, chain_a_cif, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    out = tmp_path / "train_100000.h5"
    assert _simulate(_config(tmp_path, test_config), chain_a_cif, "train", 100000, out) == 2
    err = capsys.readouterr().err
    assert f"needs {dataset_bytes(test_config, 100000) / 1e6:.1f} MB" in err
    assert "only 1.0 MB (1000000 bytes) are free" in err
    assert not out.exists()


def test_user_errors(tmp_path, test_config, chain_a_cif, capsys):
    cfg_path = _config(tmp_path, test_config)
    assert _simulate(cfg_path, tmp_path / "nope.cif", "train", 10, tmp_path / "x.h5") == 2
    assert "nope.cif" in capsys.readouterr().err
    with pytest.raises(XraiError, match="n-images"):
        simulate_dataset(test_config, chain_a_cif, "train", 0, tmp_path / "x.h5")
    assert main(["simulate", "--config", cfg_path, "--split", "train"]) == 2
    assert "missing option(s) --structure, --n-images, --out" in capsys.readouterr().err


def test_disk_plan_of_the_paper_config(repo_root, capsys):
    from xrai.config import load_config

    cfg = load_config(repo_root / "config.yaml")
    plan = planned_bytes(cfg)
    assert list(plan) == ["train_50000", "train_500000", "train_5000000", "test_10000"]
    image = 128 * 128 * 4
    assert plan["train_50000"] == dataset_bytes(cfg, 50000)
    assert 50000 * image < plan["train_50000"] < 50000 * image * 1.01
    assert 5_000_000 * image < plan["train_5000000"] < 5_000_000 * image * 1.01
    assert main(["simulate", "--config", str(repo_root / "config.yaml"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "| train_5000000.h5 |" in out and "all 2 proteins" in out


def test_disk_plan_names_each_proteins_storage(test_config):
    """With one protein stored sparse and one dense, the plan lists each protein's datasets with its own storage
    (the header names none), and sparse ones are planned no larger than dense ones."""
    from xrai.xray.simulate import disk_plan_table

    cfg = copy.deepcopy(test_config)
    cfg["proteins"] = ["2CEX_A", {"name": "2CEX_A_50", "pdb": "2CEX", "chains": ["A"],
                                  "simulation": {"min_total_intensity": 50, "poisson_noise": True, "storage": "sparse"}}]
    table = disk_plan_table(cfg)
    rows = {r.split("|")[1].strip(): int(r.split("|")[2]) for r in table.splitlines()[2:]}
    dense = {k: v for k, v in rows.items() if k.startswith("2CEX_A/")}
    sparse = {k: v for k, v in rows.items() if k.startswith("2CEX_A_50/")}
    assert dense and all(k.endswith("(float32)") for k in dense)
    assert sparse and all("(sparse storage" in k for k in sparse)
    assert "sparse" not in table.splitlines()[0] and "float32" not in table.splitlines()[0]
    assert sum(sparse.values()) <= sum(dense.values())
    same = copy.deepcopy(test_config)
    assert "float32" in disk_plan_table(same).splitlines()[0]


def test_a_proteins_photon_statistics_apply_to_its_datasets(tmp_path, test_config, chain_a_cif):
    """``proteins[i].simulation`` (``xrai simulate --protein``): that protein's datasets have its photon
    count and noise; another protein's, and the config's without --protein, keep the config's."""
    cfg = copy.deepcopy(test_config)
    cfg["simulation"]["min_total_intensity"] = 2000
    cfg["proteins"] = ["2CEX_A", {"name": "2CEX_A_50", "pdb": "2CEX", "chains": ["A"],
                                  "simulation": {"min_total_intensity": 50, "poisson_noise": True}}]
    path = tmp_path / "curve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = {}
    for protein in ("2CEX_A", "2CEX_A_50"):
        out[protein] = tmp_path / f"{protein}.h5"
        assert main(["simulate", "--config", str(path), "--protein", protein, "--structure", str(chain_a_cif),
                     "--split", "train", "--n-images", "32", "--out", str(out[protein])]) == 0
    with DiffractionDataset(out["2CEX_A"]) as plain, DiffractionDataset(out["2CEX_A_50"]) as low:
        assert plain.attrs["scaling"]["min_total_intensity"] == 2000 and not plain.attrs["scaling"]["poisson_noise"]
        assert low.attrs["scaling"]["min_total_intensity"] == 50 and low.attrs["scaling"]["poisson_noise"]
        assert plain.mean_photons_per_pattern() >= 2000 * (1 - 1e-5)  # every pattern scaled to >= 2000
        images = low.read(0, 32)["images"]
        assert torch.equal(images, images.round())  # Poisson counts
        assert 40 < low.mean_photons_per_pattern() < 0.2 * plain.mean_photons_per_pattern()
