"""Benchmark: ER/HIO + shrinkwrap phasing time per grid size (prints a Markdown table).

Times ``xrai.xray.phasing.phase_er_hio`` on the amplitudes of a synthetic Gaussian-blob
density (the cost does not depend on the content) for each grid size, number of
random starts and number of CPU threads, and projects the time of the pipeline's
phasing settings (``n_starts x n_iterations`` of config.yaml / config/demo.yaml /
config/test.yaml) from the measured time per iteration.

Usage::

    .venv/bin/python bench/phase.py                       # sizes 32 48 64 96, 1 and 2 threads
    .venv/bin/python bench/phase.py --sizes 32 64 --starts 1 8 --iterations 40 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from xrai.volume import ReciprocalGrid
from xrai.xray.phasing import measured_mask, phase_er_hio


def blob_amplitudes(n: int, seed: int = 0) -> tuple[torch.Tensor, ReciprocalGrid]:
    """|FFT| of 300 Gaussian blobs filling about 1/3 of the box per axis (oversampling ~3)."""
    rng = np.random.default_rng(seed)
    ax = np.arange(n) - n // 2
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    rho = np.zeros((n, n, n))
    for c in rng.normal(0, n / 14, size=(300, 3)):
        rho += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * (n / 40) ** 2))
    amp = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rho))))
    return torch.from_numpy(amp).float(), ReciprocalGrid(n, 0.125)


def time_per_iteration(amp: torch.Tensor, grid: ReciprocalGrid, starts: int, iterations: int, device: str) -> float:
    """Seconds per iteration (all starts together), after one warm-up call."""
    kw = dict(n_starts=starts, mask=measured_mask(grid), device=device, hio_per_cycle=18, er_per_cycle=2,
              shrinkwrap_every=5)
    phase_er_hio(amp, n_iterations=2, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    phase_er_hio(amp, n_iterations=iterations, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 96])
    parser.add_argument("--starts", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=40, help="timed iterations per measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    settings = {"test (2 x 300)": 600, "demo (4 x 600)": 2400, "paper (8 x 2000)": 16000}
    print(f"# phasing time, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {args.device}\n")
    print("| grid | starts | threads | ms / iteration | ms / start-iteration | "
          + " | ".join(f"{k} s" for k in settings) + " |")
    print("|---|---|---|---|---|" + "---|" * len(settings))
    for n in args.sizes:
        amp, grid = blob_amplitudes(n)
        for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            for starts in args.starts:
                t = time_per_iteration(amp, grid, starts, args.iterations, args.device)
                per_start = t / starts
                proj = " | ".join(f"{per_start * total:.0f}" for total in settings.values())
                print(f"| {n}³ | {starts} | {threads} | {1e3 * t:.1f} | {1e3 * per_start:.1f} | {proj} |", flush=True)


if __name__ == "__main__":
    main()
