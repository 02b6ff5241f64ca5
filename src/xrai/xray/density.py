"""Ground truth for evaluation: the reference electron density and the true intensity volume.

Both live on the reconstruction grid ``grid = xrai.xray.geometry.reciprocal_grid(cfg)``:

* :func:`true_intensity`: ``|F(q)|^2`` (electrons^2) exactly at the ``grid`` points
  (:func:`xrai.xray.scattering.structure_factor_mesh`), indexed ``[x, y, z]``;
* :func:`reference_density`: the electron density (electrons / Angstrom^3) on the matching
  real-space grid: ``grid.size`` voxels of ``grid.voxel_size`` Angstrom per axis, voxel
  ``n`` at ``r = (n - size // 2) * voxel_size`` (FFT-centred like the reciprocal grid).

The molecule is centred exactly like the simulation: its electron-density centroid
(:func:`xrai.xray.scattering.molecule_centre`) at the origin, i.e. at voxel ``size // 2``.

FFT convention (``F(q) = sum_j f_j exp(+2 pi i q . r_j)``, xrai's and skopi's sign)::

    F   = voxel_size**3 * N**3 * fftshift(ifftn(ifftshift(rho)))     # density -> structure factors
    rho = dq**3 * fftshift(fftn(ifftshift(F))).real                 # structure factors -> density

so ``|fftshift(fftn(ifftshift(rho)))| * voxel_size**3 = |F|`` on the grid. (An inverse
FFT of ``F``, ``fftshift(ifftn(ifftshift(F)))``, gives the point-inverted density
``rho(-r)``: the twin that phasing from intensities cannot tell apart anyway.)

The density is the molecule's density *band-limited to the grid* (the Fourier
synthesis of the exact ``F`` on every grid point), which is what a perfect
reconstruction + phasing at this grid can reach: the right ground truth for an FSC.
The voxels are too coarse (about half the resolution) for a direct real-space sum
of atomic Gaussians without aliasing; ``method="gaussian"`` therefore sums the
Waasmaier–Kirfel Gaussians (voxel-integrated, ``erf``) on an oversampled grid and
band-limits that by an FFT crop: an independent route to the same density, used as
a cross-check in ``tests/test_density.py``.

Usage::

    xrai reference --config config/test.yaml --structure results/structures/2CEX_A.cif \\
        --density results/reference/2CEX_A/density.mrc --intensity results/reference/2CEX_A/intensity.h5
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from xrai.errors import XraiError
from xrai.volume import ReciprocalGrid
from xrai.xray.formfactors import form_factor_coefficients
from xrai.xray.scattering import centred_positions, group_by_element, structure_factor_mesh

logger = logging.getLogger(__name__)

#: Real-space oversampling of the Gaussian-sum route before band-limiting.
GAUSSIAN_OVERSAMPLING = 4
#: Form-factor terms with |b| below this (Angstrom^2) are constant over any detector's q range:
#: folded into the constant c (Waasmaier-Kirfel fits pair c with a near-cancelling tiny-b term).
_FLAT_B = 0.05
#: The constant c is spread as a Gaussian of this B (Angstrom^2): flat to 2e-3 at |q| = 0.13.
_CONSTANT_B = 0.5


def _positions(positions, elements: Sequence[str], centre: bool) -> torch.Tensor:
    return centred_positions(positions, elements) if centre else torch.as_tensor(np.asarray(positions), dtype=torch.float64)


def structure_factor_grid(positions, elements: Sequence[str], grid: ReciprocalGrid, *, centre: bool = True,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Complex ``F`` (complex128) on every point of ``grid``; atoms centred like the simulation when ``centre``."""
    return structure_factor_mesh(_positions(positions, elements, centre), elements, grid, device=device).cpu()


