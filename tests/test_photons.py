"""Realistic photon statistics of ``xrai simulate``: scaling modes, jitter, Poisson, mask, background,
sparse storage, shards, and CXI input (:mod:`xrai.xray.photons`, :mod:`xrai.data.hdf5`, :mod:`xrai.data.cxi`)."""

from __future__ import annotations

import copy
import hashlib

import h5py
import numpy as np
import pytest
import torch

from xrai.config import validate_config
from xrai.data import open_dataset
from xrai.data.cxi import CxiDataset, is_cxi, write_cxi
from xrai.data.hdf5 import DatasetWriter, DiffractionDataset
from xrai.errors import XraiError
from xrai.random_streams import image_seeds, orientations_for
from xrai.xray.geometry import Beam, Detector
from xrai.xray.photons import detector_mask, jitter_factors, pixel_radius_px
from xrai.xray.scattering import PatternSimulator, centred_positions
from xrai.xray.simulate import dataset_bytes, simulate_dataset

#: sha256 of images, orientations, scale, q, polarization, solid angle of 64 train images of
#: config/test.yaml (CPU, batch 32), noise-free and Poisson, made by xrai at commit 1a0db35,
#: before the photon model existed: configs without the new keys must give the same bits.
REFERENCE_SHA256 = {
    False: "3174022e0c97b7a7dbbbd721fc11747735dc3e3d54528c3ccb374a24aa41becb",
    True: "3cd9de77c6ebfb4911e1e8fb915ee6fbaf0dacf62831364a29424821d28f3576",
}


def _cfg(base: dict, **simulation) -> dict:
    cfg = copy.deepcopy(base)
    cfg["simulation"].update(device="cpu", **simulation)
    return validate_config(cfg)


def _arrays_sha256(path) -> str:
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for k in ("images", "orientations", "scale", "pixel_position_reciprocal", "polarization", "solid_angle"):
            h.update(np.ascontiguousarray(f[k][...]).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def simulator(test_config, chain_a_cif) -> PatternSimulator:
    from xrai.structure import read_atoms

    pos, elements = read_atoms(chain_a_cif)
    return PatternSimulator.from_atoms(centred_positions(pos, elements), elements, Detector.from_config(test_config),
                                       Beam.from_config(test_config), test_config["simulation"]["mesh_size"])


@pytest.fixture(scope="module")
def test_config():  # module scope: shared by the module's fixtures (conftest's is per test)
    from pathlib import Path

    from xrai.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "config" / "test.yaml")


@pytest.mark.parametrize("noise", [False, True])
def test_configs_without_new_keys_are_bit_identical(tmp_path, test_config, chain_a_cif, noise):
    cfg = _cfg(test_config, batch_size=32, poisson_noise=noise)
    assert cfg["simulation"]["photon_scaling"]["mode"] == "min_total" and cfg["simulation"]["storage"] == "dense"
    simulate_dataset(cfg, chain_a_cif, "train", 64, tmp_path / "a.h5")
    assert _arrays_sha256(tmp_path / "a.h5") == REFERENCE_SHA256[noise]
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert "mask" not in f and "background" not in f and "photons" not in f
        assert f.attrs["photon_scaling_mode"] == "min_total" and f.attrs["storage"] == "dense"


