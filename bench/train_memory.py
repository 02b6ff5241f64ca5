"""Benchmark: peak memory of a training job at a config's image size (prints a Markdown table).

Runs ``xrai train`` in fresh processes on a tiny dataset simulated with the config's detector
(2 steps at each batch size of ``--batches``, on the CPU), reads each process's peak resident
memory, fits ``peak = base + per_image x batch`` and projects the config's ``train.batch_size``.
On the CPU the activations of the training step live in host memory; on a GPU the same
activations live in GPU memory, so the projection estimates the GPU memory a training job of
that config needs (which GPU model to ask Slurm for, docs/cluster.md).

Usage::

    .venv/bin/python bench/train_memory.py                          # config.yaml, batches 4 and 8
    .venv/bin/python bench/train_memory.py --config config/demo.yaml --batches 8 16
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
# Runs `xrai ARGS` and prints the process's peak resident set (kB) on its last line.
PEAK_RUNNER = ("import resource, sys; from xrai.cli import main; code = main(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def xrai(*args: str | Path) -> tuple[float, float]:
    """Run ``xrai ARGS`` in a fresh process; return (peak resident GB, wall seconds)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PEAK_RUNNER, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"xrai {args[0]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    peak_kb = int(res.stdout.strip().splitlines()[-1].split()[1])
    return peak_kb / 2**20, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--method", default="xrai")
    parser.add_argument("--protein", default="2CEX_A")
    args = parser.parse_args()

    cfg = yaml.safe_load(Path(args.config).read_text())
    batch = int(cfg["train"].get("batch_size", 64))
    n_px = int(cfg["detector"]["n_pixels"])
    with tempfile.TemporaryDirectory(prefix="xrai-bench-") as tmp:
        tmp = Path(tmp)
        cfg["proteins"] = [args.protein]
        cfg["train"].update(methods=[{"name": args.method, "runs": 1}], steps=2, checkpoint_every=2,
                            eval_every=2, eval_images=8, log_every=1, device="cpu")
        cfg["simulation"]["device"] = "cpu"
        base = tmp / "base.yaml"
        base.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cif = tmp / f"{args.protein}.cif"
        xrai("fetch", "--config", base, "--protein", args.protein, "--out", cif, "--summary", tmp / "summary.json")
        data = {}
        for split, n in (("train", 64), ("test", 16)):
            data[split] = tmp / f"{split}.h5"
            xrai("simulate", "--config", base, "--structure", cif, "--split", split, "--n-images", n,
                 "--out", data[split])
        rows = []
        for b in args.batches:
            cfg["train"]["batch_size"] = b
            cfg_b = tmp / f"batch{b}.yaml"
            cfg_b.write_text(yaml.safe_dump(cfg, sort_keys=False))
            peak, wall = xrai("train", "--config", cfg_b, "--method", args.method, "--run", "0",
                              "--train-data", data["train"], "--test-data", data["test"], "--out-dir", tmp / f"run{b}")
            rows.append((b, peak, wall))

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.config}: {n_px}x{n_px} px, method {args.method}, CPU\n")
    print("| batch | peak resident memory | wall (2 steps + outputs) |")
    print("|---:|---:|---:|")
    for b, peak, wall in rows:
        print(f"| {b} | {peak:.2f} GB | {wall:.0f} s |")
    if len(rows) >= 2:
        slope, intercept = np.polyfit([r[0] for r in rows], [r[1] for r in rows], 1)
        print(f"\nfit: {intercept:.2f} GB + {slope:.3f} GB per image; "
              f"projected at the config's batch {batch}: {intercept + slope * batch:.1f} GB")


if __name__ == "__main__":
    main()
