"""Rotation conventions used everywhere in xrai.

Conventions (one set, used by the simulator, the models and the metrics):

* A unit quaternion is stored as ``(w, x, y, z)`` with ``w >= 0``.
* ``quaternion_to_matrix(q)`` is the active rotation ``R`` it represents.
* An image with orientation ``R`` samples the molecule's reciprocal space at
  ``k = R @ q_pixel`` (equation 2 of the X-RAI paper), where ``q_pixel`` are the
  detector's Ewald-sphere coordinates in the lab frame (beam along +z).
* Rotating an image in-plane by pi (``torch.rot90(img, 2)``) changes its pose
  from ``R`` to ``R @ RZ_PI``.
* RELION's Euler angles ``(rot, tilt, psi)`` (ZYZ, degrees) give RELION's matrix
  ``A = relion_euler_to_matrix(rot, tilt, psi)`` (``Euler_angles2matrix``); the image is
  the projection of ``V(A^T r)``, whose Fourier transform is the central slice
  ``F(V)(A^T k)``: in xrai's convention the image's pose is therefore ``R = A^T``.

Usage::

    import torch
    from xrai.rotations import random_quaternions, quaternion_to_matrix
    q = random_quaternions(8, generator=torch.Generator().manual_seed(0))
    R = quaternion_to_matrix(q)           # (8, 3, 3)
"""

from __future__ import annotations

import math

import torch

#: In-plane rotation by pi about the beam axis (z).
RZ_PI = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))


def random_quaternions(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Draw ``n`` unit quaternions ``(w, x, y, z)`` uniformly over SO(3) (Haar measure)."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    return canonical_quaternion(q)


def canonical_quaternion(q: torch.Tensor) -> torch.Tensor:
    """Flip the sign of quaternions so that ``w >= 0`` (q and -q are the same rotation)."""
    sign = torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Convert unit quaternions ``(..., 4)`` in ``(w, x, y, z)`` order to rotation matrices ``(..., 3, 3)``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Convert rotation matrices ``(..., 3, 3)`` to unit quaternions ``(w, x, y, z)`` with ``w >= 0``."""
    import roma

    xyzw = roma.rotmat_to_unitquat(R)
    return canonical_quaternion(torch.cat([xyzw[..., 3:], xyzw[..., :3]], dim=-1))


def sixd_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """Map 6 numbers ``(..., 6)`` to a rotation by Gram-Schmidt (Zhou et al. 2019).

    The two 3-vectors are the first two columns before orthonormalisation; the
    third column is their cross product, so the result is always proper (det = +1).
    """
    a1, a2 = x[..., :3], x[..., 3:6]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_sixd(R: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sixd_to_matrix`: the first two columns, concatenated."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def rotation_angle(R: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (radians) of rotation matrices ``(..., 3, 3)``, numerically safe near 0 and pi."""
    import roma

    # via the quaternion: accurate at every angle, unlike acos((trace - 1) / 2)
    return roma.rotmat_to_rotvec(R).norm(dim=-1)


def angle_between(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (radians) of ``R1^T R2``: the rotation taking ``R1`` to ``R2``."""
    return rotation_angle(R1.transpose(-1, -2) @ R2)


def axis_angle_to_matrix(axis: torch.Tensor, angle: torch.Tensor | float) -> torch.Tensor:
    """Rotation by ``angle`` (radians) about ``axis`` (normalised here), via Rodrigues' formula."""
    import roma

    axis = torch.nn.functional.normalize(torch.as_tensor(axis, dtype=torch.float64), dim=-1)
    angle = torch.as_tensor(angle, dtype=axis.dtype)
    return roma.rotvec_to_rotmat(axis * angle[..., None])


def degrees(rad: torch.Tensor | float) -> torch.Tensor | float:
    """Radians to degrees."""
    return rad * (180.0 / math.pi)


def relion_euler_to_matrix(rot: torch.Tensor | float, tilt: torch.Tensor | float,
                           psi: torch.Tensor | float) -> torch.Tensor:
    """RELION's ``Euler_angles2matrix``: ZYZ angles in degrees -> ``A`` (..., 3, 3).

    ``A = Rz(psi) Ry(tilt) Rz(rot)`` with ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and
    ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]`` (rotations of the coordinate frame). A
    particle image is the projection of ``V(A^T r)``; its xrai pose is ``A^T``.

    Usage::

        A = relion_euler_to_matrix(torch.tensor([30.0]), torch.tensor([60.0]), torch.tensor([-45.0]))
    """
    a, b, g = (torch.deg2rad(torch.as_tensor(x, dtype=torch.float64)) for x in (rot, tilt, psi))
    a, b, g = torch.broadcast_tensors(a, b, g)
    ca, cb, cg, sa, sb, sg = a.cos(), b.cos(), g.cos(), a.sin(), b.sin(), g.sin()
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_relion_euler(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`relion_euler_to_matrix`: ``A`` (..., 3, 3) -> ``(rot, tilt, psi)`` degrees, tilt in [0, 180].

    At tilt 0 or 180 only ``rot + psi`` (``rot - psi``) is defined; ``rot`` is then 0.
    """
    A = A.double()
    sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    tilt = torch.atan2(sb, A[..., 2, 2])
    rot = torch.atan2(A[..., 2, 1], A[..., 2, 0])
    psi = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    degenerate = sb < 1e-9
    up = A[..., 2, 2] > 0
    psi_degenerate = torch.where(up, torch.atan2(-A[..., 1, 0], A[..., 0, 0]), torch.atan2(A[..., 1, 0], -A[..., 0, 0]))
    rot = torch.where(degenerate, torch.zeros_like(rot), rot)
    psi = torch.where(degenerate, psi_degenerate, psi)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)