def test_fluence_and_mean_photons_modes(tmp_path, test_config, chain_a_cif, simulator):
    # the beam's true fluence: the simulator's own photons, scale 1; 2CEX_A at the paper's beam: ~12 per pattern
    simulate_dataset(_cfg(test_config, photon_scaling={"mode": "fluence"}), chain_a_cif, "train", 1000,
                     tmp_path / "f.h5")
    ds = DiffractionDataset(tmp_path / "f.h5")
    data = ds.read(0, 1000)
    assert torch.equal(data["scale"], torch.ones(1000))
    assert torch.allclose(data["images"][:8], simulator.patterns(orientations_for(0, "train", 0, 8)), rtol=1e-6)
    mean = float(data["images"].double().sum(dim=(1, 2)).mean())
    assert 9 < mean < 15, mean  # the issue: median ~12 photons (x1,694 to reach 20,000)
    # the paper's mode scales exactly these patterns to 20,000 photons
    simulate_dataset(_cfg(test_config), chain_a_cif, "train", 1000, tmp_path / "p.h5")
    paper_scale = DiffractionDataset(tmp_path / "p.h5").read(0, 1000)["scale"].double()
    totals = data["images"].double().sum(dim=(1, 2))
    assert torch.allclose(paper_scale * totals, torch.full_like(totals, 20000.0), rtol=1e-5)
    assert float(paper_scale.median()) == pytest.approx(1694, rel=0.02)
    assert ds.attrs["scaling"]["expected_photons_per_pattern"] == pytest.approx(mean, rel=0.05)
    # a fixed mean: one factor for the whole set, the mean total over orientations hits the target
    simulate_dataset(_cfg(test_config, photon_scaling={"mode": "mean_photons", "mean_photons": 2000}), chain_a_cif,
                     "train", 1000, tmp_path / "m.h5")
    m = DiffractionDataset(tmp_path / "m.h5").read(0, 1000)
    assert torch.all(m["scale"] == m["scale"][0]) and float(m["scale"][0]) == pytest.approx(2000 / mean, rel=0.05)
    assert float(m["images"].double().sum(dim=(1, 2)).mean()) == pytest.approx(2000, rel=0.03)
    assert torch.allclose(m["images"], data["images"] * m["scale"][0], rtol=1e-5)


def test_jitter_statistics_and_reproducibility(tmp_path, test_config, chain_a_cif):
    seeds = image_seeds(0, "train", 3, 0, 20000)
    f = jitter_factors(seeds, 0.3)
    assert float(f.mean()) == pytest.approx(1.0, abs=3 * 0.3 / 20000**0.5)
    assert float(f.std()) == pytest.approx(0.3, rel=0.03) and bool((f > 0).all())
    assert torch.equal(jitter_factors(seeds[500:700], 0.3), f[500:700])  # per image: any sub-range
    assert torch.equal(jitter_factors(seeds[:5], 0.0), torch.ones(5, dtype=torch.float64))
    cfg = dict(photon_scaling={"mode": "fluence"}, fluence_jitter=0.3)
    simulate_dataset(_cfg(test_config, batch_size=64, **cfg), chain_a_cif, "train", 200, tmp_path / "a.h5")
    simulate_dataset(_cfg(test_config, batch_size=96, **cfg), chain_a_cif, "train", 200, tmp_path / "b.h5")
    a, b = DiffractionDataset(tmp_path / "a.h5").read(0, 200), DiffractionDataset(tmp_path / "b.h5").read(0, 200)
    assert torch.equal(a["scale"], b["scale"]) and torch.equal(a["images"], b["images"])
    assert torch.allclose(a["scale"].double(), f[:200], rtol=1e-6)  # scale = fluence factor 1 x jitter


def test_poisson_statistics_with_background(tmp_path, test_config, chain_a_cif):
    common = dict(photon_scaling={"mode": "mean_photons", "mean_photons": 300}, fluence_jitter=0.2,
                  background={"uniform": 0.05, "radial": [[0, 0.5], [10, 0.0]]})
    simulate_dataset(_cfg(test_config, **common), chain_a_cif, "train", 600, tmp_path / "mu.h5")
    simulate_dataset(_cfg(test_config, poisson_noise=True, **common), chain_a_cif, "train", 600, tmp_path / "k.h5")
    mu = DiffractionDataset(tmp_path / "mu.h5").read(0, 600)["images"].double()
    k = DiffractionDataset(tmp_path / "k.h5").read(0, 600)["images"].double()
    assert torch.equal(k, k.round()) and bool((k >= 0).all())
    n = mu.sum()
    assert float(k.sum() / n) == pytest.approx(1.0, abs=4 / float(n) ** 0.5)  # mean = mu
    assert float(((k - mu) ** 2).sum() / n) == pytest.approx(1.0, rel=0.03)  # variance = mu
    # the background: uniform + linear radial profile, added before the draw
    bg = DiffractionDataset(tmp_path / "k.h5").background.double()
    r = pixel_radius_px(Detector.from_config(test_config))
    expected = 0.05 + torch.clamp(0.5 * (1 - r / 10), min=0)
    assert torch.allclose(bg, expected, atol=1e-6)
    simulate_dataset(_cfg(test_config, **{**common, "background": {}}), chain_a_cif, "train", 600, tmp_path / "s.h5")
    signal = DiffractionDataset(tmp_path / "s.h5").read(0, 600)["images"].double()
    assert torch.allclose(mu - signal, bg.expand_as(mu), atol=1e-4)


