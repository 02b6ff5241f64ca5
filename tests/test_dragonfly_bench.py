"""bench/dragonfly.py's file conversions (no Dragonfly binary needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from xrai.data.hdf5 import write_dataset

BENCH = Path(__file__).resolve().parents[1] / "bench" / "dragonfly.py"


def _load():
    spec = importlib.util.spec_from_file_location("dragonfly_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_emc(path: Path) -> np.ndarray:
    """Dense ``(N, P)`` counts of a sparse binary emc file (Dragonfly's parse_binarydataset)."""
    raw = np.fromfile(path, dtype=np.int32)
    n, n_pix, kind = raw[:3]
    assert kind == 0
    body = raw[256:]
    ones, multi = body[:n], body[n:2 * n]
    rest = body[2 * n:]
    place_ones, rest = rest[:ones.sum()], rest[ones.sum():]
    place_multi, count_multi = rest[:multi.sum()], rest[multi.sum():]
    assert len(count_multi) == multi.sum()
    dense = np.zeros((n, n_pix), dtype=np.int64)
    o = m = 0
    for d in range(n):
        dense[d, place_ones[o:o + ones[d]]] = 1
        dense[d, place_multi[m:m + multi[d]]] = count_multi[m:m + multi[d]]
        o += ones[d]
        m += multi[d]
    return dense


def test_photons_file_round_trip(tmp_path: Path) -> None:
    df = _load()
    rng = np.random.default_rng(0)
    images = rng.poisson(0.8, size=(7, 4, 5)).astype(np.float32)
    images[0, 0, 0] = 5.0  # a multi-photon pixel
    images[3] = 0.0
    images[3, 2, 1] = 1.0  # an image with one photon
    q = torch.from_numpy(rng.normal(size=(4, 5, 3)).astype(np.float32)) * 0.01
    orient = np.tile([1.0, 0.0, 0.0, 0.0], (7, 1))
    write_dataset(tmp_path / "d.h5", images, orient, q)
    assert df.write_photons(tmp_path / "p.emc", tmp_path / "d.h5") == 7
    np.testing.assert_array_equal(_read_emc(tmp_path / "p.emc"), images.reshape(7, -1))


def test_rotation_is_dragonflys_transpose() -> None:
    """Dragonfly's make_rot_quat (src/interp.c), transcribed: the pose written is that matrix."""
    df = _load()
    q = np.random.default_rng(1).normal(size=(6, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q0, q1, q2, q3 = q.T
    rot = np.stack([
        1 - 2 * (q2 * q2 + q3 * q3), 2 * (q1 * q2 + q0 * q3), 2 * (q1 * q3 - q0 * q2),
        2 * (q1 * q2 - q0 * q3), 1 - 2 * (q1 * q1 + q3 * q3), 2 * (q0 * q1 + q2 * q3),
        2 * (q0 * q2 + q1 * q3), 2 * (q2 * q3 - q0 * q1), 1 - 2 * (q1 * q1 + q2 * q2),
    ], axis=-1).reshape(-1, 3, 3)
    R = df.dragonfly_rotations(q, np.arange(6)).numpy()
    np.testing.assert_allclose(R, rot, atol=1e-12)


def test_crop_inverts_pad() -> None:
    df = _load()
    v = np.random.default_rng(2).random((8, 8, 8))
    for size in (11, 12, 13):
        big = df.pad(v, size)
        np.testing.assert_array_equal(df.crop(big, size, 8), v)
        assert big[size // 2, size // 2, size // 2] == v[4, 4, 4]  # the origins coincide


def test_stage_config_repeats_its_random_start_and_scales_only_when_asked(tmp_path: Path) -> None:
    """Each stage's ``[emc]`` section starts from Dragonfly's fixed seed (repeatable runs); a scale file is passed on
    only with ``need_scaling``, and a start model whenever one is given."""
    df = _load()

    def lines(**kw) -> dict[str, str]:
        df.write_config(tmp_path / "c.ini", "p.emc", "q.dat", 49, "out", "1.4 3", **kw)
        rows = (tmp_path / "c.ini").read_text().splitlines()
        assert rows[0] == "[emc]"
        return dict(r.split(" = ", 1) for r in rows[1:])

    first = lines(need_scaling=0)
    assert first["fixed_seed"] == "1" and first["need_scaling"] == "0"
    assert "start_model_file" not in first and "scale_file" not in first
    later = lines(need_scaling=0, start_model=Path("o.h5"), scale_file=Path("o.h5"))
    assert later["start_model_file"] == "o.h5" and "scale_file" not in later
    assert lines(need_scaling=1, start_model=Path("o.h5"), scale_file=Path("o.h5"))["scale_file"] == "o.h5"
