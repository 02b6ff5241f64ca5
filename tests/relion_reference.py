"""An independent reader and reconstructor of RELION particle sets, written from RELION's documented conventions.

Nothing here imports xrai: it reads a STAR file + MRC stacks with ``starfile`` / ``mrcfile`` and
reconstructs with numpy, so that it checks xrai's simulator and reader instead of agreeing with
them by construction. Conventions (RELION 3.1, docs "Conventions" and the CTF of ``ctf.h``):

* ``A = Rz(psi) Ry(tilt) Rz(rot)``, frame rotations ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]``,
  ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``; the image is the projection along z of
  ``V(A^T r)``, so its Fourier transform is the central slice ``V^(A^T k)``, ``k = (kx, ky, 0)``;
* the image centre is pixel ``(W // 2, H // 2)``; ``rlnOriginX/YAngst`` translate the image to the
  centre: the particle sits at the centre minus the origin;
* CTF = ``-sin(pi lambda dz u^2 + pi/2 Cs lambda^3 u^4 - atan(Q0 / sqrt(1 - Q0^2)))`` with
  ``dz = -(U + V)/2 - (U - V)/2 cos(2 (theta - rlnDefocusAngle))`` (RELION's negative defocus),
  so CTF(0) = +Q0; defocus U lies along the angle, measured from the x axis;
* arrays: images ``[y, x]``, volumes ``[z, y, x]`` (as MRC files hold them).

Reconstruction: direct Fourier inversion. Each image is zero-padded, Fourier transformed, its
shift undone by a phase, and its central slice gridded trilinearly into a padded 3D Fourier grid
with CTF weights; the estimate is the Wiener ratio ``sum CTF F / (sum CTF^2 + 1/SNR)`` per voxel.

Usage::

    from relion_reference import fsc, read_particles, reconstruct_particles
    particles = read_particles("particles.star")
    volume = reconstruct_particles(particles)            # (N, N, N) [z, y, x]
    curve = fsc(volume, mrcfile.read("potential.mrc"))   # one value per shell, 0 .. N // 2
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import starfile


def euler_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` ``A`` (n, 3, 3) from ZYZ angles in degrees, by composing its rotations."""
    def rz(a):
        c, s = np.cos(a), np.sin(a)
        z, o = np.zeros_like(a), np.ones_like(a)
        return np.stack([np.stack([c, s, z], -1), np.stack([-s, c, z], -1), np.stack([z, z, o], -1)], -2)

    def ry(b):
        c, s = np.cos(b), np.sin(b)
        z, o = np.zeros_like(b), np.ones_like(b)
        return np.stack([np.stack([c, z, -s], -1), np.stack([z, o, z], -1), np.stack([s, z, c], -1)], -2)

    rot, tilt, psi = (np.deg2rad(np.atleast_1d(np.asarray(x, dtype=np.float64))) for x in (rot, tilt, psi))
    return rz(psi) @ ry(tilt) @ rz(rot)


def electron_wavelength_A(voltage_kv) -> np.ndarray:
    """Relativistic electron wavelength (Å) at ``voltage_kv`` (RELION's formula)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def centred_frequencies(n: int, pixel_size_A: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(kx, ky) grids (n, n) of a centred (fftshifted) 2D transform, cycles per Å (per pixel if pixel size 1)."""
    k = (np.arange(n) - n // 2) / (n * pixel_size_A)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    return kx, ky


def relion_ctf(n: int, pixel_size_A: float, defocus_u_A, defocus_v_A, defocus_angle_deg,
               voltage_kv, cs_mm, amplitude_contrast) -> np.ndarray:
    """RELION's CTF (m, n, n) on the centred transform of n x n images, one per set of parameters."""
    u_a, v_a, ang, kv, cs, q0 = (np.atleast_1d(np.asarray(x, dtype=np.float64))[:, None, None]
                                 for x in (defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kv, cs_mm, amplitude_contrast))
    kx, ky = centred_frequencies(n, pixel_size_A)
    lam = electron_wavelength_A(kv)
    k1 = np.pi * lam
    k2 = np.pi / 2 * (cs * 1e7) * lam**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0**2))
    u2 = kx**2 + ky**2
    deltaf = -(u_a + v_a) / 2 - (u_a - v_a) / 2 * np.cos(2 * (np.arctan2(ky, kx) - np.deg2rad(ang)))
    return -np.sin(k1 * deltaf * u2 + k2 * u2**2 - k3)