def test_mask_beam_stop_gap_bad_pixels(tmp_path, test_config, chain_a_cif):
    det = Detector.from_config(test_config)
    sim = {"beam_stop": {"radius_px": 3}, "bad_pixels": {"gap_px": 2, "fraction": 0.02, "seed": 7}}
    mask = detector_mask(sim, det)
    r = pixel_radius_px(det)
    assert not bool(mask[r <= 3].any()) and not bool(mask[15:17].any())  # stop, and the 2 centre rows
    stop_or_gap = (r <= 3) | torch.isin(torch.arange(32), torch.tensor([15, 16]))[:, None]
    assert int(stop_or_gap.sum()) <= int((~mask).sum()) <= int(stop_or_gap.sum()) + round(0.02 * 1024)
    assert int((~detector_mask({"bad_pixels": {"fraction": 0.02}}, det)).sum()) == round(0.02 * 1024)
    by_metres = detector_mask({"beam_stop": {"radius_m": 3 * det.pixel_size_m}}, det)
    assert torch.equal(by_metres, r > 3)
    assert not torch.equal(mask, detector_mask({**sim, "bad_pixels": {**sim["bad_pixels"], "seed": 8}}, det))
    assert detector_mask({}, det) is None
    simulate_dataset(_cfg(test_config, poisson_noise=True, **sim), chain_a_cif, "train", 100, tmp_path / "m.h5")
    ds = DiffractionDataset(tmp_path / "m.h5")
    assert torch.equal(ds.mask, mask)
    images = ds.read(0, 100)["images"]
    assert float(images[:, ~mask].abs().sum()) == 0 and float(images[:, mask].sum()) > 0
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert f["mask"].dtype == bool and '"radius_px": 3' in f.attrs["mask_config"]
    with pytest.raises(XraiError, match="mask every pixel"):
        detector_mask({"beam_stop": {"radius_px": 100}}, det)


