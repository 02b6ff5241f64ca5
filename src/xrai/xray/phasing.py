"""Phase retrieval: hybrid input-output (HIO) and error reduction (ER) with shrinkwrap.

From a Fourier amplitude volume ``|F|`` on a :class:`~xrai.volume.ReciprocalGrid` to a
real, positive electron density on the matching real-space grid (voxel size
``grid.voxel_size`` Å; FFT convention ``ifftshift -> ifftn -> fftshift``).

Algorithm (Fienup 1982; Marchesini et al. 2003 for shrinkwrap), for several random
starts run together as one batch on the CPU or GPU:

* initial support: the autocorrelation ``|IFFT(|F|^2)|`` thresholded at a fraction of
  its maximum (it spans the object's extent twice, so it contains the object);
* random phases on the measured amplitudes;
* cycles of ``hio_per_cycle`` HIO iterations (feedback ``beta``) then ``er_per_cycle``
  ER iterations; the real-space constraint is the support plus positivity; the last
  ``er_per_cycle`` iterations are always ER;
* every ``shrinkwrap_every`` iterations the support becomes the positive density
  blurred by a Gaussian of ``sigma`` voxels (decaying linearly from ``sigma_start`` to
  ``sigma_end``) thresholded at ``threshold`` times its maximum;
* the Fourier constraint applies only on *measured* voxels: the DC term, NaN
  amplitudes and voxels outside ``mask`` float freely (the missing low-q centre
  behind the beam, the cube's corners beyond the detector);
* the start with the lowest Fourier-space error
  ``sqrt(sum_measured (|F| - A)^2 / sum_measured A^2)`` wins; its density is centred
  by its (circular) centre of mass on voxel ``n // 2``.

Usage::

    from xrai.volume import read_volume_h5
    from xrai.xray.phasing import phase_er_hio, measured_mask
    amp, grid = read_volume_h5("results/reference/2CEX_A/intensity.h5", "amplitude")
    res = phase_er_hio(amp, mask=measured_mask(grid), n_starts=4, n_iterations=600)
    density = res.density          # (n, n, n) float32, indexed [x, y, z]

Command line::

    xrai phase --config config.yaml --best best.json --out density.mrc --history phasing.json
    xrai phase --config config.yaml --volume intensity.h5 --dataset intensity --out d.mrc --history h.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xrai.errors import XraiError
from xrai.volume import ReciprocalGrid

logger = logging.getLogger(__name__)


@dataclass
class PhasingResult:
    """The best start's density and support (centred, ``[x, y, z]``) and every start's error history."""

    density: torch.Tensor
    support: torch.Tensor
    error_history: list[list[float]]
    best_start: int
    final_errors: list[float] = field(default_factory=list)


def measured_mask(grid: ReciprocalGrid, q_min: float = 0.0, q_max: float | None = None) -> torch.Tensor:
    """Voxels of ``grid`` with ``q_min <= |q| <= q_max`` (default: the detector corner, ``grid.q_max``).

    Outside this shell nothing was measured, so the Fourier constraint must not apply there.
    """
    r = grid.coordinates().norm(dim=-1)
    q_max = grid.q_max if q_max is None else q_max
    # a small tolerance so that voxels exactly at q_max (along a diagonal) count as measured
    return (r >= q_min) & (r <= q_max * (1 + 1e-9))


def _gaussian_transfer(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fourier transfer function of a unit-sum Gaussian of ``sigma`` voxels, in unshifted FFT order."""
    f = torch.fft.fftfreq(n, device=device, dtype=dtype)
    g1 = torch.exp(-2 * (math.pi * sigma * f) ** 2)
    return g1[:, None, None] * g1[None, :, None] * g1[None, None, :]


