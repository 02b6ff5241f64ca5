"""Reference density and true intensity: FFT consistency, an independent real-space route, centring, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrai.cli import main
from xrai.errors import XraiError
from xrai.io import read_mrc
from xrai.volume import ReciprocalGrid, read_volume_h5
from xrai.xray.density import amplitudes_from_density, reference_density, true_intensity
from xrai.xray.formfactors import electron_count
from xrai.xray.geometry import reciprocal_grid


@pytest.fixture(scope="module")
def chain_a(pdb_mirror):
    from xrai.structure import load_structure

    st = load_structure(pdb_mirror / "2cex.pdb", chains=["A"])
    atoms = [a for ch in st[0] for r in ch for a in r]
    return np.array([a.pos.tolist() for a in atoms]), [a.element.name for a in atoms]


@pytest.fixture(scope="module")
def grid():
    # config/test.yaml: 32^3 grid up to the 32-pixel detector's corner (voxel 3.85 A, box 123 A)
    from xrai.config import REPO_ROOT, load_config

    return reciprocal_grid(load_config(REPO_ROOT / "config" / "test.yaml"))


@pytest.fixture(scope="module")
def volumes(chain_a, grid):
    pos, elements = chain_a
    intensity = true_intensity(pos, elements, grid).numpy()
    return intensity, reference_density(pos, elements, grid), reference_density(pos, elements, grid, method="gaussian")


def _inside(grid: ReciprocalGrid) -> np.ndarray:
    # the detector's q range: shells up to q_max (the even grid's unpaired Nyquist planes lie outside)
    return grid.radius_index().numpy() <= grid.size // 2 - 1


def test_fft_of_the_reference_density_gives_the_true_amplitudes(volumes, grid, chain_a):
    intensity, rho, _ = volumes
    amp = np.sqrt(intensity)
    inside = _inside(grid)
    fft_amp = amplitudes_from_density(rho, grid)
    assert np.linalg.norm(fft_amp[inside] - amp[inside]) / np.linalg.norm(amp[inside]) < 1e-6
    # F(0) = number of electrons = integral of the density
    electrons = sum(electron_count(e) for e in chain_a[1])
    assert amp[(grid.size // 2,) * 3] == pytest.approx(electrons, rel=1e-9)
    assert rho.sum() * grid.voxel_size**3 == pytest.approx(electrons, rel=1e-6)


def test_real_space_gaussian_sum_agrees(volumes, grid):
    """An independent route: Waasmaier-Kirfel Gaussians summed in real space, band-limited to the grid."""
    intensity, rho, rho_gauss = volumes
    amp = np.sqrt(intensity)
    inside = _inside(grid)
    gauss_amp = amplitudes_from_density(rho_gauss, grid)
    assert np.corrcoef(gauss_amp[inside], amp[inside])[0, 1] > 0.999
    low = grid.radius_index().numpy() < 5
    assert np.linalg.norm(gauss_amp[low] - amp[low]) / np.linalg.norm(amp[low]) < 2e-3
    assert np.corrcoef(rho_gauss.ravel(), rho.ravel())[0, 1] > 0.999


def test_density_is_centred_like_the_simulation(volumes, grid):
    _, rho, _ = volumes
    r = (np.arange(grid.size) - grid.size // 2) * grid.voxel_size
    weights = rho.sum()
    centroid = [float((rho.sum(axis=tuple(j for j in range(3) if j != i)) * r).sum() / weights) for i in range(3)]
    assert np.abs(centroid).max() < 0.25 * grid.voxel_size
    assert np.unravel_index(np.argmax(np.abs(rho)), rho.shape) != (0, 0, 0)


def test_molecule_larger_than_the_box_is_refused(chain_a):
    pos, elements = chain_a
    with pytest.raises(XraiError, match="reconstruction box is only"):
        reference_density(pos, elements, ReciprocalGrid(8, 0.12))


def test_reference_cli_writes_mrc_and_volumes(tmp_path, pdb_mirror, grid, volumes, repo_root):
    from xrai.structure import load_structure

    cif = tmp_path / "2CEX_A.cif"
    load_structure(pdb_mirror / "2cex.pdb", chains=["A"]).make_mmcif_document().write_file(str(cif))
    density, intensity = tmp_path / "ref" / "density.mrc", tmp_path / "ref" / "intensity.h5"
    assert main(["reference", "--config", str(repo_root / "config" / "test.yaml"), "--structure", str(cif),
                 "--density", str(density), "--intensity", str(intensity)]) == 0
    rho, voxel = read_mrc(density)
    assert voxel == pytest.approx(grid.voxel_size, rel=1e-5)
    assert np.allclose(rho, volumes[1], rtol=1e-4, atol=1e-6 * np.abs(volumes[1]).max())
    vol, vgrid = read_volume_h5(str(intensity), "intensity")
    assert vgrid.size == grid.size and vgrid.q_max == pytest.approx(grid.q_max, rel=1e-12)
    assert torch.allclose(vol.double(), torch.from_numpy(volumes[0]), rtol=1e-5)
    amp, _ = read_volume_h5(str(intensity), "amplitude")
    assert torch.allclose(amp.double() ** 2, vol.double(), rtol=1e-4)
    assert main(["reference", "--config", str(repo_root / "config" / "test.yaml"), "--structure", str(cif)]) == 2
