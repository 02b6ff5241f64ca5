"""ParticleDataset: RELION 3.0 / 3.1 STAR + MRC stacks, round trips, one-pass orders, bad input; open_dataset."""

from __future__ import annotations

import pickle
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from relion_reference import euler_matrix, write_particles

from xrai.data import open_dataset
from xrai.data.hdf5 import DiffractionDataset, write_dataset
from xrai.data.star import ParticleDataset
from xrai.errors import XraiError
from xrai.rotations import relion_euler_to_matrix

N, BOX, PIXEL_A = 300, 16, 1.25


def _images(n=N, box=BOX, seed=0):
    images = np.random.default_rng(seed).random((n, box, box), dtype=np.float32)
    images[:, 0, 0] = np.arange(n)  # each image carries its own index
    return images


def _params(n=N, seed=0):
    rng = np.random.default_rng(seed)
    angles = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], 1)
    u = rng.uniform(5000, 20000, n)
    ctf = {"defocus_u_A": u, "defocus_v_A": u - rng.uniform(0, 500, n), "defocus_angle_deg": rng.uniform(-90, 90, n),
           "voltage_kv": np.full(n, 300.0), "cs_mm": np.full(n, 2.7), "amplitude_contrast": np.full(n, 0.1)}
    return angles, rng.normal(0, 5, (n, 2)), ctf


@pytest.fixture
def star31(tmp_path):
    angles, origin, ctf = _params()
    path = tmp_path / "particles.star"
    write_particles(path, _images(), PIXEL_A, angles=angles, origin_A=origin, ctf_params=ctf, n_stacks=3)
    return path


def _edit(path, fn):
    """Rewrite a STAR file after ``fn(blocks)`` changed its tables."""
    blocks = starfile.read(path, always_dict=True)
    fn(blocks)
    starfile.write(blocks, path, float_format="%.6f")
    return path


def _set(path, table, **columns):
    """Rewrite a STAR file with ``columns`` of ``table`` set (added or replaced)."""
    def change(blocks):
        for label, value in columns.items():
            blocks[table][label] = value
    return _edit(path, change)


def _drop(path, table, column):
    """Rewrite a STAR file without ``column`` in ``table``."""
    def change(blocks):
        blocks[table] = blocks[table].drop(columns=column)
    return _edit(path, change)


# ---------------------------------------------------------------- flavours and round trips
def test_relion31_round_trip(star31):
    angles, origin, ctf = _params()
    with ParticleDataset(star31) as ds:
        assert len(ds) == N and ds.image_shape == (BOX, BOX) and ds.relion_format == "3.1"
        assert ds.has_poses and ds.has_shifts and ds.has_ctf and ds.pixel_size_A == pytest.approx(PIXEL_A)
        assert len(ds.stack_paths) == 3 and ds.mask.shape == (BOX, BOX) and bool(ds.mask.all())
        assert ds.optics["rlnImageSize"].tolist() == [BOX]
        batch = ds.read(0, N)
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (N, BOX, BOX)
    assert torch.equal(batch["images"], torch.from_numpy(_images()))
    assert torch.equal(batch["index"], torch.arange(N))
    # poses are xrai's R = A^T, A from an independent implementation of RELION's Euler matrix
    expected = np.transpose(euler_matrix(*angles.T), (0, 2, 1))
    assert np.allclose(batch["rotations"].numpy(), expected, atol=1e-5)
    assert np.allclose(ds.true_rotations().numpy(), expected, atol=1e-7)  # angles written with 6 decimals
    assert np.allclose(ds.true_rotations([3, 7]).numpy(), expected[[3, 7]], atol=1e-7)
    assert np.allclose(batch["shifts_A"].numpy(), origin, atol=1e-5)
    for key in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kv", "cs_mm", "amplitude_contrast"):
        assert np.allclose(batch[key].numpy(), ctf[key], rtol=1e-6, atol=1e-4), key
    assert np.allclose(batch["pixel_size_A"].numpy(), PIXEL_A)


