"""Benchmark the simulator against skopi's CPU slicing path, and print the disk plan.

Measures, in one run on this machine:

* |F|^2 mesh precompute (151^3, 2CEX chain A) with xrai; skopi's CPU mesh
  (``calculate_molecular_form_factor_square``) measured on a small mesh and extrapolated
  (its cost is linear in mesh points; its GPU path cannot run here);
* images per second at 128 px and 32 px: skopi's ``take_n_slices`` (+ linear correction)
  vs xrai's ``PatternSimulator.patterns`` on the same 151^3 mesh and quaternions (and the
  relative L2 difference of the patterns), and xrai's whole ``simulate_dataset`` (scaling,
  HDF5 writing included);
* peak resident memory of ``simulate_dataset`` for two dataset sizes (fresh processes);
* the disk plan of ``config.yaml``.

Usage::

    .venv/bin/python bench/simulate.py [--pdb ../shared/pdb/2cex.pdb] [--quick]
"""

from __future__ import annotations

import argparse
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
import torch

REPO = Path(__file__).resolve().parents[1]


def chain_a(pdb: Path, out_dir: Path) -> Path:
    from xrai.structure import load_structure

    cif = out_dir / "2CEX_A.cif"
    load_structure(pdb, chains=["A"]).make_mmcif_document().write_file(str(cif))
    return cif


def skopi_slicing_rate(volume: np.ndarray, voxel_m: float, det_s, quats: np.ndarray) -> tuple[float, np.ndarray]:
    import skopi.geometry as sg

    t = time.perf_counter()
    slices = sg.take_n_slices(volume, voxel_m, det_s.pixel_position_reciprocal, quats)[:, 0] * det_s.linear_correction[0]
    return len(quats) / (time.perf_counter() - t), slices