def _shrinkwrap(rho: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    """Support = Gaussian-blurred positive density above ``threshold`` x its maximum, per start."""
    g = _gaussian_transfer(rho.shape[-1], sigma, rho.device, rho.dtype)
    blurred = torch.fft.ifftn(torch.fft.fftn(rho.clamp_min(0), dim=(-3, -2, -1)) * g, dim=(-3, -2, -1)).real
    peak = blurred.amax(dim=(-3, -2, -1), keepdim=True)
    return blurred > threshold * peak


def _centre_of_mass_shift(rho: torch.Tensor) -> list[int]:
    """Integer roll that brings the circular centre of mass of a centred-layout density to ``n // 2``."""
    n = rho.shape[-1]
    w = rho.clamp_min(0).double()
    theta = torch.arange(n, dtype=torch.float64, device=rho.device) * (2 * math.pi / n)
    shifts = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = w.sum(dim=other)
        ang = math.atan2(float((profile * torch.sin(theta)).sum()), float((profile * torch.cos(theta)).sum()))
        com = (ang % (2 * math.pi)) * n / (2 * math.pi)
        shifts.append(int(round(n // 2 - com)))
    return shifts


def phase_er_hio(
    amplitude: torch.Tensor,
    *,
    n_starts: int = 8,
    n_iterations: int = 1000,
    beta: float = 0.9,
    hio_per_cycle: int = 90,
    er_per_cycle: int = 10,
    shrinkwrap_every: int = 20,
    threshold: float = 0.1,
    sigma_start: float = 3.0,
    sigma_end: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> PhasingResult:
    """Phase an FFT-centred amplitude volume ``(n, n, n)`` into a positive density (see the module docstring).

    ``mask`` (bool, True = measured) restricts the Fourier constraint; NaN amplitudes
    and the DC voxel are never constrained. Returns a :class:`PhasingResult` on the CPU.
    """
    if amplitude.dim() != 3 or len(set(amplitude.shape)) != 1:
        raise ValueError(f"expected a cubic amplitude volume, got shape {tuple(amplitude.shape)}")
    if n_starts < 1 or n_iterations < 1 or er_per_cycle < 1:
        raise ValueError("n_starts, n_iterations and er_per_cycle must be >= 1")
    device = torch.device(device)
    n = amplitude.shape[0]
    amp = amplitude.detach().to(device=device, dtype=dtype)
    measured = torch.isfinite(amp)
    if mask is not None:
        if mask.shape != amp.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match amplitude {tuple(amp.shape)}")
        measured &= mask.to(device=device, dtype=torch.bool)
    measured[n // 2, n // 2, n // 2] = False  # the DC term floats
    amp = torch.where(measured, amp.clamp_min(0), torch.zeros_like(amp))
    if not measured.any() or float(amp.max()) <= 0:
        raise ValueError("the amplitude volume has no positive measured voxel")

    # work in unshifted FFT layout throughout; shift back once at the end
    A = torch.fft.ifftshift(amp)
    M = torch.fft.ifftshift(measured)
    norm = float((A * A)[M].sum())
    dims = (-3, -2, -1)

    autocorr = torch.fft.ifftn(A * A).real.abs()
    support = (autocorr > threshold * autocorr.max()).expand(n_starts, n, n, n).clone()

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    phases = torch.rand((n_starts, n, n, n), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    rho = torch.fft.ifftn(A * torch.exp(2j * math.pi * phases), dim=dims).real
    rho = torch.where(support, rho.abs(), torch.zeros_like(rho))

    cycle = hio_per_cycle + er_per_cycle
    history = torch.zeros(n_iterations, n_starts, dtype=torch.float64)
    n_shrink = max(1, n_iterations // shrinkwrap_every)
    for it in range(n_iterations):
        F = torch.fft.fftn(rho, dim=dims)
        mag = F.abs()
        diff = torch.where(M, mag - A, torch.zeros_like(mag))
        history[it] = (diff * diff).sum(dim=dims).double().div(norm).sqrt().cpu()
        F_proj = torch.where(M, F * (A / mag.clamp_min(1e-30)), F)
        rho_p = torch.fft.ifftn(F_proj, dim=dims).real
        ok = support & (rho_p >= 0)
        er = (it % cycle) >= hio_per_cycle or it >= n_iterations - er_per_cycle
        rho = torch.where(ok, rho_p, torch.zeros_like(rho_p) if er else rho - beta * rho_p)
        if (it + 1) % shrinkwrap_every == 0 and it < n_iterations - er_per_cycle:
            k = (it + 1) // shrinkwrap_every
            sigma = sigma_start + (sigma_end - sigma_start) * min(1.0, k / n_shrink)
            projected = torch.where(ok, rho_p, torch.zeros_like(rho_p))
            support = _shrinkwrap(projected, sigma, threshold)

    # final Fourier-space error of the real-space-constrained densities
    mag = torch.fft.fftn(rho, dim=dims).abs()
    diff = torch.where(M, mag - A, torch.zeros_like(mag))
    final = (diff * diff).sum(dim=dims).double().div(norm).sqrt().cpu()
    best = int(torch.argmin(final))
    logger.info("phasing: final Fourier errors %s; best start %d",
                [round(float(e), 4) for e in final], best)

    dens = torch.fft.fftshift(rho[best]).cpu().float()
    sup = torch.fft.fftshift(support[best]).cpu()
    shifts = _centre_of_mass_shift(dens)
    dens = torch.roll(dens, shifts=shifts, dims=(0, 1, 2))
    sup = torch.roll(sup, shifts=shifts, dims=(0, 1, 2))
    return PhasingResult(
        density=dens,
        support=sup,
        error_history=history.T.tolist(),
        best_start=best,
        final_errors=final.tolist(),
    )


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai phase``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--best", metavar="JSON", help="best.json of a reconstruction (phases <run_dir>/intensity.h5)")
    src.add_argument("--volume", metavar="H5", help="any volume file written by xrai.volume.write_volume_h5")
    parser.add_argument("--dataset", default="amplitude", choices=["amplitude", "intensity"],
                        help="volume to read from --volume (intensity is square-rooted); default amplitude")
    parser.add_argument("--out", required=True, metavar="MRC", help="output density (MRC, voxel size in Å)")
    parser.add_argument("--history", required=True, metavar="JSON", help="output error-metric history")
    parser.add_argument("--n-starts", type=int, help="override phasing.n_starts")
    parser.add_argument("--n-iterations", type=int, help="override phasing.n_iterations")
    parser.add_argument("--seed", type=int, help="override phasing.seed")
    parser.add_argument("--device", help="override phasing.device (auto, cpu, cuda)")


def _input_volume(args: argparse.Namespace) -> tuple[torch.Tensor, ReciprocalGrid, str]:
    from xrai.io import read_json
    from xrai.volume import read_volume_h5

    if args.best:
        best = read_json(args.best)
        if "run_dir" not in best:
            raise XraiError(f"{args.best}: missing key 'run_dir'")
        path = str(Path(best["run_dir"]) / "intensity.h5")
        amp, grid = read_volume_h5(path, "amplitude")
        return amp, grid, path
    vol, grid = read_volume_h5(args.volume, args.dataset)
    if args.dataset == "intensity":
        vol = vol.clamp_min(0).sqrt()
    return vol, grid, str(args.volume)


def run(args: argparse.Namespace) -> None:
    """``xrai phase``: amplitude volume -> density.mrc (+ error history JSON, config, provenance)."""
    from xrai.config import load_config
    from xrai.io import provenance, write_json, write_mrc, write_run_metadata
    from xrai.utils import pick_device

    cfg = load_config(args.config)
    pc = dict(cfg["phasing"])
    for key in ("n_starts", "n_iterations", "seed", "device"):
        if getattr(args, key) is not None:
            pc[key] = getattr(args, key)
    device = pick_device(pc.get("device", "auto"))
    amp, grid, source = _input_volume(args)
    logger.info("phasing %s (grid %d, voxel %.3f Å) on %s: %d starts x %d iterations",
                source, grid.size, grid.voxel_size, device, pc["n_starts"], pc["n_iterations"])
    t0 = time.perf_counter()
    try:
        res = phase_er_hio(
            amp,
            n_starts=int(pc["n_starts"]),
            n_iterations=int(pc["n_iterations"]),
            beta=float(pc["beta"]),
            hio_per_cycle=int(pc["hio_per_cycle"]),
            er_per_cycle=int(pc["er_per_cycle"]),
            shrinkwrap_every=int(pc["shrinkwrap_every"]),
            threshold=float(pc["shrinkwrap_threshold"]),
            sigma_start=float(pc["shrinkwrap_sigma_start"]),
            sigma_end=float(pc["shrinkwrap_sigma_end"]),
            seed=int(pc["seed"]),
            device=device,
            mask=measured_mask(grid),
        )
    except ValueError as exc:
        raise XraiError(f"{source}: {exc}") from None
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    write_mrc(out, res.density.numpy(), grid.voxel_size)
    write_json(args.history, {
        "input": source,
        "grid": {"size": grid.size, "q_max": grid.q_max, "dq": grid.dq, "voxel_size_A": grid.voxel_size},
        "settings": pc,
        "device": str(device),
        "best_start": res.best_start,
        "final_errors": res.final_errors,
        "support_voxels": int(res.support.sum()),
        "time_s": elapsed,
        "error_history": res.error_history,
        "provenance": provenance(seed=int(pc["seed"])),
    })
    write_run_metadata(out.parent, cfg, seed=int(pc["seed"]))
    logger.info("wrote %s (best start %d, Fourier error %.4f, %.1f s)", out, res.best_start,
                res.final_errors[res.best_start], elapsed)
