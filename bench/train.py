"""Benchmark the training step (``xrai train``): time, throughput and memory per detector size and dataset size.

Two tables, each row measured in a fresh process (peak memory = that process's VmHWM):

1. **Detector size** (the paper's recipe, ``xrai-paper``, full architecture from the
   config: VGG 64-256 channels, FourierNet width 256): step time, images per second and
   peak memory at 32, 64 and 128 px. The batch shrinks with the detector so that one
   step queries the same number of decoder points (64 images at 32 px, 16 at 64 px,
   4 at 128 px: the paper's batch of 64 does not fit this machine's memory above
   32 px); the "per 64 images" column scales the step time linearly to the paper's batch.
   Then the default recipe (``xrai``) at its batch of 64 for the same sizes (a step of the
   bounded search phase, the most expensive kind).
2. **Dataset size**: the same loop streaming shuffled batches of 64 from a 10K- and a
   1M-image file (32 px, simulated with ``xrai simulate``, deleted afterwards), with a
   reduced model so that reading is a visible share of the step: step time, time
   spent waiting for data, and memory must not grow with the number of images.

Usage::

    .venv/bin/python bench/train.py [--quick] [--threads N] [--pdb ../shared/pdb/2cex.pdb]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: a reduced paper-recipe model for the dataset-size rows (same structure, narrower)
SMALL_MODEL = {"encoder": {"channels": [16, 32, 32, 32, 32], "mlp": [64]}, "decoder": {"width": 64}}


def _config(n_pixels: int, batch: int, train: dict | None = None) -> dict:
    from xrai.config import load_config

    cfg = load_config(REPO / "config.yaml")
    cfg["detector"]["n_pixels"] = n_pixels
    cfg["simulation"].update(mesh_size=65, test_size=64, train_sizes=[256])
    cfg["train"].update(batch_size=batch, device="cpu", eval_images=64)
    cfg["train"].update(copy.deepcopy(train or {}))
    return cfg


def _simulate(cfg: dict, cif: Path, n: int, out: Path) -> float:
    from xrai.xray.simulate import simulate_dataset

    t = time.perf_counter()
    simulate_dataset(cfg, cif, "train", n, out)
    return time.perf_counter() - t


def worker(spec: dict) -> dict:
    """Time ``steps`` training steps after one warm-up step; return the measurements (runs in a child process)."""
    import torch

    from xrai.data.hdf5 import DiffractionDataset
    from xrai.recon.recipe import Batch
    from xrai.recon.recipes import get_recipe
    from xrai.recon.train import BatchStream, imaging_model
    from xrai.utils import seed_everything, set_cpu_threads

    set_cpu_threads(spec["threads"])
    cfg = spec["cfg"]
    device = torch.device("cpu")
    ds = DiffractionDataset(spec["data"])
    recipe = get_recipe(spec["method"], cfg)
    seed_everything(0)
    model = recipe.build_model(imaging_model(cfg, ds)).to(device)
    optimizer = recipe.build_optimizer(model)
    recipe.prepare(model, ds, device)
    stream = BatchStream(ds, int(cfg["train"]["batch_size"]), seed=0)
    step_s, data_s = [], []
    for step in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        batch = Batch(stream.next(), device)
        t1 = time.perf_counter()
        recipe.training_step(model, optimizer, batch, step)
        t2 = time.perf_counter()
        if step > 0:  # step 0 warms up (allocations, first window read)
            step_s.append(t2 - t0)
            data_s.append(t1 - t0)
        else:
            first_batch_s = t1 - t0
    status = Path("/proc/self/status").read_text().splitlines()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmHWM", "VmRSS"))}
    return {"step_s": step_s, "data_s": data_s, "first_batch_s": first_batch_s, "peak_rss_mb": kb["VmHWM"] / 1024, "rss_mb": kb["VmRSS"] / 1024,
            "batch": int(cfg["train"]["batch_size"]), "params": sum(p.numel() for p in model.parameters())}


def run_worker(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({spec['label']}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def detector_table(cif: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Step time / throughput / memory at 32, 64 and 128 px: the paper's recipe (full architecture)
    and the default recipe (``xrai``, its batch of 64 at every size, a step of the bounded search)."""
    print("\n## Detector size: the paper's recipe (xrai-paper, full architecture) and the default (xrai)\n")
    print("| method | detector | batch | decoder points / step | step s | images / s | step s per 64 images | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    sizes = (32,) if args.quick else (32, 64, 128)
    cases = [("xrai-paper", n_px, {32: 64, 64: 16, 128: 4}[n_px]) for n_px in sizes]
    cases += [("xrai", n_px, 64) for n_px in sizes]
    for method, n_px, batch in cases:
        cfg = _config(n_px, batch)
        data = tmp / f"det{n_px}.h5"
        if not data.exists():
            _simulate(cfg, cif, max(256, 4 * batch), data)
        r = run_worker({"label": f"{method} {n_px}px", "cfg": cfg, "data": str(data), "method": method,
                        "steps": args.steps, "threads": args.threads})
        t = float(np.median(r["step_s"]))
        points = f"{2 * batch * n_px * n_px:,}" if method == "xrai-paper" else "–"
        print(f"| {method} | {n_px} px | {batch} | {points} | {t:.2f} | {batch / t:.1f} | "
              f"{t * 64 / batch:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)
    for n_px in sizes:
        (tmp / f"det{n_px}.h5").unlink(missing_ok=True)


def dataset_table(cif: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Step time and memory of the streaming loop for files of 10K, 100K and 1M images (deleted afterwards)."""
    print("\n## Dataset size: 32 px, batch 64, shuffled stream, reduced model "
          f"(VGG {SMALL_MODEL['encoder']['channels']}, FourierNet width {SMALL_MODEL['decoder']['width']})\n")
    print("| images in file | file GB | simulate s | first batch s | step s (median) | step s (p95) "
          "| data wait s / step | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (10_000, 100_000) if args.quick else (10_000, 100_000, args.big):
        cfg = _config(32, 64, SMALL_MODEL)
        data = tmp / f"train_{n}.h5"
        sim_s = _simulate(cfg, cif, n, data)
        gb = data.stat().st_size / 1e9
        r = run_worker({"label": f"{n} images", "cfg": cfg, "data": str(data), "method": "xrai-paper",
                        "steps": args.data_steps, "threads": args.threads})
        print(f"| {n:,} | {gb:.2f} | {sim_s:.0f} | {r['first_batch_s']:.2f} | {np.median(r['step_s']):.3f} | "
              f"{np.percentile(r['step_s'], 95):.3f} | {np.mean(r['data_s']):.4f} | {r['peak_rss_mb']:.0f} |",
              flush=True)
        data.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pdb", type=Path, default=Path(os.environ.get("XRAI_PDB_MIRROR", REPO.parent / "shared" / "pdb")) / "2cex.pdb")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per detector size")
    ap.add_argument("--data-steps", type=int, default=40, help="timed steps per dataset size")
    ap.add_argument("--big", type=int, default=1_000_000, help="images in the large file")
    ap.add_argument("--quick", action="store_true", help="32 px only, 10K and 100K files (a smoke run)")
    ap.add_argument("--skip-detector", action="store_true", help="only the dataset-size table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from xrai.structure import load_structure

    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start (other jobs share the CPU)")
    tmp = Path(tempfile.mkdtemp(prefix="xrai-bench-train-"))
    try:
        cif = tmp / "2CEX_A.cif"
        load_structure(args.pdb, chains=["A"]).make_mmcif_document().write_file(str(cif))

        if not args.skip_detector:
            detector_table(cif, tmp, args)
        dataset_table(cif, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
