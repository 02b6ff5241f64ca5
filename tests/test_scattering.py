"""Form factors, structure factors and patterns: symmetry, rotations, and skopi's CPU functions on 2CEX chain A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrai.rotations import RZ_PI, quaternion_to_matrix, random_quaternions
from xrai.volume import ReciprocalGrid
from xrai.xray.formfactors import atomic_form_factor, electron_count, form_factor_coefficients
from xrai.xray.geometry import Beam, Detector, simulation_mesh
from xrai.xray.scattering import (
    PatternSimulator,
    centred_positions,
    molecule_centre,
    patterns_direct,
    rotated_pixels,
    slice_patterns,
    structure_factor_mesh,
    structure_factors,
)

BEAM = Beam(photon_energy_ev=4600.0, photons_per_pulse=1e12, focus_radius_m=0.5e-6)
PAPER_DET = Detector(128, 0.1, 0.2)


@pytest.fixture(scope="module")
def chain_a(pdb_mirror):
    """2CEX chain A (2362 atoms, C N O S) read through xrai.structure, centred like the simulator."""
    from xrai.structure import load_structure

    st = load_structure(pdb_mirror / "2cex.pdb", chains=["A"])
    atoms = [a for ch in st[0] for r in ch for a in r]
    pos = np.array([a.pos.tolist() for a in atoms])
    elements = [a.element.name for a in atoms]
    return centred_positions(pos, elements), elements


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ form factors
def test_form_factor_known_values():
    # f(0) is the electron count of the fit (skopi's first C row: 5.997198)
    assert electron_count("C") == pytest.approx(5.997198, abs=1e-6)
    assert electron_count("S") == pytest.approx(15.999624, abs=1e-6)
    assert electron_count("Fe") == pytest.approx(26.0, abs=0.01)
    q = torch.linspace(0, 0.5, 11, dtype=torch.float64)
    f = atomic_form_factor("O", q)
    assert f[0] == pytest.approx(electron_count("O"))
    assert torch.all(f[1:] < f[:-1])  # decreasing with |q|
    a, b, c = form_factor_coefficients("N")
    s = 0.1  # s = |q| / 2
    assert float(atomic_form_factor("N", torch.tensor(0.2))) == pytest.approx(float((a * torch.exp(-b * s * s)).sum() + c))


def test_unknown_element_is_a_clear_error():
    from xrai.errors import XraiError

    with pytest.raises(XraiError, match="'Xx'"):
        atomic_form_factor("Xx", torch.zeros(3))


# ------------------------------------------------------------------ structure factors
def test_mesh_equals_direct_sum_and_friedel_symmetry():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 8
    elements = ["C", "N", "O", "S"] * 10
    for grid in (ReciprocalGrid(15, 0.1), ReciprocalGrid(16, 0.1)):  # odd: half + mirror; even: full
        f_mesh = structure_factor_mesh(pos, elements, grid)
        f_direct = structure_factors(pos, elements, grid.coordinates())
        assert _rel(f_mesh.abs(), f_direct.abs()) < 1e-10
        assert torch.allclose(f_mesh, f_direct, rtol=1e-9, atol=1e-9)
    k = torch.randn(50, 3, generator=gen, dtype=torch.float64) * 0.1
    f_plus, f_minus = structure_factors(pos, elements, k), structure_factors(pos, elements, -k)
    assert torch.allclose(f_minus, f_plus.conj(), rtol=1e-10, atol=1e-9)  # F(-q) = conj F(q)
    assert torch.allclose(f_minus.abs(), f_plus.abs(), rtol=1e-10)


def test_centring_on_the_electron_density_centroid():
    pos = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]], dtype=torch.float64)
    c = molecule_centre(pos, ["C", "S"])
    expected = 10.0 * electron_count("S") / (electron_count("C") + electron_count("S"))
    assert torch.allclose(c, torch.tensor([expected, 0, 0], dtype=torch.float64))
    assert torch.allclose(molecule_centre(centred_positions(pos, ["C", "S"]), ["C", "S"]), torch.zeros(3, dtype=torch.float64))


def test_rotated_structure_gives_rotated_pattern(chain_a):
    """Rotating the molecule by Q equals imaging it with orientation Q^T R (k = R q samples F(Q^T k))."""
    pos, elements = chain_a
    det = Detector(16, 0.1, 0.2)
    gen = torch.Generator().manual_seed(3)
    Q = quaternion_to_matrix(random_quaternions(1, gen))[0]
    R = quaternion_to_matrix(random_quaternions(2, gen))
    q = det.pixel_position_reciprocal(BEAM)
    rotated = patterns_direct(pos @ Q.T, elements, rotated_pixels(q, R))
    original = patterns_direct(pos, elements, rotated_pixels(q, Q.T @ R))
    assert _rel(rotated, original) < 1e-10


def test_in_plane_pi_rotation_flips_the_image(chain_a):
    """Orientation R @ RZ_PI gives torch.rot90(image, 2): the layout convention of xrai.rotations."""
    pos, elements = chain_a
    det = Detector(32, 0.1, 0.2)
    sim = PatternSimulator.from_atoms(pos, elements, det, BEAM, mesh_size=33)
    R = quaternion_to_matrix(random_quaternions(3, torch.Generator().manual_seed(5)))
    from xrai.rotations import matrix_to_quaternion

    img = sim.patterns(matrix_to_quaternion(R))
    img_pi = sim.patterns(matrix_to_quaternion(R @ RZ_PI))
    assert torch.allclose(img_pi, torch.rot90(img, 2, dims=(-2, -1)), rtol=1e-4, atol=1e-6 * float(img.max()))


def test_mesh_slices_approach_direct_patterns(chain_a):
    """Trilinear slicing of |F|^2 (skopi's method) vs the exact per-pattern sum: the interpolation error."""
    pos, elements = chain_a
    det = Detector(32, 0.1, 0.2)
    quats = random_quaternions(3, torch.Generator().manual_seed(7))
    k = rotated_pixels(det.pixel_position_reciprocal(BEAM), quaternion_to_matrix(quats))
    exact = patterns_direct(pos, elements, k)
    errors = {}
    for mesh_size in (65, 101):
        sim = PatternSimulator.from_atoms(pos, elements, det, BEAM, mesh_size=mesh_size)
        errors[mesh_size] = _rel(sim.intensities(quats), exact)
    # measured: ~3.7% at 65 (CI config), ~1.4% at 101, ~0.65% at 151 (the paper's mesh, docs/benchmarks.md)
    assert errors[101] < 0.03 and errors[65] < 0.06 and errors[101] < errors[65]


# ------------------------------------------------------------------ skopi
def _skopi_particle(pos: torch.Tensor, elements: list[str]):
    """A skopi Particle holding exactly these atoms (positions in m) with skopi's WK form-factor table."""
    sk = pytest.importorskip("skopi", reason="skopi (dev extra) is the reference implementation")
    from skopi.ff_waaskirf_database import load_waaskirf_database

    z_of = {"H": 1, "C": 6, "N": 7, "O": 8, "P": 15, "S": 16, "FE": 26}
    z = np.array([z_of[e.upper()] for e in elements])
    order = np.argsort(z, kind="stable")
    particle = sk.Particle()
    particle.atom_pos = pos.numpy()[order] * 1e-10
    zs, first = np.unique(z[order], return_index=True)
    particle.num_atom_types = len(zs)
    particle.split_idx = np.append(first, [len(z)])
    # as skopi's Particle.read_pdb(ff='WK'): the formula on 101 samples of s = sin(theta)/lambda
    qs = np.linspace(0, 10, 101) / (2.0 * np.pi * 0.529177206 * 2.0)
    wk = load_waaskirf_database()
    table = []
    for zz in zs:
        row = wk[(wk[:, 0] == zz) & (wk[:, 1] == 0)][0]  # skopi takes the first matching row
        a, c, b = row[2:7], row[7], row[8:13]
        table.append((a[None] * np.exp(-b[None] * qs[:, None] ** 2)).sum(1) + c)
    particle.q_sample, particle.ff_table = qs, np.array(table)
    return particle


def test_form_factors_match_skopi():
    sd = pytest.importorskip("skopi.diffraction", reason="skopi (dev extra) is the reference implementation")
    elements = ["C", "N", "O", "S"]
    particle = _skopi_particle(torch.zeros(4, 3, dtype=torch.float64), elements)
    q = np.linspace(0, 0.13, 27)  # Angstrom^-1, the detector's range
    theirs = sd.calculate_atomic_factor(particle, q / 2, len(q))  # skopi takes s = |q| / 2
    for i, e in enumerate(elements):
        ours = atomic_form_factor(e, torch.from_numpy(q)).numpy()
        assert np.abs(ours - theirs[i]).max() / ours.max() < 1e-4  # skopi's cubic spline: ~1e-5


def test_patterns_match_skopi_mesh_and_take_n_slices(chain_a):
    """2CEX chain A, SimpleSquareDetector(128, 0.1, 0.2), 4600 eV, 1e12 photons, 4 random quaternions.

    skopi: calculate_molecular_form_factor_square on its reciprocal mesh, take_n_slices, times
    linear_correction. xrai: structure_factor_mesh on the same mesh, slice_patterns, times
    Detector.linear_correction. The quaternions are passed unchanged (identical conventions).
    A 25^3 mesh keeps skopi's CPU sum short; both slice the very same points.
    """
    sk = pytest.importorskip("skopi", reason="skopi (dev extra) is the reference implementation")
    import skopi.diffraction as sd
    import skopi.geometry as sg

    pos, elements = chain_a
    particle = _skopi_particle(pos, elements)
    det_s = sk.SimpleSquareDetector(128, 0.1, 0.2, beam=sk.Beam(photon_energy=4600, fluence=1e12, focus_radius=0.5e-6))
    mesh_size = 25
    mesh_s, voxel = det_s.get_reciprocal_mesh(mesh_size)
    volume_s = sd.calculate_molecular_form_factor_square(particle, np.linalg.norm(mesh_s, axis=-1) * 1e-10 / 2, mesh_s)
    np.random.seed(11)
    quats = sg.get_random_quat(4)
    theirs = sg.take_n_slices(volume_s, voxel, det_s.pixel_position_reciprocal, quats)[:, 0] * det_s.linear_correction[0]

    mesh = simulation_mesh(PAPER_DET, BEAM, mesh_size)
    volume = structure_factor_mesh(pos, elements, mesh).abs() ** 2
    assert _rel(volume, volume_s) < 1e-4
    k = rotated_pixels(PAPER_DET.pixel_position_reciprocal(BEAM), quaternion_to_matrix(torch.from_numpy(quats)))
    ours = slice_patterns(volume, mesh, k) * PAPER_DET.linear_correction(BEAM)
    for i in range(len(quats)):
        assert _rel(ours[i], theirs[i]) < 1e-3
    # the float32 production path (PatternSimulator) gives the same images
    sim = PatternSimulator(volume, mesh, PAPER_DET, BEAM)
    prod = sim.patterns(torch.from_numpy(quats))
    for i in range(len(quats)):
        assert _rel(prod[i], theirs[i]) < 1e-3


def test_direct_patterns_match_skopi(chain_a):
    """Exact per-pattern |F|^2 against skopi's calculate_molecular_form_factor_square on rotated pixels."""
    pytest.importorskip("skopi", reason="skopi (dev extra) is the reference implementation")
    import skopi.diffraction as sd
    import skopi.geometry as sg

    pos, elements = chain_a
    particle = _skopi_particle(pos, elements)
    q = PAPER_DET.pixel_position_reciprocal(BEAM)[::4, ::4]  # 32 x 32 of the paper's 128 x 128 pixels
    np.random.seed(12)
    for quat in sg.get_random_quat(2):
        rot = sg.quaternion2rot3d(quat)
        k_s = sg.rotate_pixels_in_reciprocal_space(rot, q.numpy() * 1e10)  # skopi: q @ R.T, m^-1
        theirs = sd.calculate_molecular_form_factor_square(particle, np.linalg.norm(k_s, axis=-1) * 1e-10 / 2, k_s)
        ours = patterns_direct(pos, elements, rotated_pixels(q, quaternion_to_matrix(torch.from_numpy(quat))[None]))[0]
        assert _rel(ours, theirs) < 1e-3
