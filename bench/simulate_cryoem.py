"""Benchmark the cryo-EM simulator: images per second at 128 px and peak memory against dataset size.

Each size runs ``xrai simulate-cryoem`` in a fresh process (so peak RSS, ``VmHWM``, is that
run's alone) on 4AKE at cryoPoseNet's sampling (128 px, 0.8 Å) with cryoAI's image formation
(CTF with lognormal defocus, 4 Å shifts, 0 dB noise: ``config/cryoem-demo.yaml``), float32,
10,000 images per stack. The potential and the noise calibration (512 images) are timed apart
(``setup``). Then the disk plan of 128 px sets in float32 and float16.

Usage::

    XRAI_PDB_MIRROR=../shared/pdb .venv/bin/python bench/simulate_cryoem.py [--sizes 1000 4000 16000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_size(work: Path, cfg_path: Path, cif: Path, n: int, threads: int) -> dict:
    out = work / f"train_{n}.star"
    env = {**os.environ, "XRAI_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xrai.cli", "simulate-cryoem", "--config", str(cfg_path), "--protein", "4AKE",
                    "--structure", str(cif), "--split", "train", "--n-images", str(n), "--out", str(out)],
                   check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t
    summary = json.loads((work / f"train_{n}_stacks" / "simulation.json").read_text())
    size = sum(f.stat().st_size for f in (work / f"train_{n}_stacks").glob("*.mrcs")) + out.stat().st_size
    return {"n": n, "wall_s": wall, "setup_s": summary["setup_seconds"], "images_per_s": summary["images_per_s"],
            "peak_rss_mb": summary["peak_rss_mb"], "bytes": size, "snr_db_measured": summary["snr_db_measured"]}


def disk_plan(box: int = 128) -> str:
    from xrai.cryoem.simulate import dataset_bytes

    em = {"box_size": box}
    rows = ["| set (128 px) | float32 | float16 |", "|---|---:|---:|"]
    for n in (50_000, 500_000, 5_000_000, 10_000):
        rows.append(f"| {n:,} images | {dataset_bytes(em, n, 'float32') / 1e9:.1f} GB | "
                    f"{dataset_bytes(em, n, 'float16') / 1e9:.1f} GB |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pdb", default=os.environ.get("XRAI_PDB_MIRROR", str(REPO.parent / "shared" / "pdb")))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from xrai.structure import load_structure

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start; {args.threads} threads")
    with tempfile.TemporaryDirectory(prefix="bench-cryoem-") as tmp:
        work = Path(tmp)
        cif = work / "4AKE.cif"
        load_structure(Path(args.pdb) / "4ake.pdb").make_mmcif_document().write_file(str(cif))
        cfg = yaml.safe_load((REPO / "config" / "cryoem-demo.yaml").read_text())
        cfg["simulation"]["train_sizes"] = sorted(args.sizes)
        cfg_path = work / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        rows = [run_size(work, cfg_path, cif, n, args.threads) for n in args.sizes]
    print("| particles (128 px, float32) | stacks + STAR | wall (setup included) | setup | images/s | peak RSS | SNR measured |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['bytes'] / 1e6:.0f} MB | {r['wall_s']:.0f} s | {r['setup_s']:.1f} s | "
              f"{r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB | {r['snr_db_measured']:.2f} dB |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print(disk_plan())


if __name__ == "__main__":
    main()
