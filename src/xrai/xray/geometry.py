"""Detector and beam: Ewald-sphere pixel coordinates, polarization and solid angle.

The same physics and image layout as skopi's ``SimpleSquareDetector`` and ``Beam``
(checked against them in ``tests/test_geometry.py``), in xrai's units.

Conventions
-----------
* Lab frame: the beam travels along +z and is polarized along x; the detector is
  a flat square of ``n_pixels`` x ``n_pixels`` pixels at ``z = distance_m``, centred
  on the beam, pixel centres at ``-side/2 + (i + 1/2) * side / n_pixels``.
* Image layout: ``image[row, col]`` is the pixel at ``y = y[row]``, ``x = x[col]``
  (rows follow y, columns follow x). This is skopi's *unassembled* panel layout,
  ``det.pixel_position[0]`` (skopi builds it with ``meshgrid(x, y, indexing='xy')``);
  note that skopi's ``assemble_image_stack`` returns the transpose, ``[x, y]``.
  Every xrai image and ``pixel_position_reciprocal`` use the ``[row=y, col=x]`` layout,
  so ``torch.rot90(img, 2, dims=(-2, -1))`` maps ``(x, y) -> (-x, -y)``: the pose
  ``R @ RZ_PI`` (see :mod:`xrai.rotations`).
* Reciprocal coordinates are in Angstrom^-1 **without** 2*pi: ``q = (pixel_dir - z) / lambda``
  (exact Ewald sphere, ``|q| = 2 sin(theta) / lambda``). skopi uses the same
  definition in m^-1 (``wavevector = [0, 0, 1/lambda]``), so ``q_xrai = 1e-10 * q_skopi``.
* Polarization factor ``|x_hat x pixel_dir|^2 = 1 - dir_x^2`` (skopi's
  ``get_polarization_correction`` with ``Beam.Polarization = [1, 0, 0]``).
* Solid angle ``pixel_area * cos(alpha) / r^2`` with ``cos(alpha) = distance / r``
  (skopi's ``solid_angle``).
* Orientations: skopi's ``quaternion2rot3d`` is the same ``(w, x, y, z)`` -> active
  rotation matrix as :func:`xrai.rotations.quaternion_to_matrix`, and skopi's
  ``take_slice`` samples the volume at ``pixel_q @ R.T``, i.e. ``k = R @ q_pixel`` like
  xrai. The mapping between the two conventions is therefore the identity: the
  same quaternion gives the same pattern (``tests/test_scattering.py`` checks it).

Usage::

    from xrai.xray.geometry import Beam, Detector
    det = Detector(n_pixels=128, side_m=0.1, distance_m=0.2)
    beam = Beam(photon_energy_ev=4600, photons_per_pulse=1e12, focus_radius_m=0.5e-6)
    q = det.pixel_position_reciprocal(beam)   # (128, 128, 3) float64, Angstrom^-1
    print(det.q_max(beam))                    # ~0.1256 Angstrom^-1: resolution ~8 Angstrom
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from xrai.volume import ReciprocalGrid

logger = logging.getLogger(__name__)

#: h * c in eV * Angstrom (skopi: 1.23984197386209e-06 eV * m).
HC_EV_ANGSTROM = 12398.4197386209
#: Classical electron radius in m (skopi's ``Thomson_factor`` is its square).
ELECTRON_RADIUS_M = 2.817895019671143e-15


@dataclass(frozen=True)
class Beam:
    """A monochromatic beam along +z, polarized along x, with a uniform circular focus.

    ``photon_energy_ev`` (eV), ``photons_per_pulse``, ``focus_radius_m`` (m): the
    fluence is ``photons_per_pulse / (pi * focus_radius_m**2)`` photons per m^2
    (skopi's ``Beam(focus_radius=...)``: a circle of diameter ``2 * radius``).
    """

    photon_energy_ev: float
    photons_per_pulse: float
    focus_radius_m: float

    def __post_init__(self) -> None:
        for name in ("photon_energy_ev", "photons_per_pulse", "focus_radius_m"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Beam.{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: dict) -> Beam:
        """Build from the resolved pipeline config (its ``beam`` section)."""
        b = cfg["beam"]
        return cls(float(b["photon_energy_ev"]), float(b["photons_per_pulse"]), float(b["focus_radius_m"]))

    @property
    def wavelength_A(self) -> float:
        """Wavelength in Angstrom."""
        return HC_EV_ANGSTROM / self.photon_energy_ev

    @property
    def fluence_per_m2(self) -> float:
        """Photons per m^2 in one pulse."""
        return self.photons_per_pulse / (math.pi * self.focus_radius_m**2)

    def to_dict(self) -> dict:
        """Plain dict (for HDF5 attrs / JSON), with the derived wavelength."""
        return {**asdict(self), "wavelength_A": self.wavelength_A}


def ewald_q(pixel_positions_m: torch.Tensor, wavelength_A: float) -> torch.Tensor:
    """Ewald-sphere coordinates ``q = (pixel_dir - z) / lambda`` (Angstrom^-1, no 2*pi) of pixel centres ``(..., 3)`` in m.

    The sample sits at the origin and the beam travels along +z. Any detector geometry
    (a flat square :class:`Detector`, a CXI file's basis vectors) goes through this one formula.

    Usage::

        q = ewald_q(Detector(32, 0.1, 0.2).pixel_positions_m(), 2.695)   # (32, 32, 3)
    """
    pos = torch.as_tensor(pixel_positions_m, dtype=torch.float64)
    d = pos / pos.norm(dim=-1, keepdim=True)
    d[..., 2] -= 1.0
    return d / wavelength_A


@dataclass(frozen=True)
class Detector:
    """A flat square detector of ``n_pixels`` per side, ``side_m`` wide, ``distance_m`` from the sample."""

    n_pixels: int
    side_m: float
    distance_m: float

    def __post_init__(self) -> None:
        if int(self.n_pixels) < 1:
            raise ValueError(f"Detector.n_pixels must be >= 1, got {self.n_pixels}")
        if not (self.side_m > 0 and self.distance_m > 0):
            raise ValueError(f"Detector side and distance must be > 0, got {self.side_m}, {self.distance_m}")

    @classmethod
    def from_config(cls, cfg: dict) -> Detector:
        """Build from the resolved pipeline config (its ``detector`` section)."""
        d = cfg["detector"]
        return cls(int(d["n_pixels"]), float(d["side_m"]), float(d["distance_m"]))

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(H, W)``."""
        return (self.n_pixels, self.n_pixels)

    @property
    def pixel_size_m(self) -> float:
        """Pixel pitch in m."""
        return self.side_m / self.n_pixels

    def to_dict(self) -> dict:
        """Plain dict (for HDF5 attrs / JSON)."""
        return asdict(self)

    def pixel_positions_m(self) -> torch.Tensor:
        """Pixel centres in the lab frame, m, shape ``(H, W, 3)`` float64, layout ``[row=y, col=x]``."""
        n, sep = self.n_pixels, self.pixel_size_m
        ax = -self.side_m / 2 + sep / 2 + torch.arange(n, dtype=torch.float64) * sep
        y, x = torch.meshgrid(ax, ax, indexing="ij")  # y varies along rows, x along columns
        return torch.stack([x, y, torch.full_like(x, self.distance_m)], dim=-1)

    def pixel_directions(self) -> torch.Tensor:
        """Unit vectors from the sample to each pixel centre, ``(H, W, 3)`` float64."""
        pos = self.pixel_positions_m()
        return pos / pos.norm(dim=-1, keepdim=True)

    def pixel_position_reciprocal(self, beam: Beam) -> torch.Tensor:
        """Exact Ewald-sphere coordinates ``q = (pixel_dir - z) / lambda``, Angstrom^-1 (no 2*pi), ``(H, W, 3)``."""
        return ewald_q(self.pixel_positions_m(), beam.wavelength_A)

    def polarization(self, beam: Beam | None = None) -> torch.Tensor:
        """Polarization factor ``|x_hat x pixel_dir|^2`` (beam polarized along x), ``(H, W)`` float64.

        ``beam`` is accepted for symmetry with the other methods; every xrai beam is polarized along x.
        """
        d = self.pixel_directions()
        return 1.0 - d[..., 0] ** 2

    def solid_angle(self) -> torch.Tensor:
        """Solid angle of each pixel, sr: ``area * cos(alpha) / r^2``, ``(H, W)`` float64."""
        r = self.pixel_positions_m().norm(dim=-1)
        return self.pixel_size_m**2 * (self.distance_m / r) / r**2

    def linear_correction(self, beam: Beam) -> torch.Tensor:
        """Photons per pixel per electron^2 of ``|F|^2``: ``fluence * r_e^2 * polarization * solid angle``, ``(H, W)``.

        skopi's ``detector.linear_correction``.
        """
        return beam.fluence_per_m2 * ELECTRON_RADIUS_M**2 * self.polarization(beam) * self.solid_angle()

    def q_max(self, beam: Beam) -> float:
        """Largest ``|q|`` on the detector (a corner pixel's centre), Angstrom^-1."""
        return float(self.pixel_position_reciprocal(beam).norm(dim=-1).max())

    def resolution_A(self, beam: Beam) -> float:
        """Full-period resolution at the detector corner, ``1 / q_max``, Angstrom."""
        return 1.0 / self.q_max(beam)


def reciprocal_grid(cfg: dict) -> ReciprocalGrid:
    """The reconstruction grid of a config: ``ReciprocalGrid(volume.grid_size, detector corner |q|)``.

    The one grid shared by training, EMC, phasing and the reference volumes.

    Usage::

        from xrai.config import load_config
        grid = reciprocal_grid(load_config("config/test.yaml"))   # 32^3, q_max ~0.125
    """
    det, beam = Detector.from_config(cfg), Beam.from_config(cfg)
    return ReciprocalGrid(int(cfg.get("volume", {}).get("grid_size", 64)), det.q_max(beam))


def simulation_mesh(detector: Detector, beam: Beam, mesh_size: int) -> ReciprocalGrid:
    """The structure-factor mesh the simulator slices: ``mesh_size`` points per axis covering the detector's |q|.

    For odd sizes it is skopi's mesh, ``linspace(-q_corner, q_corner, mesh_size)`` per axis
    (``DetectorBase.get_reciprocal_mesh``), expressed as a :class:`ReciprocalGrid` whose
    outermost voxels sit at ``+-q_corner``; for even sizes the positive side ends at ``q_corner``.
    Every rotated pixel (``|k| <= q_corner``) therefore lies inside the mesh.
    """
    if mesh_size < 5:
        raise ValueError(f"mesh_size must be >= 5, got {mesh_size}")
    q_corner = detector.q_max(beam)
    half = mesh_size // 2
    if mesh_size % 2:  # outermost voxel (index 2 * half) at +q_corner: dq = q_corner / half
        return ReciprocalGrid(mesh_size, q_corner * (half - 1) / half)
    return ReciprocalGrid(mesh_size, q_corner)
