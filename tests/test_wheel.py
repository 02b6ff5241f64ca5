"""The package works installed from a wheel, outside any source checkout (issue 18).

The wheel is built from a copy of the sources (nothing is written into the checkout) and
installed without dependencies into a fresh virtual environment, which sees the test
environment's packages (torch, h5py, ...) through a ``.pth`` line; ``xrai`` then runs in a
folder that is no checkout, with no ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list, cwd: Path, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """``(venv bin folder, environment)`` of a fresh venv holding xrai from its wheel only."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    src = tmp / "src_copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         tmp, env)
    wheel = next((tmp / "dist").glob("xrai-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "-q", wheel],
         tmp, env)
    return venv / "bin", env | {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def test_the_wheel_ships_the_schema_and_runs_outside_a_checkout(installed, tmp_path, pdb_mirror):
    bin_dir, env = installed
    where = _run([bin_dir / "python", "-c", "import xrai.config as c; print(c.__file__); print(c.SCHEMA_PATH)"],
                 tmp_path, env).stdout.split()
    assert all(str(REPO) not in p and str(bin_dir.parent) in p for p in where), where  # the wheel's copy
    assert Path(where[1]).is_file()
    assert "example: xrai simulate" in _run([bin_dir / "xrai", "simulate", "--help"], tmp_path, env).stdout
    config = tmp_path / "test.yaml"
    shutil.copy(REPO / "config" / "test.yaml", config)
    plan = _run([bin_dir / "xrai", "simulate", "--config", config, "--plan"], tmp_path, env).stdout
    assert "train_2048.h5" in plan
    _run([bin_dir / "xrai", "fetch", "--config", config, "--protein", "2CEX_A", "--out", "2CEX_A.cif"],
         tmp_path, env | {"XRAI_PDB_MIRROR": str(pdb_mirror)})
    assert (tmp_path / "2CEX_A.cif").stat().st_size > 0 and (tmp_path / "2CEX_A.json").is_file()