def read_particles(star_path: str | Path) -> dict[str, np.ndarray]:
    """A RELION 3.1 particle set in memory: images (n, H, W), ``A`` (n, 3, 3), origins (pixels), CTF.

    Returns ``images``, ``A``, ``origin_px`` (n, 2) (x, y), ``pixel_size_A`` (float), and
    ``ctf_params`` (dict of (n,) arrays for :func:`relion_ctf`) or None without rlnDefocusU.
    """
    star_path = Path(star_path)
    blocks = starfile.read(star_path, always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    optics = optics.set_index("rlnOpticsGroup").loc[parts["rlnOpticsGroup"].to_numpy()]
    pixel = optics["rlnImagePixelSize"].to_numpy(np.float64)
    if not np.allclose(pixel, pixel[0]):
        raise ValueError(f"{star_path}: several pixel sizes")
    images, stacks = [], {}
    for name in parts["rlnImageName"]:
        index, stack = name.split("@")
        path = Path(stack) if Path(stack).is_absolute() else star_path.parent / stack
        if path not in stacks:
            stacks[path] = mrcfile.read(path)
        data = stacks[path]
        images.append(data if data.ndim == 2 else data[int(index) - 1])
    origin = np.zeros((len(parts), 2))
    if "rlnOriginXAngst" in parts:
        origin = np.stack([parts["rlnOriginXAngst"], parts["rlnOriginYAngst"]], 1) / pixel[:, None]
    ctf = None
    if "rlnDefocusU" in parts:
        ctf = {"defocus_u_A": parts["rlnDefocusU"].to_numpy(np.float64),
               "defocus_v_A": parts["rlnDefocusV"].to_numpy(np.float64),
               "defocus_angle_deg": parts["rlnDefocusAngle"].to_numpy(np.float64),
               "voltage_kv": optics["rlnVoltage"].to_numpy(np.float64),
               "cs_mm": optics["rlnSphericalAberration"].to_numpy(np.float64),
               "amplitude_contrast": optics["rlnAmplitudeContrast"].to_numpy(np.float64)}
    return {"images": np.asarray(images, dtype=np.float32),
            "A": euler_matrix(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"]),
            "origin_px": origin, "pixel_size_A": float(pixel[0]), "ctf_params": ctf}


def write_particles(star_path: str | Path, images: np.ndarray, pixel_size_A: float, *, angles=None, origin_A=None,
                    ctf_params: dict | None = None, n_stacks: int = 1) -> None:
    """Write a RELION 3.1 particle set: ``star_path`` and ``n_stacks`` .mrcs stacks beside it (``i@name``, 1-based).

    ``angles`` (n, 3) rot, tilt, psi in degrees; ``origin_A`` (n, 2) rlnOriginX/YAngst; ``ctf_params`` as
    :func:`relion_ctf` takes them (one optics group: voltage, Cs and amplitude contrast of the first particle).
    """
    import pandas as pd

    star_path = Path(star_path)
    n, box = images.shape[0], images.shape[-1]
    optics = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [pixel_size_A],
              "rlnImageSize": [box], "rlnImageDimensionality": [2]}
    names = []
    for k, part in enumerate(np.array_split(np.arange(n), n_stacks)):
        stack = f"{star_path.stem}_{k:03d}.mrcs"
        with mrcfile.new(star_path.parent / stack, overwrite=True) as mrc:
            mrc.set_data(np.asarray(images[part], dtype=np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size_A
        names += [f"{i + 1:06d}@{stack}" for i in range(len(part))]
    particles = {"rlnImageName": names, "rlnOpticsGroup": np.ones(n, dtype=int)}
    if angles is not None:
        particles |= dict(zip(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), np.asarray(angles, dtype=np.float64).T, strict=True))
    if origin_A is not None:
        particles |= dict(zip(("rlnOriginXAngst", "rlnOriginYAngst"), np.asarray(origin_A, dtype=np.float64).T, strict=True))
    if ctf_params is not None:
        particles |= {"rlnDefocusU": ctf_params["defocus_u_A"], "rlnDefocusV": ctf_params["defocus_v_A"],
                      "rlnDefocusAngle": ctf_params["defocus_angle_deg"]}
        optics |= {"rlnVoltage": [float(np.ravel(ctf_params["voltage_kv"])[0])],
                   "rlnSphericalAberration": [float(np.ravel(ctf_params["cs_mm"])[0])],
                   "rlnAmplitudeContrast": [float(np.ravel(ctf_params["amplitude_contrast"])[0])]}
    starfile.write({"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)}, star_path,
                   float_format="%.6f")


def reconstruct(images: np.ndarray, A: np.ndarray, origin_px: np.ndarray, ctf_params: dict | None = None,
                pixel_size_A: float = 1.0, *, pad: int = 2, snr: float = 1e3, chunk: int = 128) -> np.ndarray:
    """Direct Fourier inversion (n, N, N) images -> (N, N, N) volume ``[z, y, x]``.

    ``A`` RELION matrices (n, 3, 3); ``origin_px`` (n, 2) RELION origins in pixels; ``ctf_params``
    (dict of (n,) arrays, as :func:`relion_ctf` takes them) or None (no CTF). Images are padded to
    ``pad * N`` (the CTF is evaluated on that grid) and so is the 3D Fourier grid.
    """
    n_img, box = images.shape[0], images.shape[-1]
    size = pad * box
    off = size // 2 - box // 2
    num = np.zeros(size**3, dtype=np.complex128)
    den = np.zeros(size**3, dtype=np.float64)
    kx, ky = centred_frequencies(size)                    # cycles per pixel
    inside = kx**2 + ky**2 <= 0.25                         # within Nyquist
    kx, ky = kx[inside], ky[inside]
    for s in range(0, n_img, chunk):
        e = min(s + chunk, n_img)
        padded = np.zeros((e - s, size, size))
        padded[:, off:off + box, off:off + box] = images[s:e]
        f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(padded, axes=(-2, -1))), axes=(-2, -1))[:, inside]
        # undo the shift: the particle sits at centre - origin, so centred(k) = F(k) exp(-2 pi i k.origin)
        o = origin_px[s:e]
        f = f * np.exp(-2j * np.pi * (kx[None] * o[:, :1] + ky[None] * o[:, 1:]))
        if ctf_params is None:
            c = np.ones(f.shape)
        else:
            c = relion_ctf(size, pixel_size_A, **{k: np.asarray(v)[s:e] for k, v in ctf_params.items()})[:, inside]
        # slice coordinates A^T (kx, ky, 0), in padded-grid voxels from the centre
        at = np.transpose(A[s:e], (0, 2, 1))
        g = (at[:, :, 0, None] * kx[None, None] + at[:, :, 1, None] * ky[None, None]) * size + size // 2
        _grid_trilinear(num, den, g[:, 0].ravel(), g[:, 1].ravel(), g[:, 2].ravel(),
                        (c * f).ravel(), (c * c).ravel(), size)
    vol_f = (num / (den + 1.0 / snr)).reshape(size, size, size)
    vol = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(vol_f))).real
    return vol[off:off + box, off:off + box, off:off + box]


