"""The tests' small cryo-EM particle sets (fixtures ``particle_sets`` and ``adk_sets`` in tests/conftest.py).

A volume is projected by the simulator's Fourier-slice projector, filtered by CTF and shifts,
given white noise at 0 dB and written as a RELION 3.1 set with the independent writer of
tests/relion_reference.py: 1,536 train + 256 test images of 32 px at 3.2 Å.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from relion_reference import euler_matrix, write_particles
from test_relion_reference import random_poses

from xrai.io import write_mrc

BOX, PIXEL_A, N_TRAIN, N_TEST = 32, 3.2, 1536, 256
#: 4AKE's potential at 3.2 Å: B-factor >= 2 pi^2 px^2 / 2 against aliasing
BFACTOR = 200.0


def simulate(vol_zyx: np.ndarray, n: int, rng: np.random.Generator, snr_db: float | None) -> dict:
    """``n`` images of a ``[z, y, x]`` volume at random poses, origins (σ 2.5 Å) and CTFs, noise at ``snr_db``."""
    from xrai.cryoem.ctf import CtfParams, fourier_filter
    from xrai.cryoem.projection import FourierProjector

    angles = random_poses(rng, n)
    A = torch.tensor(euler_matrix(*angles.T), dtype=torch.float32)
    origin_A = rng.normal(0, 2.5, (n, 2))
    u = rng.uniform(5000, 15000, n)
    ctf = dict(defocus_u_A=u, defocus_v_A=u - rng.uniform(0, 300, n), defocus_angle_deg=rng.uniform(0, 180, n),
               voltage_kv=np.full(n, 300.0), cs_mm=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1))
    clean = FourierProjector(torch.from_numpy(vol_zyx).float(), pad_factor=2).project(A)
    params = CtfParams(**{k: torch.tensor(ctf[k]) for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg")},
                       voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    images = fourier_filter(clean, PIXEL_A, ctf=params, shifts_px=-torch.tensor(origin_A) / PIXEL_A, pad_factor=2)
    if snr_db is not None:
        sigma = float(images.var()) ** 0.5 / 10 ** (snr_db / 20)
        images = images + sigma * torch.from_numpy(rng.normal(size=images.shape)).float()
    return {"images": images.numpy(), "angles": angles, "origin_A": origin_A, "ctf": ctf}


def particle_sets(folder: Path, vol_zyx: np.ndarray, rng: np.random.Generator) -> dict:
    """``train.star`` / ``test.star`` of ``vol_zyx`` at 0 dB in ``folder``, and ``reference.mrc`` (``[x, y, z]``)."""
    write_mrc(folder / "reference.mrc", vol_zyx.transpose(2, 1, 0), PIXEL_A)
    out = {"folder": folder, "reference": folder / "reference.mrc", "volume_xyz": vol_zyx.transpose(2, 1, 0)}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        s = simulate(vol_zyx, n, rng, snr_db=0.0)
        write_particles(folder / f"{split}.star", s["images"], PIXEL_A, angles=s["angles"], origin_A=s["origin_A"],
                        ctf_params=s["ctf"])
        out[split] = folder / f"{split}.star"
    return out