def true_intensity(positions, elements: Sequence[str], grid: ReciprocalGrid, *, centre: bool = True,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``|F|^2`` (electrons^2, float64) at the ``grid`` points, shape ``(size,)*3`` indexed [x, y, z]."""
    return structure_factor_grid(positions, elements, grid, centre=centre, device=device).abs() ** 2


def density_from_structure_factors(f_grid: torch.Tensor, grid: ReciprocalGrid) -> np.ndarray:
    """Band-limited density (electrons / Angstrom^3, float64) from ``F`` on the grid (see the FFT convention)."""
    f = f_grid.detach().cpu().numpy()
    rho = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(f))).real
    return rho * grid.dq**3


def amplitudes_from_density(rho: np.ndarray, grid: ReciprocalGrid) -> np.ndarray:
    """``|F|`` on the grid from a density on the matching real-space grid: ``|FFT(rho)| * voxel_size^3``."""
    return np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rho)))) * grid.voxel_size**3


def _check_fits(pos: torch.Tensor, grid: ReciprocalGrid) -> None:
    half_box = grid.box_size / 2
    reach = float(pos.abs().max())
    if reach >= half_box:
        raise XraiError(
            f"the molecule reaches {reach:.1f} A from its centre but the reconstruction box is only "
            f"{grid.box_size:.1f} A wide (voxel {grid.voxel_size:.2f} A x {grid.size}); "
            "increase volume.grid_size")
    if 2 * reach > half_box:
        logger.warning("molecule extent %.1f A exceeds half the box (%.1f A): oversampling < 2 for phasing",
                       2 * reach, grid.box_size)


def _gaussian_terms(element: str) -> list[tuple[float, float]]:
    """``(a, b)`` real-space-representable terms of an element's form factor (c folded in as a narrow Gaussian)."""
    a, b, c = form_factor_coefficients(element)
    terms, const = [], float(c)
    for ai, bi in zip(a.tolist(), b.tolist(), strict=True):
        if abs(bi) < _FLAT_B:
            const += ai
        else:
            terms.append((ai, bi))
    terms.append((const, _CONSTANT_B))
    return terms


def gaussian_density(positions, elements: Sequence[str], grid: ReciprocalGrid, *, centre: bool = True,
                     oversampling: int = GAUSSIAN_OVERSAMPLING, b_factor: float = 0.0) -> np.ndarray:
    """Density from a real-space sum of Waasmaier–Kirfel Gaussians, band-limited to ``grid`` (float64).

    Each atom contributes ``sum_i a_i (4 pi / b_i)^(3/2) exp(-4 pi^2 r^2 / b_i)`` (the inverse
    transform of ``a_i exp(-b_i |q|^2 / 4)``; ``b_i`` + ``b_factor``), integrated exactly over
    the voxels of a grid ``oversampling`` times finer; that density is then Fourier-cropped to
    the grid's frequencies and divided by the voxel box's transfer function (a sinc per axis).
    """
    pos = _positions(positions, elements, centre)
    _check_fits(pos, grid)
    n_fine = grid.size * int(oversampling)
    h = grid.voxel_size / oversampling
    centre_index = n_fine // 2
    rho = torch.zeros(n_fine**3, dtype=torch.float64)
    for element, idx in group_by_element(elements).items():
        p = pos[idx]
        for a, b in _gaussian_terms(element):
            sigma = math.sqrt((b + b_factor) / (8 * math.pi**2))
            half = int(math.ceil(5 * sigma / h)) + 1
            offsets = torch.arange(-half, half + 1)
            nearest = torch.round(p / h).long() + centre_index  # (n, 3) voxel holding the atom
            idx3 = nearest[:, :, None] + offsets  # (n, 3, L)
            lo = (idx3 - centre_index - 0.5) * h - p[:, :, None]
            w = 0.5 * (torch.erf((lo + h) / (math.sqrt(2) * sigma)) - torch.erf(lo / (math.sqrt(2) * sigma)))
            vals = a * w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :] / h**3
            flat = (idx3[:, 0, :, None, None] * n_fine + idx3[:, 1, None, :, None]) * n_fine + idx3[:, 2, None, None, :]
            rho.index_add_(0, flat.reshape(-1), vals.reshape(-1))
    rho = rho.reshape(n_fine, n_fine, n_fine).numpy()
    # F on the fine grid's frequencies (our sign: ifftn), cropped to the reconstruction grid
    f_fine = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(rho))) * (h**3 * n_fine**3)
    lo = n_fine // 2 - grid.size // 2
    f = f_fine[lo:lo + grid.size, lo:lo + grid.size, lo:lo + grid.size]
    # undo the voxel integration: a box of width h transfers sinc(q h) per axis
    ax = grid.axis().numpy()
    sinc = np.sinc(ax * h)
    f = f / (sinc[:, None, None] * sinc[None, :, None] * sinc[None, None, :])
    return density_from_structure_factors(torch.from_numpy(f), grid)


