"""DiffractionDataset: validation errors, reading, one-pass orders (sequential / shuffled / resume), shards, skopi files."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

from xrai.data.hdf5 import DiffractionDataset, write_dataset, write_sharded_master
from xrai.errors import XraiError

N, H, W = 1000, 8, 8


def _arrays(n=N):
    rng = np.random.default_rng(0)
    images = rng.random((n, H, W), dtype=np.float32)
    images[:, 0, 0] = np.arange(n)  # each image carries its own index
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    q = rng.normal(size=(H, W, 3)) * 0.05
    return images, quats, q


@pytest.fixture
def dataset_file(tmp_path):
    images, quats, q = _arrays()
    path = tmp_path / "set.h5"
    write_dataset(path, images, quats, q, chunk_rows=64, attrs={"seed": 3, "config": {"a": 1}})
    return path


def test_read_and_metadata(dataset_file):
    images, quats, q = _arrays()
    ds = DiffractionDataset(dataset_file)
    assert len(ds) == N and ds.image_shape == (H, W) and ds.block_rows == 64
    assert ds.pixel_position_reciprocal.dtype == torch.float32
    assert torch.allclose(ds.pixel_position_reciprocal, torch.from_numpy(q).float())
    assert ds.attrs["seed"] == 3 and ds.attrs["config"] == {"a": 1}
    batch = ds.read(990, 1010)  # clipped at the end
    assert batch["images"].shape == (10, H, W) and batch["images"].dtype == torch.float32
    assert batch["orientations"].shape == (10, 4)
    assert torch.equal(batch["index"], torch.arange(990, 1000))
    assert torch.equal(batch["images"], torch.from_numpy(images[990:]))
    # picklable for worker processes (the HDF5 handle reopens lazily)
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2.read(0, 3)["images"], batch["images"].new_tensor(images[:3]))


def test_sequential_pass_is_in_file_order(dataset_file):
    ds = DiffractionDataset(dataset_file)
    batches = list(ds.iter_batches(48, shuffle=False))
    idx = torch.cat([b["index"] for b in batches])
    assert torch.equal(idx, torch.arange(N))
    assert [len(b["index"]) for b in batches][-1] == N % 48
    assert len(list(ds.iter_batches(48, shuffle=False, drop_last=True))) == N // 48 == ds.n_batches(48, drop_last=True)
    for b in batches:
        assert torch.equal(b["images"][:, 0, 0].long(), b["index"])


def test_shuffled_pass_is_a_reproducible_permutation_with_bounded_memory(dataset_file, monkeypatch):
    ds = DiffractionDataset(dataset_file, shuffle_buffer_mb=4 * 64 * H * W * 4 / 2**20)  # 4 chunks per window
    rows_in_memory = []
    original = ds._read_rows
    monkeypatch.setattr(ds, "_read_rows", lambda a, b: rows_in_memory.append(b - a) or original(a, b))

    def order(seed, epoch, skip=0):
        out = []
        for b in ds.iter_batches(50, shuffle=True, seed=seed, epoch=epoch, skip=skip):
            assert torch.equal(b["images"][:, 0, 0].long(), b["index"])  # images stay with their index
            out.append(b["index"])
        return torch.cat(out)

    first = order(0, 0)
    assert torch.equal(first.sort().values, torch.arange(N))  # every image exactly once
    assert not torch.equal(first, torch.arange(N))
    assert torch.equal(order(0, 0), first)  # reproducible for (seed, epoch)
    assert not torch.equal(order(0, 1), first) and not torch.equal(order(1, 0), first)
    # reads are whole chunks, at most 4 chunks held per window
    assert max(rows_in_memory) <= 64
    # well mixed: images of the first batch come from several chunks
    assert len(set((first[:50] // 64).tolist())) >= 3
    # resume: skipping k batches gives the rest of the same order, without reading skipped windows
    rows_in_memory.clear()
    assert torch.equal(order(0, 0, skip=13), first[13 * 50:])
    assert sum(rows_in_memory) < N


def test_true_rotations_read_only_the_orientations(dataset_file, monkeypatch):
    from xrai.rotations import quaternion_to_matrix

    ds = DiffractionDataset(dataset_file)
    expected = quaternion_to_matrix(ds.read(0, len(ds))["orientations"].double())
    monkeypatch.setattr(DiffractionDataset, "read", lambda *a, **k: pytest.fail("images were read"))
    torch.testing.assert_close(ds.true_rotations(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.true_rotations([3, 0]), expected[[3, 0]], atol=1e-6, rtol=0)
    with pytest.raises(XraiError, match=f"{dataset_file.name}.*out of range"):
        ds.true_rotations([len(ds)])


def test_errors_name_the_file(tmp_path, dataset_file):
    with pytest.raises(XraiError, match="missing.h5: dataset file not found"):
        DiffractionDataset(tmp_path / "missing.h5")
    bad = tmp_path / "text.h5"
    bad.write_text("not hdf5")
    with pytest.raises(XraiError, match="text.h5: not a readable HDF5 file"):
        DiffractionDataset(bad)
    images, quats, q = _arrays(10)
    with h5py.File(tmp_path / "nokeys.h5", "w") as f:
        f["images"] = images
    with pytest.raises(XraiError, match=r"nokeys.h5: not a diffraction dataset: missing \['orientations', 'pixel_position_reciprocal'\]"):
        DiffractionDataset(tmp_path / "nokeys.h5")
    with h5py.File(tmp_path / "shape.h5", "w") as f:
        f["images"], f["orientations"], f["pixel_position_reciprocal"] = images, quats[:, :3], q
    with pytest.raises(XraiError, match=r"'orientations' must have shape \(10, 4\)"):
        DiffractionDataset(tmp_path / "shape.h5")
    with h5py.File(tmp_path / "q.h5", "w") as f:
        f["images"], f["orientations"], f["pixel_position_reciprocal"] = images, quats, q[:4]
    with pytest.raises(XraiError, match="'pixel_position_reciprocal' must have shape"):
        DiffractionDataset(tmp_path / "q.h5")


def test_nan_images_are_reported_with_their_range(tmp_path):
    images, quats, q = _arrays(300)
    images[137, 2, 3] = np.nan
    write_dataset(tmp_path / "nan.h5", images, quats, q, chunk_rows=64)
    ds = DiffractionDataset(tmp_path / "nan.h5")
    assert torch.isfinite(ds.read(0, 100)["images"]).all()
    with pytest.raises(XraiError, match=r"nan.h5: images \[100, 200\) contain NaN or infinite values \(first bad image: 137\)"):
        ds.read(100, 200)
    with pytest.raises(XraiError, match=r"first bad image: 137"):
        list(ds.iter_batches(32, shuffle=True, seed=0))


def test_sharded_master_reads_as_one_dataset(tmp_path):
    images, quats, q = _arrays()
    parts = [(0, 400), (400, 800), (800, N)]
    shard_dir = tmp_path / "set_shards"
    shard_dir.mkdir()
    paths = []
    for k, (a, b) in enumerate(parts):
        paths.append(shard_dir / f"shard{k:03d}.h5")
        write_dataset(paths[-1], images[a:b], quats[a:b], q, chunk_rows=64)
    write_sharded_master(tmp_path / "set.h5", paths, attrs={"n_images": N})
    ds = DiffractionDataset(tmp_path / "set.h5")
    assert len(ds) == N and ds.attrs["n_images"] == N and ds.block_rows == 64
    assert torch.equal(ds.read(350, 850)["images"], torch.from_numpy(images[350:850]))
    idx = torch.cat([b["index"] for b in ds.iter_batches(100, shuffle=True, seed=2)])
    assert torch.equal(idx.sort().values, torch.arange(N))
    # the folder moves as a whole (shards are referenced relative to the master)
    moved = tmp_path / "moved"
    moved.mkdir()
    (shard_dir).rename(moved / "set_shards")
    (tmp_path / "set.h5").rename(moved / "set.h5")
    assert torch.equal(DiffractionDataset(moved / "set.h5").read(0, 5)["images"], torch.from_numpy(images[:5]))
    (moved / "set_shards" / "shard001.h5").unlink()
    with pytest.raises(XraiError, match="shard001.h5 of this sharded dataset is missing"):
        DiffractionDataset(moved / "set.h5")


def test_reads_a_skopi_style_file(tmp_path):
    """Images as one-panel stacks (N, 1, H, W) and pixel q in m^-1 with a panel axis, as skopi scripts save them."""
    images, quats, q = _arrays(50)
    with h5py.File(tmp_path / "skopi.h5", "w") as f:
        f["images"] = images[:, None].astype(np.float64)
        f["orientations"] = quats
        f["pixel_position_reciprocal"] = q[None] * 1e10
    ds = DiffractionDataset(tmp_path / "skopi.h5")
    assert ds.image_shape == (H, W)
    assert torch.allclose(ds.pixel_position_reciprocal, torch.from_numpy(q).float(), rtol=1e-6)
    assert torch.equal(ds.read(0, 50)["images"], torch.from_numpy(images))


def test_mask_is_read_and_checked(tmp_path):
    import h5py

    from xrai.data.hdf5 import DiffractionDataset
    from xrai.errors import XraiError

    def write(path, mask=None):
        with h5py.File(path, "w") as f:
            f["images"] = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
            f["orientations"] = np.tile([1.0, 0, 0, 0], (3, 1))
            f["pixel_position_reciprocal"] = np.zeros((4, 5, 3))
            if mask is not None:
                f["mask"] = mask
        return path

    assert bool(DiffractionDataset(write(tmp_path / "a.h5")).mask.all())
    m = np.ones((4, 5), np.uint8)
    m[1:3, 2] = 0
    ds = DiffractionDataset(write(tmp_path / "b.h5", m))
    assert ds.mask.dtype == torch.bool and int((~ds.mask).sum()) == 2
    with pytest.raises(XraiError, match="'mask' must have shape"):
        DiffractionDataset(write(tmp_path / "c.h5", np.ones((5, 4))))
    with pytest.raises(XraiError, match="excludes every pixel"):
        DiffractionDataset(write(tmp_path / "d.h5", np.zeros((4, 5))))
    assert float(DiffractionDataset(tmp_path / "a.h5").background.abs().max()) == 0.0
    path = write(tmp_path / "e.h5")
    with h5py.File(path, "a") as f:
        f["background"] = np.full((4, 5), -1.0)
    with pytest.raises(XraiError, match="'background' must be finite and non-negative"):
        DiffractionDataset(path)