def peak_memory_run(cfg_path: Path, cif: Path, n: int, out: Path) -> dict:
    code = (
        "import json, sys; from xrai.config import load_config; from xrai.xray.simulate import simulate_dataset; "
        f"s = simulate_dataset(load_config({str(cfg_path)!r}), {str(cif)!r}, 'train', {n}, {str(out)!r}); "
        # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "s['peak_rss_mb'] = int(hwm) / 1024; print(json.dumps(s))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pdb", default=os.environ.get("XRAI_PDB_MIRROR", str(REPO.parent / "shared" / "pdb")) + "/2cex.pdb")
    ap.add_argument("--mesh-size", type=int, default=151)
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    args = ap.parse_args()

    import skopi as sk
    import skopi.diffraction as sd
    import yaml

    from xrai.config import load_config
    from xrai.rotations import random_quaternions
    from xrai.structure import read_atoms
    from xrai.utils import set_cpu_threads
    from xrai.xray.geometry import Beam, Detector, simulation_mesh
    from xrai.xray.scattering import PatternSimulator, centred_positions, structure_factor_mesh
    from xrai.xray.simulate import disk_plan_table, simulate_dataset

    threads = set_cpu_threads(0)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({threads} threads), cuda: {torch.cuda.is_available()}")
    tmp = Path(tempfile.mkdtemp(prefix="xrai-bench-"))
    cif = chain_a(Path(args.pdb), tmp)
    pos, elements = read_atoms(cif)
    pos = centred_positions(pos, elements)
    beam = Beam(4600.0, 1e12, 0.5e-6)
    sk_beam = sk.Beam(photon_energy=4600, fluence=1e12, focus_radius=0.5e-6)
    m = args.mesh_size

    # ------------------------------------------------------------------ mesh precompute
    det = Detector(128, 0.1, 0.2)
    mesh = simulation_mesh(det, beam, m)
    t = time.perf_counter()
    volume = structure_factor_mesh(pos, elements, mesh).abs() ** 2
    t_mesh = time.perf_counter() - t
    sys.path.insert(0, str(REPO / "tests"))
    from test_scattering import _skopi_particle  # the same skopi particle as the tests

    particle = _skopi_particle(pos, elements)
    det_s = sk.SimpleSquareDetector(128, 0.1, 0.2, beam=sk_beam)
    small = 21
    mesh_s, _ = det_s.get_reciprocal_mesh(small)
    sd.calculate_molecular_form_factor_square(particle, np.zeros(1), np.zeros((1, 3)))  # numba compile
    t = time.perf_counter()
    sd.calculate_molecular_form_factor_square(particle, np.linalg.norm(mesh_s, axis=-1) * 1e-10 / 2, mesh_s)
    t_skopi_mesh = (time.perf_counter() - t) * (m / small) ** 3
    print("\n| step | xrai | skopi (CPU) | speed-up |\n|---|---:|---:|---:|")
    print(f"| |F|^2 mesh {m}^3, 2CEX_A ({len(elements)} atoms) | {t_mesh:.1f} s | "
          f"~{t_skopi_mesh:.0f} s (extrapolated from {small}^3) | {t_skopi_mesh / t_mesh:.0f}x |")

    # ------------------------------------------------------------------ images per second
    # best of 3 interleaved rounds (the machine is shared); xrai at 1 and at all threads
    rows = []
    cases = [(128, m), (32, m), (32, 65)]
    meshes = {}
    for n_pix, mesh_size in cases:
        det = Detector(n_pix, 0.1, 0.2)
        det_s = sk.SimpleSquareDetector(n_pix, 0.1, 0.2, beam=sk_beam)
        _, voxel_m = det_s.get_reciprocal_mesh(mesh_size)
        mesh_n = simulation_mesh(det, beam, mesh_size)
        if mesh_size not in meshes:
            meshes[mesh_size] = volume if mesh_size == m else structure_factor_mesh(pos, elements, mesh_n).abs() ** 2
        vol = meshes[mesh_size]
        n_sk = (10 if n_pix == 128 else 40) if args.quick else (30 if n_pix == 128 else 150)
        n_ours = 512 if args.quick else 2048
        quats = random_quaternions(n_ours, torch.Generator().manual_seed(1))
        sim = PatternSimulator(vol, mesh_n, det, beam)
        rate_sk = rate_1 = rate_n = 0.0
        for _ in range(3):
            r, theirs = skopi_slicing_rate(vol.numpy(), voxel_m, det_s, quats[:n_sk].numpy())
            rate_sk = max(rate_sk, r)
            for n_threads in (1, threads):
                torch.set_num_threads(n_threads)
                sim.patterns(quats[:256])  # warm-up
                t = time.perf_counter()
                for s in range(0, n_ours, 256):
                    sim.patterns(quats[s:s + 256])
                r = n_ours / (time.perf_counter() - t)
                rate_1, rate_n = (max(rate_1, r), rate_n) if n_threads == 1 else (rate_1, max(rate_n, r))
        ours = sim.patterns(quats[:n_sk]).double().numpy()
        diff = float(np.max(np.linalg.norm((ours - theirs).reshape(n_sk, -1), axis=1)
                            / np.linalg.norm(theirs.reshape(n_sk, -1), axis=1)))
        # whole pipeline: simulate_dataset (mesh excluded from the rate), HDF5 written
        cfg = load_config(REPO / "config.yaml")
        cfg["detector"]["n_pixels"] = n_pix
        cfg["simulation"]["mesh_size"] = mesh_size
        rate_ds = 0.0
        for _ in range(2):
            summary = simulate_dataset(cfg, cif, "train", n_ours, tmp / f"rate_{n_pix}.h5")
            rate_ds = max(rate_ds, summary["images_per_s"])
            (tmp / f"rate_{n_pix}.h5").unlink()
        rows.append((n_pix, mesh_size, rate_sk, rate_1, rate_n, rate_ds, diff))
    print(f"\n| detector, mesh | skopi take_n_slices | xrai slicing, 1 thread | xrai slicing, {threads} threads "
          f"| xrai simulate_dataset, {threads} threads (HDF5 included) | speed-up vs skopi (1 thread / {threads} / dataset) "
          "| max rel. L2 diff vs skopi |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n_pix, mesh_size, rate_sk, rate_1, rate_n, rate_ds, diff in rows:
        print(f"| {n_pix}x{n_pix}, {mesh_size}^3 | {rate_sk:.0f} img/s | {rate_1:.0f} img/s | {rate_n:.0f} img/s "
              f"| {rate_ds:.0f} img/s | {rate_1 / rate_sk:.1f}x / {rate_n / rate_sk:.1f}x / {rate_ds / rate_sk:.1f}x "
              f"| {diff:.1e} |")

    # ------------------------------------------------------------------ peak memory, two sizes
    cfg = load_config(REPO / "config.yaml")
    cfg["simulation"]["mesh_size"] = m
    cfg_path = tmp / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    sizes = (1024, 4096) if args.quick else (2048, 16384)
    print("\n| dataset (128x128 px, float32) | file size | wall time | images/s | peak RSS |\n|---|---:|---:|---:|---:|")
    for n in sizes:
        out = tmp / f"mem_{n}.h5"
        s = peak_memory_run(cfg_path, cif, n, out)
        print(f"| {n} images | {out.stat().st_size / 1e6:.0f} MB | {s['seconds'] + s['mesh_seconds']:.0f} s "
              f"| {s['images_per_s']:.0f} | {s['peak_rss_mb']:.0f} MB |")
        out.unlink()

    print("\n## disk plan (config.yaml)\n")
    print(disk_plan_table(load_config(REPO / "config.yaml")))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
