"""The electrostatic potential of a molecule on a cubic grid (the cryo-EM reference volume).

Electron scattering factors are Peng's 5-Gaussian fits (International Tables C, table
4.3.2.2), summed on the grid by ``gemmi.DensityCalculatorE``. gemmi's map is
``sum_j f_e,j`` in real space (Å⁻², integrating to ``sum_j f_e,j(0)`` Å); the potential in
volts is that times the Mott–Bethe constant ``h² / (2π m₀ e)`` = 47.878 V·Å².

* Every atom gets the B-factor ``cryoem.bfactor`` (Å²; the deposited ones are replaced so
  the reference does not depend on a file's refinement), occupancy as in the file. The map
  samples the Gaussians at voxel centres, so B should blur atoms to at least half a pixel
  (``B >= 2 π² pixel²``: 13 Å² at 0.8 Å, 51 Å² at 1.6 Å); a warning says when it does not.
* The molecule is centred: the potential's centroid (atoms weighted by ``f_e(0)``) sits at
  voxel ``N // 2`` of each axis, RELION's image and volume origin.
* The box (``cryoem.box_size`` × ``cryoem.pixel_size_A``) must hold the molecule in every
  orientation: its farthest atom plus three blur widths inside the inscribed sphere.
* The array is indexed ``[z, y, x]`` (mrcfile's and torch-fourier-slice's order).

Usage::

    from xrai.cryoem.potential import potential_from_file
    vol = potential_from_file("results/structures/4AKE.cif", box_size=128, pixel_size=0.8, bfactor=20.0)
    # command line (rule potential)
    xrai potential --config config/cryoem-test.yaml --protein 4AKE --structure results/structures/4AKE.cif \\
        --out results/reference/4AKE/potential.mrc
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import gemmi
import numpy as np

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

#: h² / (2π m₀ e) in V·Å²: gemmi's Σ f_e (Å⁻²) times this is the potential in volts.
MOTT_BETHE_V_A2 = 6.62607015e-34 ** 2 / (2 * math.pi * 9.1093837015e-31 * 1.602176634e-19) * 1e20


def _atoms(st: gemmi.Structure) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, 3) Å and scattering weights ``f_e(0) × occupancy`` (N,) of the first model."""
    pos, weight = [], []
    for cra in st[0].all():
        pos.append(cra.atom.pos.tolist())
        weight.append(sum(cra.atom.element.c4322.a) * cra.atom.occ)
    if not pos:
        raise XraiError("structure has no atoms")
    return np.asarray(pos, dtype=np.float64), np.asarray(weight, dtype=np.float64)


def blur_sigma(bfactor: float) -> float:
    """Standard deviation (Å) of the Gaussian blur of B-factor ``bfactor`` (Å²): sqrt(B / 8π²)."""
    return math.sqrt(bfactor / (8 * math.pi**2))


def required_box_size(radius: float, pixel_size: float, bfactor: float) -> int:
    """Smallest even box (px) whose inscribed sphere holds a molecule of ``radius`` Å with its blur."""
    need = 2 * (radius + 3 * blur_sigma(bfactor) + 2 * pixel_size) / pixel_size
    return int(2 * math.ceil(need / 2))


def check_box(radius: float, box_size: int, pixel_size: float, bfactor: float, name: str = "the molecule") -> None:
    """XraiError naming ``cryoem.box_size`` / ``cryoem.pixel_size_A`` and the sizes needed when the box is too small."""
    need = required_box_size(radius, pixel_size, bfactor)
    if box_size < need:
        min_pixel = 2 * (radius + 3 * blur_sigma(bfactor)) / (box_size - 4)
        raise XraiError(
            f"config key 'cryoem.box_size': {box_size} px x {pixel_size} A = {box_size * pixel_size:.1f} A cannot "
            f"hold {name} (radius {radius:.1f} A from its centre, in every orientation, plus its blur); "
            f"needs box_size >= {need} at cryoem.pixel_size_A {pixel_size}, or cryoem.pixel_size_A >= "
            f"{min_pixel:.3f} at box_size {box_size}")


def potential_from_structure(st: gemmi.Structure, box_size: int, pixel_size: float, bfactor: float,
                             name: str = "the molecule") -> np.ndarray:
    """Potential (volts, float32 ``[z, y, x]``, ``box_size``³) of the first model of ``st``, centred.

    Raises XraiError when the box cannot hold the molecule (see :func:`check_box`).
    """
    if blur_sigma(bfactor) < 0.5 * pixel_size:
        logger.warning("cryoem.bfactor %.0f A^2 blurs atoms by %.2f A < half the pixel (%.2f A): the potential is "
                       "undersampled (aliased); B >= %.0f A^2 samples it", bfactor, blur_sigma(bfactor), pixel_size,
                       8 * math.pi**2 * (0.5 * pixel_size) ** 2)
    st = st.clone()
    pos, weight = _atoms(st)
    centroid = (pos * weight[:, None]).sum(0) / weight.sum()
    radius = float(np.linalg.norm(pos - centroid, axis=1).max())
    check_box(radius, box_size, pixel_size, bfactor, name)
    shift = np.full(3, (box_size // 2) * pixel_size) - centroid
    for cra in st[0].all():
        cra.atom.pos = gemmi.Position(*(np.asarray(cra.atom.pos.tolist()) + shift))
        cra.atom.b_iso = float(bfactor)
        cra.atom.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
    side = box_size * pixel_size
    st.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()
    calc.grid.set_unit_cell(st.cell)
    calc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calc.grid.set_size(box_size, box_size, box_size)
    calc.put_model_density_on_grid(st[0])  # d_min unset: keeps this grid (periodic; the box check keeps atoms clear)
    density_xyz = np.array(calc.grid, copy=True)
    return np.ascontiguousarray((density_xyz * MOTT_BETHE_V_A2).transpose(2, 1, 0), dtype=np.float32)


def potential_from_file(path: str | Path, box_size: int, pixel_size: float, bfactor: float) -> np.ndarray:
    """:func:`potential_from_structure` of a PDB/mmCIF file (e.g. ``results/structures/{protein}.cif``)."""
    from xrai.structure import read_structure_file

    return potential_from_structure(read_structure_file(path), box_size, pixel_size, bfactor, name=Path(path).name)


def write_potential(path: str | Path, volume_zyx: np.ndarray, pixel_size: float) -> None:
    """Write a ``[z, y, x]`` volume as MRC with its voxel size (Å), atomically (``xrai.io.write_mrc``)."""
    from xrai.io import write_mrc

    write_mrc(path, np.asarray(volume_zyx).transpose(2, 1, 0), pixel_size)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xrai potential`` (``--config`` is added by xrai.cli)."""
    parser.add_argument("--structure", metavar="CIF", required=True, help="atoms (mmCIF/PDB from xrai fetch)")
    parser.add_argument("--protein", help="protein name in the config (selects its cryoem overrides)")
    parser.add_argument("--out", metavar="MRC", required=True, help="output potential (MRC, voxel size set)")


def run(args: argparse.Namespace) -> None:
    """``xrai potential``: the reference potential of a cryo-EM config's structure."""
    from xrai.config import cryoem_config, load_config

    em = cryoem_config(load_config(args.config), args.protein)
    vol = potential_from_file(args.structure, int(em["box_size"]), float(em["pixel_size_A"]), float(em["bfactor"]))
    write_potential(args.out, vol, float(em["pixel_size_A"]))
    logger.info("%s: potential %d^3 at %.3f A/px, max %.1f V, written to %s", args.structure, vol.shape[0],
                em["pixel_size_A"], float(vol.max()), args.out)