def test_sparse_round_trip_is_bit_identical_and_small(tmp_path, test_config, chain_a_cif):
    common = dict(poisson_noise=True, photon_scaling={"mode": "fluence"}, fluence_jitter=0.2,
                  beam_stop={"radius_px": 2}, background={"uniform": 0.002}, batch_size=128)
    simulate_dataset(_cfg(test_config, storage="dense", **common), chain_a_cif, "train", 1000, tmp_path / "d.h5")
    simulate_dataset(_cfg(test_config, storage="sparse", **common), chain_a_cif, "train", 1000, tmp_path / "s.h5")
    simulate_dataset(_cfg(test_config, storage="auto", **common), chain_a_cif, "train", 300, tmp_path / "a.h5")
    dense, sparse = DiffractionDataset(tmp_path / "d.h5"), DiffractionDataset(tmp_path / "s.h5")
    assert sparse.sparse and not dense.sparse and DiffractionDataset(tmp_path / "a.h5").sparse  # ~0.01 photons/pixel
    simulate_dataset(_cfg(test_config, storage="auto", poisson_noise=True), chain_a_cif, "train", 50, tmp_path / "b.h5")
    assert not DiffractionDataset(tmp_path / "b.h5").sparse  # 20,000 photons over 1,024 pixels: dense
    for key, value in dense.read(0, 1000).items():
        assert torch.equal(sparse.read(0, 1000)[key], value), key
    assert torch.equal(sparse.read(17, 401)["images"], dense.read(17, 401)["images"])
    assert sparse.block_rows == dense.block_rows == 128
    for a, b in zip(sparse.iter_batches(100, shuffle=True, seed=3, epoch=1, skip=2),
                    dense.iter_batches(100, shuffle=True, seed=3, epoch=1, skip=2), strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
    assert torch.equal(sparse.mask, dense.mask) and torch.equal(sparse.background, dense.background)
    ratio = (tmp_path / "d.h5").stat().st_size / (tmp_path / "s.h5").stat().st_size
    assert ratio > 10, ratio  # ~12 photons over 1,024 pixels; 128 px images gain ~16x more
    with pytest.raises(XraiError, match="needs 'simulation.poisson_noise: true'"):
        _cfg(test_config, storage="sparse")


def test_sparse_disk_plan_is_a_bound(tmp_path, test_config, chain_a_cif):
    cfg = _cfg(test_config, poisson_noise=True, storage="sparse", background={"uniform": 0.01},
               photon_scaling={"mode": "mean_photons", "mean_photons": 100})
    per_image = dataset_bytes(cfg, 2000) - dataset_bytes(cfg, 1000)
    assert per_image == pytest.approx(1000 * (4 * (100 + 0.01 * 1024) + 52), abs=1000)  # 4 B per photon + fixed rows
    assert dataset_bytes({**cfg, "simulation": {**cfg["simulation"], "storage": "dense"}}, 1000) > 5 * dataset_bytes(cfg, 1000)
    simulate_dataset(cfg, chain_a_cif, "train", 500, tmp_path / "s.h5")
    assert (tmp_path / "s.h5").stat().st_size <= dataset_bytes(cfg, 500)


def test_sparse_shards_resume(tmp_path, test_config, chain_a_cif):
    sim = dict(poisson_noise=True, photon_scaling={"mode": "mean_photons", "mean_photons": 50}, fluence_jitter=0.3,
               storage="sparse", batch_size=64)
    simulate_dataset(_cfg(test_config, **sim), chain_a_cif, "train", 250, tmp_path / "one.h5")
    cfg = _cfg(test_config, shard_size=100, **sim)
    out = tmp_path / "sharded.h5"
    first = simulate_dataset(cfg, chain_a_cif, "train", 250, out)
    assert first["shards"] == 3 and first["simulated"] == 250
    (tmp_path / "sharded_shards/shard001.h5").unlink()  # a job killed mid-way: one shard to redo
    again = simulate_dataset(cfg, chain_a_cif, "train", 250, out)
    assert again["simulated"] == 100
    one, sharded = DiffractionDataset(tmp_path / "one.h5"), DiffractionDataset(out)
    assert sharded.sparse and len(sharded) == 250
    for key, value in one.read(0, 250).items():
        assert torch.equal(sharded.read(0, 250)[key], value), key
    for a, b in zip(one.iter_batches(32, shuffle=True, seed=1), sharded.iter_batches(32, shuffle=True, seed=1),
                    strict=True):
        assert torch.equal(a["images"], b["images"])
    (tmp_path / "sharded_shards/shard002.h5").unlink()
    with pytest.raises(XraiError, match="shard002.h5 of this sharded dataset is missing"):
        DiffractionDataset(out)


def test_corrupt_sparse_files_are_refused(tmp_path):
    q = np.zeros((4, 4, 3), np.float32)
    images = np.zeros((3, 4, 4), np.float32)
    images[0, 1, 2], images[1, 3, 3], images[2, 0, 0] = 1, 4, 2
    path = tmp_path / "s.h5"
    with DatasetWriter(path, 3, (4, 4), pixel_position_reciprocal=q, storage="sparse") as w:
        w.write(0, images, np.tile([1.0, 0, 0, 0], (3, 1)))
    assert torch.equal(DiffractionDataset(path).read(0, 3)["images"], torch.from_numpy(images))
    with h5py.File(path, "a") as f:
        f["photons/multi_offsets"][2] = 5
    with pytest.raises(XraiError, match=r"photons/multi_offsets' must start at 0 and never decrease"):
        DiffractionDataset(path)
    with h5py.File(path, "a") as f:
        f["photons/multi_offsets"][2] = 1
        f["photons/one_offsets"][3] = 2
    with pytest.raises(XraiError, match=r"one_offsets' ends at 2 but one_pixels holds 1 entries"):
        DiffractionDataset(path)
    with h5py.File(path, "a") as f:
        f["photons/one_offsets"][3] = 1
        f["photons/multi_pixels"][0] = 99
    with pytest.raises(XraiError, match=r"multi_pixels' of images \[0, 3\) point outside the 4x4 detector"):
        DiffractionDataset(path).read(0, 3)
    with DatasetWriter(tmp_path / "x.h5", 3, (4, 4), pixel_position_reciprocal=q, storage="sparse") as w:
        with pytest.raises(XraiError, match="integer photon counts"):
            w.write(0, images + 0.5, np.tile([1.0, 0, 0, 0], (3, 1)))
        with pytest.raises(XraiError, match="written in order"):
            w.write(1, images[:1], np.tile([1.0, 0, 0, 0], (1, 1)))


def test_cxi_round_trip_and_bad_files(tmp_path, test_config, chain_a_cif):
    sim = dict(poisson_noise=True, photon_scaling={"mode": "fluence"}, beam_stop={"radius_px": 2},
               bad_pixels={"gap_px": 1}, storage="sparse")
    simulate_dataset(_cfg(test_config, **sim), chain_a_cif, "test", 300, tmp_path / "t.h5")
    ds = DiffractionDataset(tmp_path / "t.h5")
    write_cxi(ds, tmp_path / "t.cxi")
    assert is_cxi(tmp_path / "t.cxi") and not is_cxi(tmp_path / "t.h5")
    cxi = open_dataset(tmp_path / "t.cxi")
    assert isinstance(cxi, CxiDataset) and len(cxi) == 300 and cxi.image_shape == (32, 32)
    a, b = ds.read(0, 300), cxi.read(0, 300)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["orientations"], b["orientations"])
    assert "scale" not in b
    assert (cxi.pixel_position_reciprocal - ds.pixel_position_reciprocal).abs().max() < 1e-6
    assert torch.equal(cxi.mask, ds.mask) and not bool(cxi.mask.all())
    assert torch.allclose(cxi.true_rotations([3, 4]), ds.true_rotations([3, 4]), atol=1e-6)
    assert [x["index"].tolist() for x in cxi.iter_batches(128, shuffle=True, seed=2)] == \
        [x["index"].tolist() for x in ds.iter_batches(128, shuffle=True, seed=2)]
    cxi.close()
    # geometry from the CXI defaults (no corner, no basis): centred on the beam, rows along y; energy in eV
    with h5py.File(tmp_path / "t.cxi", "a") as f:
        del f["entry_1/instrument_1/detector_1/corner_position"], f["entry_1/instrument_1/detector_1/basis_vectors"]
        del f["entry_1/data_1/orientations"]
        energy = f["entry_1/instrument_1/source_1/energy"]
        energy[...] = test_config["beam"]["photon_energy_ev"]
        energy.attrs["units"] = "eV"
    plain = CxiDataset(tmp_path / "t.cxi")
    assert (plain.pixel_position_reciprocal - ds.pixel_position_reciprocal).abs().max() < 1e-6
    assert bool(torch.isnan(plain.read(0, 2)["orientations"]).all())
    with pytest.raises(XraiError, match="no ground-truth orientations"):
        plain.true_rotations()
    plain.close()
    with h5py.File(tmp_path / "t.cxi", "a") as f:
        del f["entry_1/data_1/data"]
    with pytest.raises(XraiError, match=r"t.cxi: not a CXI diffraction file: no entry_1/data_1/data"):
        CxiDataset(tmp_path / "t.cxi")
    with h5py.File(tmp_path / "g.cxi", "w") as f:
        f["entry_1/data_1/data"] = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(XraiError, match=r"CXI key 'entry_1/instrument_1/detector_1/distance' is missing"):
        CxiDataset(tmp_path / "g.cxi")