def test_several_optics_groups(star31):
    def two_groups(blocks):
        optics = pd.concat([blocks["optics"]] * 2, ignore_index=True)
        optics["rlnOpticsGroup"] = [1, 2]
        optics["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
        optics["rlnVoltage"] = [300.0, 200.0]
        optics["rlnAmplitudeContrast"] = [0.1, 0.07]
        blocks["optics"] = optics
        blocks["particles"]["rlnOpticsGroup"] = np.arange(N) % 2 + 1

    ds = ParticleDataset(_edit(star31, two_groups))
    batch = ds.read(0, 10)
    assert batch["voltage_kv"].tolist() == [300.0, 200.0] * 5
    assert np.allclose(batch["amplitude_contrast"].numpy(), [0.1, 0.07] * 5)
    assert len(ds.optics) == 2 and ds.pixel_size_A == pytest.approx(PIXEL_A)


RELION30_STAR = """
# RELION 3.0 style: one table, per-particle optics
data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMagnification #9
_rlnDetectorPixelSize #10
_rlnAngleRot #11
_rlnAngleTilt #12
_rlnAnglePsi #13
_rlnOriginX #14
_rlnOriginY #15
000001@Particles/stack.mrcs mic1.mrc 10000.000000  9500.000000  30.000000 300.000000 2.700000 0.100000 50000.000000 5.000000  10.000000  20.000000  30.000000  1.500000 -2.000000
000003@Particles/stack.mrcs mic1.mrc 12000.000000 11000.000000 -30.000000 300.000000 2.700000 0.100000 50000.000000 5.000000  40.000000  50.000000  60.000000  0.000000  3.000000
000002@Particles/stack.mrcs mic2.mrc 14000.000000 14000.000000   0.000000 200.000000 2.000000 0.070000 50000.000000 5.000000 -70.000000 120.000000 -10.000000 -4.250000  0.500000
"""


def test_relion30_hand_written(tmp_path):
    (tmp_path / "Particles").mkdir()
    with mrcfile.new(tmp_path / "Particles" / "stack.mrcs") as mrc:
        mrc.set_data(_images(3))
    (tmp_path / "old.star").write_text(RELION30_STAR)
    ds = ParticleDataset(tmp_path / "old.star")
    assert ds.relion_format == "3.0" and len(ds) == 3 and ds.has_poses and ds.has_ctf
    assert ds.pixel_size_A == pytest.approx(1.0)  # 1e4 * 5 um / 50000
    assert len(ds.optics) == 2  # (300 kV, 2.7 mm, 0.1) and (200 kV, 2.0 mm, 0.07)
    b = ds.read(0, 3)
    assert b["images"][:, 0, 0].tolist() == [0.0, 2.0, 1.0]  # 1-based indices, in STAR order
    assert np.allclose(b["shifts_A"].numpy(), [[1.5, -2.0], [0.0, 3.0], [-4.25, 0.5]])  # pixels * 1 A
    assert b["voltage_kv"].tolist() == [300.0, 300.0, 200.0]
    assert np.allclose(b["cs_mm"].numpy(), [2.7, 2.7, 2.0]) and np.allclose(b["amplitude_contrast"].numpy(), [0.1, 0.1, 0.07])
    assert b["defocus_u_A"].tolist() == [10000.0, 12000.0, 14000.0]
    A = relion_euler_to_matrix(torch.tensor([10.0, 40.0, -70.0]), torch.tensor([20.0, 50.0, 120.0]),
                               torch.tensor([30.0, 60.0, -10.0]))
    assert torch.allclose(b["rotations"].double(), A.transpose(-1, -2), atol=1e-6)


def test_relion30_pixel_size_column_and_origin_in_pixels(tmp_path):
    write_particles(tmp_path / "p.star", _images(10), 2.0)
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    flat = blocks["particles"].drop(columns="rlnOpticsGroup")
    flat["rlnImagePixelSize"] = 2.0
    flat["rlnOriginX"], flat["rlnOriginY"] = 1.0, -0.5
    starfile.write(flat, tmp_path / "old.star")
    ds = ParticleDataset(tmp_path / "old.star")
    assert ds.relion_format == "3.0" and ds.pixel_size_A == 2.0 and not ds.has_ctf and not ds.has_poses
    assert np.allclose(ds.read(0, 2)["shifts_A"].numpy(), [[2.0, -1.0]] * 2)


def test_mrc_stacks_single_images_and_dtypes(tmp_path):
    images = _images(4)
    with mrcfile.new(tmp_path / "stack.mrc") as mrc:  # a stack named .mrc
        mrc.set_data(images[:3].astype(np.float16))
    with mrcfile.new(tmp_path / "single.mrc") as mrc:  # one 2D image, named without '@'
        mrc.set_data((images[3] * 100).astype(np.int16))
    particles = pd.DataFrame({"rlnImageName": ["1@stack.mrc", "3@stack.mrc", "single.mrc"], "rlnImagePixelSize": 1.0})
    starfile.write(particles, tmp_path / "p.star")
    b = ParticleDataset(tmp_path / "p.star").read(0, 3)["images"]
    assert b.dtype == torch.float32
    assert torch.allclose(b[:2], torch.from_numpy(images[[0, 2]].astype(np.float16).astype(np.float32)))
    assert torch.equal(b[2], torch.from_numpy((images[3] * 100).astype(np.int16).astype(np.float32)))


def test_absolute_paths_and_current_folder_fallback(tmp_path, monkeypatch):
    write_particles(tmp_path / "p.star", _images(5), 1.0)
    absolute = _set(tmp_path / "p.star", "particles", rlnImageName=[f"{i + 1}@{tmp_path / 'p_000.mrcs'}" for i in range(5)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "abs.star").write_text(absolute.read_text())
    assert ParticleDataset(elsewhere / "abs.star").read(4, 5)["images"][0, 0, 0] == 4
    # relative to the current folder (RELION's project folder) when not beside the STAR file
    write_particles(tmp_path / "rel.star", _images(5), 1.0)
    (elsewhere / "rel.star").write_text((tmp_path / "rel.star").read_text())
    monkeypatch.chdir(tmp_path)
    ds = ParticleDataset(elsewhere / "rel.star")
    monkeypatch.chdir(elsewhere)  # resolved at open: a later change of folder does not matter
    assert ds.read(2, 3)["images"][0, 0, 0] == 2 and ds.stack_paths[0].is_absolute()


def test_particles_without_poses_or_ctf(tmp_path):
    write_particles(tmp_path / "p.star", _images(20), 1.0)
    _set(tmp_path / "p.star", "particles", rlnAnglePsi=10.0)  # 2D classification's in-plane angle alone: no pose
    ds = ParticleDataset(tmp_path / "p.star")
    assert not ds.has_poses and not ds.has_shifts and not ds.has_ctf
    assert set(ds.read(0, 4)) == {"images", "index", "pixel_size_A"}
    with pytest.raises(XraiError, match="no poses"):
        ds.true_rotations()


# ---------------------------------------------------------------- one-pass orders, workers, memory
def test_sequential_and_shuffled_passes(star31):
    ds = ParticleDataset(star31, block_rows=16, shuffle_buffer_mb=16 * 4 * BOX * BOX * 4 / 2**20)  # 4 blocks a window
    seq = list(ds.iter_batches(64, shuffle=False))
    assert torch.equal(torch.cat([b["index"] for b in seq]), torch.arange(N)) and ds.n_batches(64) == len(seq) == 5
    for b in seq:
        assert torch.equal(b["images"][:, 0, 0].long(), b["index"])
    order = [torch.cat([b["index"] for b in ds.iter_batches(32, shuffle=True, seed=1, epoch=e)]) for e in (0, 0, 1)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    for o in order:
        assert torch.equal(o.sort().values, torch.arange(N))  # every image once per epoch
    batches = list(ds.iter_batches(32, shuffle=True, seed=1, epoch=0))
    for b in batches:
        assert torch.equal(b["images"][:, 0, 0].long(), b["index"])
        assert torch.allclose(b["rotations"], ds.true_rotations(b["index"]).float(), atol=1e-6)
    assert len(list(ds.iter_batches(32, shuffle=True, drop_last=True))) == ds.n_batches(32, drop_last=True) == N // 32


def test_skip_resumes_without_reading(star31, monkeypatch):
    ds = ParticleDataset(star31, block_rows=16, shuffle_buffer_mb=16 * 4 * BOX * BOX * 4 / 2**20)
    full = list(ds.iter_batches(20, shuffle=True, seed=4, epoch=2))
    read = []
    original = ds._read_rows
    monkeypatch.setattr(ds, "_read_rows", lambda a, b: read.append(b - a) or original(a, b))
    resumed = list(ds.iter_batches(20, shuffle=True, seed=4, epoch=2, skip=10))
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in full[10:]]
    assert sum(read) < N  # whole windows before the resume point were not read


def test_pickled_dataset_reads_in_a_worker(star31):
    ds = ParticleDataset(star31)
    ds.read(0, 2)  # opens stacks in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.read(100, 110)["images"], ds.read(100, 110)["images"])
    loader = torch.utils.data.DataLoader(_Batches(clone), batch_size=None, num_workers=1)
    assert torch.equal(next(iter(loader))["images"], ds.read(0, 8)["images"])


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return self.ds.iter_batches(8, shuffle=False)


def test_stacks_are_memory_mapped_and_bounded(star31):
    ds = ParticleDataset(star31, max_open_stacks=2)
    for a in range(0, N, 50):
        ds.read(a, a + 50)
    assert len(ds._stacks) <= 2 and all(isinstance(m.data, np.memmap) for m in ds._stacks.values())
    ds.close()
    assert not ds._stacks


# ---------------------------------------------------------------- bad input: one clear line each
def _one_line_error(path, match, **kwargs):
    with pytest.raises(XraiError, match=match) as info:
        ParticleDataset(path, **kwargs)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    return str(info.value)


def test_missing_star_and_stack(tmp_path, star31):
    _one_line_error(tmp_path / "nope.star", "STAR file not found")
    (star31.parent / "particles_001.mrcs").unlink()
    _one_line_error(star31, r"stack file 'particles_001.mrcs' not found")


def test_index_past_the_end_of_a_stack(star31):
    star31.write_text(star31.read_text().replace("000100@particles_000.mrcs", "000101@particles_000.mrcs"))
    msg = _one_line_error(star31, r"image 101@particles_000.mrcs is past the end")
    assert "holds 100 image(s)" in msg


def test_star_lacking_what_the_reader_needs(tmp_path, star31):
    _drop(star31, "particles", "rlnDefocusU")  # fine: no CTF
    assert not ParticleDataset(star31).has_ctf
    no_names = tmp_path / "nonames.star"
    starfile.write(pd.DataFrame({"rlnAngleRot": [1.0], "rlnImagePixelSize": [1.0]}), no_names)
    _one_line_error(no_names, "no particle table: expected a loop with rlnImageName")
    _drop(star31, "optics", "rlnImagePixelSize")
    _one_line_error(star31, "no pixel size")
    _set(star31, "particles", rlnDetectorPixelSize=5.0, rlnMagnification=40000.0)  # per particle: read
    assert ParticleDataset(star31).pixel_size_A == pytest.approx(1.25)
    flat = tmp_path / "flat.star"
    starfile.write(pd.DataFrame({"rlnImageName": ["1@particles_000.mrcs"]}), flat)
    (tmp_path / "particles_000.mrcs").write_bytes((star31.parent / "particles_000.mrcs").read_bytes())
    _one_line_error(flat, r"no pixel size: .*rlnDetectorPixelSize and rlnMagnification")
    _drop(star31, "particles", "rlnOriginYAngst")
    _one_line_error(star31, "the particle table has rlnOriginXAngst but not rlnOriginYAngst")
    empty = tmp_path / "empty.star"
    empty.write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnImagePixelSize #2\n")
    _one_line_error(empty, "the particle table is empty")


def test_ctf_without_voltage_and_unknown_optics_group(star31):
    _drop(star31, "optics", "rlnVoltage")
    _one_line_error(star31, r"rlnDefocusU but the optics table lacks \['rlnVoltage'\]")
    _set(star31, "particles", rlnOpticsGroup=2)
    _one_line_error(star31, r"optics group\(s\) \[2\] that the optics table lacks")


def test_malformed_star_and_bad_values(tmp_path, star31):
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnAngleRot\n1@a.mrcs 1 2 3\n")
    _one_line_error(bad, "not a readable STAR file")
    text = star31.read_text().replace("000002@particles_000.mrcs", "two@particles_000.mrcs")
    star31.write_text(text)
    _one_line_error(star31, r"rlnImageName 'two@particles_000.mrcs' \(row 2\): expected 'index@stack.mrcs'")


def test_corrupt_stacks(star31):
    stack = star31.parent / "particles_002.mrcs"
    raw = stack.read_bytes()
    stack.write_bytes(raw[:-500])
    _one_line_error(star31, r"particles_002.mrcs is truncated: its header promises 100 images of 16x16")
    stack.write_bytes(b"not an mrc file")
    _one_line_error(star31, r"particles_002.mrcs is not a valid MRC file")


def test_nan_images_are_refused_at_read(star31):
    stack = star31.parent / "particles_001.mrcs"
    with mrcfile.open(stack, "r+") as mrc, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN we put there
        data = mrc.data.copy()
        data[5, 3, 3] = np.nan
        mrc.set_data(data)
    ds = ParticleDataset(star31)
    ds.read(0, 100)
    with pytest.raises(XraiError, match=r"images \[100, 200\) contain NaN or infinite values \(first bad image: 105\)"):
        ds.read(100, 200)


def test_mixed_image_sizes_and_pixel_sizes(tmp_path, star31):
    with mrcfile.new(star31.parent / "particles_002.mrcs", overwrite=True) as mrc:
        mrc.set_data(_images(100, box=20))
    _one_line_error(star31, "mixed image sizes")
    write_particles(tmp_path / "p.star", _images(4), 1.0)

    def two_pixel_sizes(blocks):
        blocks["optics"] = pd.concat([blocks["optics"]] * 2, ignore_index=True)
        blocks["optics"]["rlnOpticsGroup"] = [1, 2]
        blocks["optics"]["rlnImagePixelSize"] = [1.0, 1.1]
        blocks["particles"]["rlnOpticsGroup"] = [1, 2, 1, 2]

    _one_line_error(_edit(tmp_path / "p.star", two_pixel_sizes), "optics groups disagree on the pixel size")
    _set(tmp_path / "p.star", "optics", rlnImagePixelSize=1.0, rlnImageSize=32)
    _one_line_error(tmp_path / "p.star", r"rlnImageSize \[32\] but the stacks hold 16x16 images")


# ---------------------------------------------------------------- one entry point
def test_open_dataset_picks_the_reader(tmp_path, star31):
    assert isinstance(open_dataset(star31), ParticleDataset)
    h5 = tmp_path / "x.h5"
    write_dataset(h5, np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.tile([1.0, 0, 0, 0], (4, 1)), np.zeros((4, 4, 3)))
    assert isinstance(open_dataset(h5), DiffractionDataset)
    renamed = tmp_path / "x.data"
    renamed.write_bytes(h5.read_bytes())  # HDF5 recognised by its signature whatever the suffix
    assert isinstance(open_dataset(renamed), DiffractionDataset)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(XraiError, match="unknown dataset format: expected a RELION .star file or an HDF5 file"):
        open_dataset(tmp_path / "x.txt")
    with pytest.raises(XraiError, match="dataset file not found"):
        open_dataset(tmp_path / "missing.mrcs")
