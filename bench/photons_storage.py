"""Sparse vs dense storage of Poisson photon counts: file size and read rate against photons per pattern.

For 2CEX chain A (``config.yaml``'s beam: 4.6 keV, 10^12 photons per pulse, 0.5 um focus) at
32 and 128 px, Poisson counts with a 2-pixel beam stop, at the beam's true fluence (~12 photons
per pattern) and at fixed means of 50, 200, 2,000 and 20,000 photons: the same images written
dense (float32) and sparse (``simulation.storage: sparse``), the bytes per image of each (marginal:
from the sizes of a set and of its first half, so the per-file metadata does not count), their
ratio, the simulation rate (Poisson draw and writing included), and the rate of a shuffled pass of ``DiffractionDataset.iter_batches`` over each (the
images read back are checked equal). Then the disk plan of ``config.yaml`` with sparse storage
at each photon count, from the measured bytes per image.

Usage::

    PYTHONPATH=src .venv/bin/python bench/photons_storage.py [--pdb ../shared/pdb/2cex.pdb] [--images 4096]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PHOTONS = ("fluence", 50, 200, 2000, 20000)


def read_pass_rate(path: Path) -> tuple[float, torch.Tensor]:
    """Images per second of one shuffled pass (batch 64), and a checksum image (sum of all images)."""
    from xrai.data.hdf5 import DiffractionDataset

    with DiffractionDataset(path) as ds:
        t0 = time.perf_counter()
        total = torch.zeros(ds.image_shape, dtype=torch.float64)
        for batch in ds.iter_batches(64, shuffle=True, seed=0):
            total += batch["images"].double().sum(0)
        return len(ds) / (time.perf_counter() - t0), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdb", type=Path, default=REPO.parent / "shared" / "pdb" / "2cex.pdb")
    parser.add_argument("--images", type=int, default=4096, help="images per measured dataset")
    parser.add_argument("--pixels", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()

    from xrai.config import load_config
    from xrai.io import human_bytes
    from xrai.structure import load_structure
    from xrai.utils import set_cpu_threads
    from xrai.xray.simulate import simulate_dataset

    set_cpu_threads(1)
    base = load_config(REPO / "config.yaml")
    rows, plan = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cif = tmp / "2CEX_A.cif"
        load_structure(args.pdb, chains=["A"]).make_mmcif_document().write_file(str(cif))
        for n_px in args.pixels:
            for photons in PHOTONS:
                cfg = copy.deepcopy(base)
                cfg["detector"]["n_pixels"] = n_px
                scaling = {"mode": "fluence"} if photons == "fluence" else {"mode": "mean_photons",
                                                                            "mean_photons": photons}
                cfg["simulation"].update(device="cpu", poisson_noise=True, photon_scaling=scaling,
                                         beam_stop={"radius_px": 2 * n_px / 32}, mesh_size=65 if n_px <= 32 else 151)
                sizes, rates, sums = {}, {}, {}
                for storage in ("dense", "sparse"):
                    cfg["simulation"]["storage"] = storage
                    out, half = tmp / f"{n_px}_{photons}_{storage}.h5", tmp / "half.h5"
                    summary = simulate_dataset(cfg, cif, "train", args.images, out)
                    simulate_dataset(cfg, cif, "train", args.images // 2, half)  # a prefix of the same images
                    sizes[storage] = (out.stat().st_size - half.stat().st_size) / (args.images - args.images // 2)
                    rates[storage], sums[storage] = read_pass_rate(out)
                    rates[storage + "_write"] = summary["images_per_s"]
                    out.unlink()
                    half.unlink()
                assert torch.equal(sums["dense"], sums["sparse"]), "sparse and dense read back differently"
                mean_photons = float(sums["dense"].sum()) / args.images
                row = {"pixels": n_px, "photons": photons, "measured_photons_per_image": round(mean_photons, 1),
                       "dense_bytes_per_image": sizes["dense"], "sparse_bytes_per_image": sizes["sparse"],
                       "ratio": sizes["dense"] / sizes["sparse"], "dense_read_per_s": rates["dense"],
                       "sparse_read_per_s": rates["sparse"], "dense_simulate_per_s": rates["dense_write"],
                       "sparse_simulate_per_s": rates["sparse_write"]}
                rows.append(row)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        sim = base["simulation"]
        n_total = sum(sim["train_sizes"]) + sim["test_size"]
        for row in rows:
            if row["pixels"] == base["detector"]["n_pixels"]:
                plan.append((row["photons"], n_total * row["sparse_bytes_per_image"], n_total * row["dense_bytes_per_image"]))

    print("\n| detector | photons per pattern (measured, beam stop) | dense float32 B/image | sparse B/image "
          "| dense / sparse | shuffled read, images/s dense / sparse | simulated, images/s dense / sparse |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = f"true fluence ({r['measured_photons_per_image']})" if r["photons"] == "fluence" else \
            f"{r['photons']} ({r['measured_photons_per_image']})"
        print(f"| {r['pixels']}x{r['pixels']} | {label} | {r['dense_bytes_per_image']:.0f} | "
              f"{r['sparse_bytes_per_image']:.0f} | {r['ratio']:.0f}x | {r['dense_read_per_s']:.0f} / "
              f"{r['sparse_read_per_s']:.0f} | {r['dense_simulate_per_s']:.0f} / {r['sparse_simulate_per_s']:.0f} |")
    print(f"\nconfig.yaml per protein ({n_total} images: train {sim['train_sizes']}, test {sim['test_size']}):")
    print("| photons per pattern | sparse | dense float32 |")
    print("|---|---:|---:|")
    for photons, sparse, dense in plan:
        print(f"| {photons} | {human_bytes(sparse)} | {human_bytes(dense)} |")


if __name__ == "__main__":
    main()
