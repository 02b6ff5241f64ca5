"""RELION's Euler convention against an independent reference (scipy) and known cases."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from xrai.rotations import matrix_to_relion_euler, relion_euler_to_matrix


def test_relion_matrix_is_the_transposed_intrinsic_zyz_rotation():
    rng = np.random.default_rng(0)
    angles = np.stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)], axis=1)
    A = relion_euler_to_matrix(*torch.from_numpy(angles).T).numpy()
    ref = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(A, ref, atol=1e-12)


def test_relion_rot_90_rotates_the_frame():
    # rot = 90 about z, frame rotation: x' = y, y' = -x
    A = relion_euler_to_matrix(90.0, 0.0, 0.0).numpy()
    np.testing.assert_allclose(A, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt = 90: the new z axis is the old x axis
    A = relion_euler_to_matrix(0.0, 90.0, 0.0).numpy()
    np.testing.assert_allclose(A[2], [1, 0, 0], atol=1e-12)


@pytest.mark.parametrize("tilt", [0.0, 180.0, 1e-3, 37.0, 179.999])
def test_matrix_to_relion_euler_round_trip(tilt):
    rng = np.random.default_rng(1)
    rot = torch.from_numpy(rng.uniform(-180, 180, 20))
    psi = torch.from_numpy(rng.uniform(-180, 180, 20))
    A = relion_euler_to_matrix(rot, torch.full((20,), tilt, dtype=torch.float64), psi)
    back = relion_euler_to_matrix(*matrix_to_relion_euler(A))
    torch.testing.assert_close(back, A, atol=1e-9, rtol=0)
    assert torch.all((matrix_to_relion_euler(A)[1] >= 0) & (matrix_to_relion_euler(A)[1] <= 180))