def reference_density(positions, elements: Sequence[str], grid: ReciprocalGrid, *, centre: bool = True,
                      method: str = "fourier", device: torch.device | str | None = None) -> np.ndarray:
    """Reference electron density (electrons / Angstrom^3, float64, ``(size,)*3`` indexed [x, y, z]).

    ``method="fourier"`` (default): Fourier synthesis of the exact ``F`` on the grid;
    ``method="gaussian"``: :func:`gaussian_density`. Both are band-limited to the grid.
    """
    pos = _positions(positions, elements, centre)
    _check_fits(pos, grid)
    if method == "fourier":
        return density_from_structure_factors(structure_factor_grid(pos, elements, grid, centre=False, device=device), grid)
    if method == "gaussian":
        return gaussian_density(pos, elements, grid, centre=False)
    raise ValueError(f"method must be 'fourier' or 'gaussian', got {method!r}")


def write_reference(cfg: dict, structure: str | Path, density_mrc: str | Path | None,
                    intensity_h5: str | Path | None) -> dict:
    """Compute and write the reference density (MRC) and true intensity (HDF5) of a structure for ``cfg``'s grid."""
    from xrai.io import provenance, write_mrc, write_run_metadata
    from xrai.structure import read_atoms
    from xrai.utils import pick_device
    from xrai.volume import write_volume_h5
    from xrai.xray.geometry import reciprocal_grid

    grid = reciprocal_grid(cfg)
    positions, elements = read_atoms(structure)
    pos = centred_positions(positions, elements)
    _check_fits(pos, grid)
    device = pick_device(cfg.get("simulation", {}).get("device", "auto"))
    t0 = time.perf_counter()
    f = structure_factor_grid(pos, elements, grid, centre=False, device=device)
    intensity = f.abs() ** 2
    rho = density_from_structure_factors(f, grid)
    info = {"grid_size": grid.size, "q_max": grid.q_max, "voxel_size_A": grid.voxel_size,
            "box_A": grid.box_size, "n_atoms": len(elements), "electrons": float(rho.sum() * grid.voxel_size**3),
            "seconds": time.perf_counter() - t0}
    prov = provenance(cfg) | {"structure": str(structure), "reference": info,
                              "centring": "electron-density centroid at voxel size // 2"}
    if density_mrc is not None:
        write_mrc(density_mrc, rho.astype(np.float32), grid.voxel_size)
        write_run_metadata(Path(density_mrc).parent, cfg)
    if intensity_h5 is not None:
        write_volume_h5(str(intensity_h5), grid, prov, intensity=intensity, amplitude=intensity.sqrt())
    logger.info("reference for %s: %d^3 grid, voxel %.2f A, box %.1f A, %.0f electrons, %.1f s",
                Path(structure).name, grid.size, grid.voxel_size, grid.box_size, info["electrons"], info["seconds"])
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xrai reference`` (``--config`` is added by xrai.cli)."""
    parser.add_argument("--structure", required=True, metavar="CIF", help="atoms (mmCIF/PDB from xrai fetch)")
    parser.add_argument("--density", metavar="MRC", help="output reference electron density (MRC)")
    parser.add_argument("--intensity", metavar="H5", help="output true intensity / amplitude volume (HDF5)")


def run(args: argparse.Namespace) -> None:
    """``xrai reference``."""
    from xrai.config import load_config

    if args.density is None and args.intensity is None:
        raise XraiError("nothing to write: give --density and/or --intensity")
    write_reference(load_config(args.config), args.structure, args.density, args.intensity)
