"""Cryo-EM simulation (xrai.cryoem): RELION conventions with known answers, SNR, STAR + mrcs, config, Snakemake."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest
import starfile
import torch
import yaml

from xrai.cli import main
from xrai.config import cryoem_config, load_config, validate_config
from xrai.cryoem.ctf import CtfParams, ctf_rfft, fourier_filter
from xrai.cryoem.noise import (
    add_gaussian_noise,
    electron_wavelength_A,
    image_rng,
    noise_sigma,
    snr_db,
)
from xrai.cryoem.potential import MOTT_BETHE_V_A2, potential_from_file, potential_from_structure
from xrai.cryoem.projection import FourierProjector, project_real_space
from xrai.cryoem.simulate import image_parameters, noise_free_images
from xrai.errors import XraiError
from xrai.rotations import relion_euler_to_matrix

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def gaussian_blobs(n: int, blobs: list[tuple[tuple[float, float, float], float, float]]) -> torch.Tensor:
    """A ``[z, y, x]`` volume of Gaussians ``(centre xyz in voxels from N // 2, sigma, amplitude)``."""
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    for (px, py, pz), s, a in blobs:
        vol += a * torch.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * s * s))
    return vol.float()


def projected_blobs(n: int, blobs, A: torch.Tensor) -> torch.Tensor:
    """The analytic projection of :func:`gaussian_blobs` along z of ``V(A^T r)``: blob ``p`` lands at ``(A p)_xy``."""
    axis = torch.arange(n, dtype=torch.float64) - n // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    img = torch.zeros(n, n, dtype=torch.float64)
    for p, s, a in blobs:
        q = A.double() @ torch.tensor(p, dtype=torch.float64)
        img += a * s * math.sqrt(2 * math.pi) * torch.exp(-((x - q[0]) ** 2 + (y - q[1]) ** 2) / (2 * s * s))
    return img


ASYMMETRIC = [((6.0, -3.0, 4.0), 2.0, 1.0), ((-5.0, 2.0, -1.0), 2.6, 0.6), ((0.0, 7.0, -5.0), 1.8, 0.8)]


@pytest.mark.parametrize("angles", [(30.0, 60.0, -45.0), (-120.0, 135.0, 80.0), (0.0, 0.0, 0.0)])
def test_projections_match_the_analytic_image_at_a_relion_pose(angles):
    n = 40
    vol = gaussian_blobs(n, ASYMMETRIC)
    A = relion_euler_to_matrix(*angles)
    expected = projected_blobs(n, ASYMMETRIC, A)
    fourier = FourierProjector(vol, pad_factor=2).project(A[None])[0].double()
    real = project_real_space(vol, A[None])[0].double()
    scale = float(expected.abs().max())
    # tolerances: the sinc^2 correction of torch-fourier-slice (up to ~4% at grid-aligned poses) and
    # trilinear smoothing in real space (~4%); a wrong convention is off by ~100%
    assert float((fourier - expected).abs().max()) < 0.05 * scale
    assert float((real - expected).abs().max()) < 0.06 * scale
    assert float((fourier - real).abs().max()) < 0.06 * scale
    # the mirror pose (A instead of A^T) is visibly different: the test can fail
    wrong = projected_blobs(n, ASYMMETRIC, A.T)
    if angles != (0.0, 0.0, 0.0):
        assert float((fourier - wrong).abs().max()) > 0.3 * scale


def test_fourier_projector_equals_torch_fourier_slice():
    from torch_fourier_slice import project_3d_to_2d

    vol = gaussian_blobs(32, ASYMMETRIC)
    A = relion_euler_to_matrix(torch.tensor([10.0, 200.0]), torch.tensor([70.0, 20.0]), torch.tensor([5.0, -90.0]))
    ours = FourierProjector(vol, 2).project(A)
    lib = project_3d_to_2d(vol, A.transpose(-1, -2).float(), pad_factor=2)
    assert torch.allclose(ours, lib, atol=1e-4 * float(lib.abs().max()))


