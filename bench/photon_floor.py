"""The information floor of the pose error at each photon level (issue 17).

How well can *any* method place a test pattern of ``N`` photons, given the best volume there is?
For each photon level (the data of ``bench/photons.py``: demo geometry, 2CEX_A, 32 px, Poisson
noise), the default recipe's Poisson inference (the SO(3) grid of ``--levels`` plus the
8 ... 0.25 degree pattern search, all pixels scored, the per-image fluence fitted; the encoder is
untrained) places the test images against

* ``true intensity``: the reference intensity of the structure (``xrai reference``), i.e. the
  maximum-likelihood pose with a perfect model: no reconstruction can do better with this
  estimator;
* ``known-pose merge``: every training image merged at its true pose (``xrai-known-pose``),
  the best volume the default's hard-assignment merge can reach from these photons.

The median error of these rows is the floor against which the photon curve's targets are read.
The encoder is untrained, so its candidates lose to the grid; with ``--levels 3`` (36,864
rotations, 7.5 degrees) the search is near exhaustive (a level-4 grid changes the median by
< 0.3 degrees at 200 photons, docs/benchmarks.md).

Usage::

    python bench/photon_floor.py --work /tmp/photons --photons 20000 2000 200 50 true --levels 2 3 \\
        --score-images 500 --markdown /tmp/photons/floor.md

The datasets are the ones ``bench/photons.py`` makes in the same ``--work`` (made when missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import REPO, prepare_data  # noqa: E402
from photons import level_config, mean_photons, write_rows  # noqa: E402


def true_intensity_volume(model, intensity_path: Path) -> None:
    """Put the reference intensity into ``model``'s merged volume (the Poisson score fits a fluence per
    image, so the overall scale of the volume does not matter)."""
    from xrai.volume import read_volume_h5

    intensity, grid = read_volume_h5(str(intensity_path), "intensity")
    dec = model.decoder
    if grid.size != dec.grid.size or abs(grid.dq - dec.grid.dq) > 1e-9 * dec.grid.dq:
        raise SystemExit(f"{intensity_path}: grid {grid} differs from the reconstruction's {dec.grid}")
    dec.set_intensity(intensity)


def known_pose_volume(cfg: dict, train_ds, device):
    """The ``xrai-known-pose`` model with every training image merged at its true pose."""
    from xrai.recon.recipes import get_recipe
    from xrai.recon.train import _batches_of, imaging_model

    recipe = get_recipe("xrai-known-pose", cfg)
    recipe.configure(train_ds)
    model = recipe.build_model(imaging_model(cfg, train_ds)).to(device)
    recipe.prepare(model, train_ds, device)
    for step, batch in enumerate(_batches_of(recipe, train_ds, 1024, device)):
        recipe.training_step(model, None, batch, step)
    return model


def floor_rows(cfg: dict, paths: dict, levels: list[int], n_test: int) -> list[dict]:
    """One row per (volume, grid level): median test pose error and the fractions within 2 and 5 degrees."""
    import torch

    from xrai.data.hdf5 import DiffractionDataset
    from xrai.evaluation.metrics import pose_errors_deg
    from xrai.recon.recipes import get_recipe
    from xrai.recon.train import _batches_of
    from xrai.utils import seed_everything

    device = torch.device("cpu")
    seed_everything(int(cfg["train"]["seed"]))
    rows = []
    with DiffractionDataset(paths["train"]) as train_ds, DiffractionDataset(paths["test"]) as test_ds:
        model = known_pose_volume(cfg, train_ds, device)
        known = (model.decoder.weighted_sum.clone(), model.decoder.weight.clone())
        infer = get_recipe("xrai", cfg)
        infer.configure(train_ds)
        if infer.likelihood != "poisson":
            raise SystemExit(f"{paths['train']}: not photon counts (likelihood {infer.likelihood})")
        batches = list(_batches_of(infer, test_ds, 250, device, stop=n_test))
        R_true = torch.cat([b.rotations for b in batches]).double()
        base = infer.settings
        for volume in ("true intensity", "known-pose merge"):
            if volume == "true intensity":
                true_intensity_volume(model, paths["intensity"])
            else:
                model.decoder.accumulate(*known, decay=0.0)
            for level in levels:
                infer.settings = dataclasses.replace(base, infer_search_level=int(level))
                t0 = time.process_time()
                model.eval()
                R_pred = torch.cat([infer.infer_poses(model, b)[0] for b in batches]).double()
                err, _ = pose_errors_deg(R_pred, R_true)
                rows.append({"volume": volume, "grid_level": int(level), "n_test": len(err),
                             "median_deg": float(err.median()), "within_2": float((err < 2).double().mean()),
                             "within_5": float((err < 5).double().mean()),
                             "cpu_s": time.process_time() - t0})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| photons / pattern (level) | volume | SO(3) grid | median test pose error | within 2° | within 5° | "
             "test images |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['photons']:.0f} ({r['level']}) | {r['volume']} | level {r['grid_level']} | "
                     f"{r['median_deg']:.2f}° | {100 * r['within_2']:.0f}% | {100 * r['within_5']:.0f}% | "
                     f"{r['n_test']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=REPO / "config" / "demo.yaml")
    ap.add_argument("--photons", nargs="+", default=["20000", "2000", "200", "50", "true"])
    ap.add_argument("--size", type=int, default=16384, help="training images (the known-pose merge)")
    ap.add_argument("--test-size", type=int, default=1000, help="test images simulated (as bench/photons.py)")
    ap.add_argument("--score-images", type=int, default=1000, help="test images placed")
    ap.add_argument("--levels", nargs="+", type=int, default=[2, 3], help="SO(3) grid levels of the search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    base = yaml.safe_load(args.config.read_text())
    env = dict(os.environ, XRAI_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    rows = []
    for level in args.photons:
        cfg = level_config(base, level, args.size, args.test_size, [])
        d = args.work / f"photons_{level}" / str(args.size)
        d.mkdir(parents=True, exist_ok=True)
        cfg_path = d / "config.yaml"
        if not cfg_path.exists():
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths = prepare_data(cfg_path, d, base["proteins"][0], env)
        photons = mean_photons(paths["train"])
        for row in floor_rows(cfg, paths, args.levels, args.score_images):
            row = {"level": level, "photons": photons, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_rows(rows, args.work / "photon_floor.json", table(rows), args.markdown)


if __name__ == "__main__":
    main()
