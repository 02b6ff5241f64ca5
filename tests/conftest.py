"""Fixtures shared by the test files: the repository, the shared PDB structures, the test-scale config."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