def _grid_trilinear(num, den, x, y, z, value, weight, size) -> None:
    """Add ``value`` and ``weight`` at fractional voxels (x, y, z) to flat [z, y, x] grids, trilinearly."""
    x0, y0, z0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64), np.floor(z).astype(np.int64)
    tx, ty, tz = x - x0, y - y0, z - z0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (tx if dx else 1 - tx) * (ty if dy else 1 - ty) * (tz if dz else 1 - tz)
                xi, yi, zi = x0 + dx, y0 + dy, z0 + dz
                ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size) & (zi >= 0) & (zi < size)
                flat = (zi[ok] * size + yi[ok]) * size + xi[ok]
                wv = w[ok]
                num += np.bincount(flat, weights=wv * value.real[ok], minlength=size**3) \
                    + 1j * np.bincount(flat, weights=wv * value.imag[ok], minlength=size**3)
                den += np.bincount(flat, weights=wv * weight[ok], minlength=size**3)


def reconstruct_particles(particles: dict, **kwargs) -> np.ndarray:
    """:func:`reconstruct` of what :func:`read_particles` returns (CTF-weighted where it has CTF parameters)."""
    return reconstruct(particles["images"], particles["A"], particles["origin_px"], particles["ctf_params"],
                       particles["pixel_size_A"], **kwargs)


def fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier shell correlation of two (N, N, N) volumes, one value per shell 0 .. N // 2 (cycles N / shell)."""
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(a.shape[0])
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    shell = np.round(np.sqrt(kx**2 + ky**2 + kz**2) * a.shape[0]).astype(int).ravel()
    n_shells = a.shape[0] // 2 + 1
    keep = shell < n_shells
    shell = shell[keep]
    cross = np.bincount(shell, (fa * fb.conj()).real.ravel()[keep], n_shells)
    pa = np.bincount(shell, (np.abs(fa) ** 2).ravel()[keep], n_shells)
    pb = np.bincount(shell, (np.abs(fb) ** 2).ravel()[keep], n_shells)
    return cross / np.sqrt(pa * pb + 1e-300)


def fsc_against_volume(star_path: str | Path, volume_mrc: str | Path, **kwargs) -> tuple[np.ndarray, float]:
    """Reconstruct a particle set at its stated poses and compare it with a reference volume (MRC, same box).

    Returns the FSC curve (shells 0 .. N // 2) and its minimum over shells 1 .. N // 8 (up to a
    quarter of Nyquist), the number the acceptance criterion asks to be >= 0.8.
    Example: ``curve, low = fsc_against_volume("results/.../train.star", "results/.../potential.mrc")``.
    """
    particles = read_particles(star_path)
    with mrcfile.open(volume_mrc, permissive=True) as mrc:
        reference = np.asarray(mrc.data, dtype=np.float64)
        voxel = float(mrc.voxel_size.x)
    box = particles["images"].shape[-1]
    if reference.shape != (box,) * 3:
        raise ValueError(f"{volume_mrc}: volume of shape {reference.shape}, the particles are {box} px")
    if not np.isclose(voxel, particles["pixel_size_A"], rtol=1e-3):
        raise ValueError(f"{volume_mrc}: voxel size {voxel} A, the particles' pixel size is {particles['pixel_size_A']} A")
    curve = fsc(reconstruct_particles(particles, **kwargs), reference)
    return curve, float(curve[1:box // 8 + 1].min())