def _two_atom_structure(positions, elements) -> gemmi.Structure:
    st = gemmi.Structure()
    model, chain = gemmi.Model(1), gemmi.Chain("A")
    for k, (p, el) in enumerate(zip(positions, elements, strict=True)):
        res = gemmi.Residue()
        res.name, res.seqid = "UNK", gemmi.SeqId(str(k + 1))
        atom = gemmi.Atom()
        atom.name, atom.element, atom.pos, atom.occ, atom.b_iso = el, gemmi.Element(el), gemmi.Position(*p), 1.0, 10.0
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    return st


def test_potential_is_centred_indexed_zyx_and_in_volts():
    # an off-centre atom: U and C, the weighted centroid moves to voxel N // 2
    pos = np.array([[10.0, 2.0, -3.0], [14.0, 2.0, -3.0]])
    st = _two_atom_structure(pos, ["U", "C"])
    w = np.array([sum(gemmi.Element(e).c4322.a) for e in ("U", "C")])
    centroid = (pos * w[:, None]).sum(0) / w.sum()
    n, px = 32, 0.5
    vol = potential_from_structure(st, n, px, bfactor=10.0)
    z, y, x = np.unravel_index(vol.argmax(), vol.shape)
    expected = n // 2 + (pos[0] - centroid) / px  # the uranium atom, x y z in voxels
    assert np.allclose([x, y, z], np.round(expected), atol=1)
    assert abs(x - expected[0]) <= 0.5 + 1e-9 and y == n // 2 and z == n // 2
    # integral = Mott-Bethe constant x sum of f_e(0) (V A^3)
    assert vol.sum() * px**3 == pytest.approx(MOTT_BETHE_V_A2 * w.sum(), rel=1e-3)
    assert MOTT_BETHE_V_A2 == pytest.approx(47.878, rel=1e-4)


