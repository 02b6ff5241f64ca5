"""Fixtures shared by the test files: the repository, the shared PDB structures, the test-scale config."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: expensive fixtures that tests share; each lives in one test file, and ``make test`` runs two
#: pytest-xdist workers with ``--dist loadfile``, so each is built once
SHARED_FIXTURES = ("pipeline_dir", "cryoem_pipeline_dir", "slurm_cluster")


def pytest_collection_modifyitems(config, items) -> None:
    """The longest tests first (whole pipelines, the Slurm cluster, then the other slow ones), so that no
    worker starts one near the end while the other idles; the order within a file is kept."""
    def rank(item) -> int:
        if any(name in getattr(item, "fixturenames", ()) for name in SHARED_FIXTURES):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (holds Snakefile, config.yaml, config/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def pdb_mirror() -> Path:
    """Directory with the shared structures (2cex.pdb, 4ake.pdb): ``$XRAI_PDB_MIRROR`` or ``<repo>/../shared/pdb``."""
    env = os.environ.get("XRAI_PDB_MIRROR", "").strip()
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "pdb"
    if not (path / "2cex.pdb").is_file():
        pytest.skip(f"shared PDB structures not found: no 2cex.pdb in {path} "
                    "(set XRAI_PDB_MIRROR to a directory holding 2cex.pdb)")
    return path.resolve()


@functools.lru_cache(maxsize=1)
def _load_test_config() -> dict:
    from xrai.config import load_config

    return load_config(REPO_ROOT / "config" / "test.yaml")


@pytest.fixture
def test_config() -> dict:
    """``config/test.yaml`` loaded and validated by ``xrai.config.load_config`` (a fresh copy per test)."""
    return copy.deepcopy(_load_test_config())


@pytest.fixture(scope="session")
def test_scale_data(tmp_path_factory, pdb_mirror) -> dict:
    """2CEX chain A at the test scale, made through the ``xrai`` CLI: structure, datasets, true intensity.

    ``config/test.yaml``: 32 px, 2048 train / 512 test noise-free images (a few seconds).
    Returns ``{"config": path of the YAML used, "cfg": dict, "dir", "structure", "train", "test",
    "intensity"}`` (paths). Shared by every test file that needs simulated data; treat it as read-only.
    """
    import yaml

    from xrai.cli import main

    d = tmp_path_factory.mktemp("test_scale")
    cfg = copy.deepcopy(_load_test_config())
    cfg["structure"]["mirror"] = str(pdb_mirror)
    config = d / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sim = cfg["simulation"]
    paths = {"config": config, "cfg": cfg, "dir": d, "structure": d / "2CEX_A.cif",
             "train": d / f"train_{sim['train_sizes'][0]}.h5", "test": d / f"test_{sim['test_size']}.h5",
             "intensity": d / "intensity.h5"}
    steps = [
        ["fetch", "--protein", "2CEX_A", "--out", str(paths["structure"])],
        ["simulate", "--structure", str(paths["structure"]), "--split", "train",
         "--n-images", str(sim["train_sizes"][0]), "--out", str(paths["train"])],
        ["simulate", "--structure", str(paths["structure"]), "--split", "test",
         "--n-images", str(sim["test_size"]), "--out", str(paths["test"])],
        ["reference", "--structure", str(paths["structure"]), "--intensity", str(paths["intensity"])],
    ]
    for argv in steps:
        assert main([argv[0], "--config", str(config), *argv[1:]]) == 0, argv
    return paths


@pytest.fixture(scope="session")
def chain_a_cif(pdb_mirror, tmp_path_factory) -> Path:
    """2CEX chain A as written by ``xrai fetch`` (mmCIF of the selected atoms)."""
    from xrai.structure import load_structure

    path = tmp_path_factory.mktemp("structures") / "2CEX_A.cif"
    load_structure(pdb_mirror / "2cex.pdb", chains=["A"]).make_mmcif_document().write_file(str(path))
    return path


@pytest.fixture(scope="session")
def particle_sets(tmp_path_factory) -> dict:
    """An asymmetric blob volume (smooth: the known-pose test); tests/cryoem_sets.py's sets, 0 dB."""
    import cryoem_sets
    from test_relion_reference import blob_volume

    rng = np.random.default_rng(3)
    return cryoem_sets.particle_sets(tmp_path_factory.mktemp("blobs"), blob_volume(cryoem_sets.BOX, rng, n_blobs=8),
                                     rng)


@pytest.fixture(scope="session")
def adk_sets(tmp_path_factory, pdb_mirror) -> dict:
    """4AKE's electrostatic potential (the simulator's, from the shared PDB file) at 32 px, 3.2 Å."""
    import cryoem_sets

    from xrai.cryoem.potential import potential_from_file

    rng = np.random.default_rng(3)
    vol_zyx = potential_from_file(pdb_mirror / "4ake.pdb", cryoem_sets.BOX, cryoem_sets.PIXEL_A,
                                 cryoem_sets.BFACTOR)
    return cryoem_sets.particle_sets(tmp_path_factory.mktemp("adk"), vol_zyx, rng)
