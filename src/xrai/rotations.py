"""Rotation conventions used everywhere in xrai.

Conventions (one set, used by the simulator, the models and the metrics):

* A unit quaternion is stored as ``(w, x, y, z)`` with ``w >= 0``.
* ``quaternion_to_matrix(q)`` is the active rotation ``R`` it represents.
* An image with orientation ``R`` samples the molecule's reciprocal space at
  ``k = R @ q_pixel`` (equation 2 of the X-RAI paper), where ``q_pixel`` are the
  detector's Ewald-sphere coordinates in the lab frame (beam along +z).
* Rotating an image in-plane by pi (``torch.rot90(img, 2)``) changes its pose
  from ``R`` to ``R @ RZ_PI``.

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