def test_box_too_small_names_the_key_and_sizes(pdb_mirror, tmp_path, capsys):
    with pytest.raises(XraiError, match=r"cryoem\.box_size.*needs box_size >= \d+.*cryoem\.pixel_size_A >="):
        potential_from_file(pdb_mirror / "4ake.pdb", box_size=32, pixel_size=1.0, bfactor=20.0)
    cfg = _cryoem_cfg(tmp_path, pixel_size_A=1.0)  # 32 px x 1 A for a molecule of radius 37 A
    code = main(["potential", "--config", str(cfg), "--structure", str(pdb_mirror / "4ake.pdb"),
                 "--out", str(tmp_path / "p.mrc")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cryoem.box_size" in err[0] and not (tmp_path / "p.mrc").exists()


def test_protein_is_white_without_ctf_and_noise(pdb_mirror):
    # B = 400 A^2: a blur of 0.6 px, so the coarse grid samples the atoms without aliasing
    vol = potential_from_file(pdb_mirror / "4ake.pdb", box_size=32, pixel_size=3.6, bfactor=400.0)
    assert vol.min() >= -1e-3 * vol.max()
    img = FourierProjector(torch.from_numpy(vol)).project(relion_euler_to_matrix(20.0, 50.0, 70.0)[None])[0]
    c = 16
    assert float(img[c - 3:c + 4, c - 3:c + 4].mean()) > 0.2 * float(img.max()) > 0  # bright molecule
    assert float(img.min()) > -0.02 * float(img.max())


def relion_ctf(u_A, v_A, angle_deg, kv, cs_mm, q0, pixel, n) -> np.ndarray:
    """RELION's ``CTF::getCTF`` (ctf.h) written out, on the rfft grid of an n-pixel image (origin [0, 0])."""
    lam = electron_wavelength_A(kv)
    k1, k2 = math.pi * lam, math.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    fy = np.fft.fftfreq(n)[:, None] / pixel
    fx = np.fft.rfftfreq(n)[None, :] / pixel
    u2 = fx**2 + fy**2
    ang = np.arctan2(fy, fx) - math.radians(angle_deg)
    deltaf = -(u_A + v_A) / 2 - (u_A - v_A) / 2 * np.cos(2 * ang)
    return -np.sin(k1 * deltaf * u2 + k2 * u2 * u2 - k3)


def test_ctf_matches_relion_formula_and_sign_at_zero():
    u, v, angle = torch.tensor([15000.0]), torch.tensor([9000.0]), torch.tensor([30.0])
    ctf = ctf_rfft(CtfParams(u, v, angle, 300.0, 2.7, 0.1), pixel_size=1.2, size=64)[0].numpy()
    assert ctf[0, 0] == pytest.approx(0.1, abs=1e-6)  # CTF(0) = +amplitude contrast
    ref = relion_ctf(15000.0, 9000.0, 30.0, 300.0, 2.7, 0.1, 1.2, 64)
    assert np.abs(ctf - ref).max() < 2e-3
    rotated = relion_ctf(15000.0, 9000.0, 120.0, 300.0, 2.7, 0.1, 1.2, 64)  # the other axis: the test can fail
    assert np.abs(ctf - rotated).max() > 0.5


def test_shift_moves_an_atom_to_centre_minus_origin():
    n, px = 32, 1.5
    vol = gaussian_blobs(n, [((0.0, 0.0, 0.0), 1.2, 1.0)])  # a single centred atom
    projector = FourierProjector(vol)
    em = {"ctf": False, "shift_sigma_A": 1.0, "pad_factor": 2}
    params = {"rot": np.zeros(1), "tilt": np.zeros(1), "psi": np.zeros(1),
              "origin_x_A": np.array([-3 * px]), "origin_y_A": np.array([2 * px])}
    img = noise_free_images(projector, em, params, px)[0]
    y, x = np.unravel_index(int(img.argmax()), img.shape)
    assert (x, y) == (n // 2 + 3, n // 2 - 2)  # centre - origin
    shifted = fourier_filter(vol.sum(0)[None], px, shifts_px=torch.tensor([[-4.5, 1.0]]))[0]
    y, x = np.unravel_index(int(shifted.argmax()), shifted.shape)
    assert (x, y) == (n // 2 - 4 - 1, n // 2 + 1) or (x, y) == (n // 2 - 4, n // 2 + 1)


def test_snr_definition():
    signal = FourierProjector(gaussian_blobs(32, ASYMMETRIC)).project(
        relion_euler_to_matrix(torch.rand(64) * 360, torch.rand(64) * 180, torch.rand(64) * 360))
    var = float(signal.double().var(dim=(-2, -1)).mean())
    for target in (10.0, 0.0, -10.0):
        sigma = noise_sigma(var, target)
        noisy = add_gaussian_noise(signal, sigma, [image_rng(0, 0, 1, i) for i in range(64)])
        assert snr_db(signal, noisy - signal) == pytest.approx(target, abs=0.1)
        assert sigma**2 == pytest.approx(var / 10 ** (target / 10))


def test_shot_noise_is_poisson_around_the_image():
    from xrai.cryoem.noise import add_shot_noise, interaction_constant

    sigma_e = interaction_constant(300.0)
    assert sigma_e == pytest.approx(6.53e-4, rel=0.01)  # Kirkland: 0.000653 rad/(V A) at 300 kV
    image = torch.full((8, 64, 64), 50.0)  # V A: contrast 2 sigma_e P = 6.5 %
    noisy = add_shot_noise(image, 40.0, 1.0, 300.0, [image_rng(0, 0, 2, i) for i in range(8)]).double()
    expected_var = 40.0 * (1 - 2 * sigma_e * 50.0) / (40.0 * 2 * sigma_e) ** 2
    assert float(noisy.mean()) == pytest.approx(50.0, abs=3 * math.sqrt(expected_var / noisy.numel()))
    assert float(noisy.var()) == pytest.approx(expected_var, rel=0.05)


# --------------------------------------------------------------------------- datasets through the CLI
def _cryoem_cfg(tmp_path: Path, **cryoem) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "cryoem-test.yaml").read_text())
    cfg["cryoem"].update({"box_size": 32, "pixel_size_A": 3.6, "bfactor": 400.0}, **cryoem)
    cfg["simulation"].update(shard_size=128, batch_size=64)
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _simulate(cfg: Path, cif: Path, n: int, out: Path, split: str = "train") -> int:
    return main(["simulate-cryoem", "--config", str(cfg), "--protein", "4AKE", "--structure", str(cif),
                 "--split", split, "--n-images", str(n), "--out", str(out)])


def test_star_and_stacks_round_trip_resume_and_prefix(tmp_path, pdb_mirror):
    cif = pdb_mirror / "4ake.pdb"
    cfg = _cryoem_cfg(tmp_path, snr_db=None, ctf=True, shift_sigma_A=5.0)
    out = tmp_path / "ds" / "train_300.star"
    assert _simulate(cfg, cif, 300, out) == 0
    star = starfile.read(out, always_dict=True)
    optics, parts = star["optics"], star["particles"]
    assert {"rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
            "rlnImageSize", "rlnImageDimensionality"} <= set(optics.columns)
    assert optics.loc[0, "rlnImagePixelSize"] == pytest.approx(3.6) and optics.loc[0, "rlnImageSize"] == 32
    assert {"rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
            "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup"} <= set(parts.columns)
    assert len(parts) == 300
    index, stack = zip(*(name.split("@") for name in parts["rlnImageName"]), strict=True)
    index = np.array([int(i) for i in index])
    assert index[0] == 1 and index[127] == 128 and index[128] == 1 and index[-1] == 300 - 256  # 1-based, per stack
    assert len(set(stack)) == 3 and not Path(stack[0]).is_absolute()
    assert (parts["rlnDefocusU"].between(4000, 12000 + 600)).all()
    em = cryoem_config(load_config(cfg), "4AKE")
    params = image_parameters(em, 0, "train", 0, 300, 3.6)
    for i in (0, 150, 299):  # the image on disk is the noise-free image at the pose, shift and CTF in the STAR
        with mrcfile.open(out.parent / stack[i]) as mrc:
            assert mrc.voxel_size.x == pytest.approx(3.6) and mrc.is_image_stack()
            disk = np.asarray(mrc.data[index[i] - 1])
        from_star = {k: np.array([parts.loc[i, c]]) for k, c in (
            ("rot", "rlnAngleRot"), ("tilt", "rlnAngleTilt"), ("psi", "rlnAnglePsi"), ("origin_x_A", "rlnOriginXAngst"),
            ("origin_y_A", "rlnOriginYAngst"), ("defocus_u_A", "rlnDefocusU"), ("defocus_v_A", "rlnDefocusV"),
            ("defocus_angle_deg", "rlnDefocusAngle"))}
        vol = potential_from_file(cif, 32, 3.6, em["bfactor"])
        expect = noise_free_images(FourierProjector(torch.from_numpy(vol)), em, from_star, 3.6)[0].numpy()
        assert np.abs(disk - expect).max() < 1e-3 * np.abs(expect).max()
        assert params["rot"][i] == pytest.approx(parts.loc[i, "rlnAngleRot"], abs=1e-5)
    assert (out.parent / "train_300_stacks" / "config.yaml").is_file()
    assert (out.parent / "train_300_stacks" / "provenance.json").is_file()
    # resume: finished stacks are kept
    first = out.parent / stack[0]
    mtime = first.stat().st_mtime_ns
    out.unlink()
    assert _simulate(cfg, cif, 300, out) == 0
    assert first.stat().st_mtime_ns == mtime and out.is_file()
    # a smaller set is a prefix of a larger one; the test split differs
    small = tmp_path / "ds" / "train_100.star"
    assert _simulate(cfg, cif, 100, small) == 0
    assert starfile.read(small)["particles"]["rlnAngleRot"].tolist() == parts["rlnAngleRot"][:100].tolist()
    with mrcfile.open(small.parent / "train_100_stacks" / "train_100_0000.mrcs") as a, mrcfile.open(first) as b:
        assert np.array_equal(a.data, b.data[:100])
    test = tmp_path / "ds" / "test_100.star"
    assert _simulate(cfg, cif, 100, test, split="test") == 0
    assert starfile.read(test)["particles"]["rlnAngleRot"].tolist() != parts["rlnAngleRot"][:100].tolist()


def test_independent_relion_reconstruction_reaches_the_potential(tmp_path, pdb_mirror):
    """Acceptance: tests/relion_reference.py (no xrai code) reconstructs the set at its stated poses, shifts, CTF."""
    from relion_reference import fsc_against_volume

    cfg = _cryoem_cfg(tmp_path, snr_db=None, ctf=True, shift_sigma_A=6.0)
    cif = pdb_mirror / "4ake.pdb"
    out = tmp_path / "train_600.star"
    assert _simulate(cfg, cif, 600, out) == 0
    ref = tmp_path / "potential.mrc"
    assert main(["potential", "--config", str(cfg), "--protein", "4AKE", "--structure", str(cif), "--out", str(ref)]) == 0
    curve, low = fsc_against_volume(out, ref)
    assert low >= 0.8, curve


def test_noisy_float16_set_without_ctf(tmp_path, pdb_mirror):
    import json

    cfg = _cryoem_cfg(tmp_path, snr_db=-5.0, ctf=False, shift_sigma_A=0.0)
    data = yaml.safe_load(cfg.read_text())
    data["simulation"]["dtype"] = "float16"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "train_256.star"
    assert _simulate(cfg, pdb_mirror / "4ake.pdb", 256, out) == 0
    parts = starfile.read(out)["particles"]
    assert "rlnDefocusU" not in parts.columns  # no CTF columns for CTF-free data
    assert (parts["rlnOriginXAngst"] == 0).all()
    with mrcfile.open(out.parent / "train_256_stacks" / "train_256_0000.mrcs") as mrc:
        assert mrc.data.dtype == np.float16 and mrc.header.mode == 12
    summary = json.loads((out.parent / "train_256_stacks" / "simulation.json").read_text())
    assert summary["snr_db_measured"] == pytest.approx(-5.0, abs=0.5)


def test_config_errors():
    base = yaml.safe_load((REPO / "config" / "cryoem-test.yaml").read_text())
    cfg = copy.deepcopy(base)
    del cfg["cryoem"]
    with pytest.raises(XraiError, match="'cryoem' is a required property"):
        validate_config(cfg)
    cfg = copy.deepcopy(base)
    cfg["cryoem"]["defocus"]["distribution"] = "gamma"
    with pytest.raises(XraiError, match=r"cryoem\.defocus\.distribution.*uniform"):
        validate_config(cfg)
    cfg = copy.deepcopy(base)
    cfg["cryoem"]["snr"] = 3
    with pytest.raises(XraiError, match=r"unknown config key 'cryoem\.snr'"):
        validate_config(cfg)
    cfg = copy.deepcopy(base)
    cfg["proteins"] = [{"name": "4AKE_G", "pdb": "4AKE", "cryoem": {"snr_db": 0, "defocus": {"max_um": 2.0}}}]
    em = cryoem_config(validate_config(cfg), "4AKE_G")
    assert em["snr_db"] == 0 and em["defocus"] == {**base["cryoem"]["defocus"], "max_um": 2.0, "median_um": 1.4,
                                                   "log_sigma": 0.2}
    with pytest.raises(XraiError, match="modality"):
        cryoem_config(load_config(REPO / "config" / "test.yaml"))
