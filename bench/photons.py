"""Photon benchmark (issue 17): pose error and resolution against the mean photons per pattern.

For each photon level the demo geometry (config/demo.yaml: 2CEX_A, 32 px) is simulated with
Poisson noise and ``simulation.min_total_intensity`` = the level (``true``: 1, i.e. no rescaling:
the beam's own fluence, ~12 photons per pattern for 2CEX_A), then each method runs on it in
its own process with one CPU thread:

* ``xrai``: the default recipe (Poisson likelihood on the raw counts, ``train.likelihood: auto``);
* ``emc``: the EMC baseline with the config's ``emc`` schedule (raw counts, per-image fluence);
* ``xrai-known-pose``: the default recipe's merge at the true poses (the resolution bound).

One row per (level, training-set size, method): the median test pose error (all test images,
after the global alignment rotation, in-plane pi folded), the fraction within 5 degrees, and the
resolution of the amplitude volume against the true one (the shell where the amplitude shell
correlation, after that alignment, first falls below 0.5; Angstrom; the detector's edge, 8.2 Å
for the demo, when it never does) and the mean shell correlation, with wall and CPU minutes.

Usage::

    python bench/photons.py --work /tmp/photons --photons 20000 2000 200 50 true \\
        --markdown /tmp/photons/table.md --plot docs/photons.png
    python bench/photons.py --work /tmp/photons --photons 2000 --methods xrai --set train.steps=1500

The datasets are made in ``--work`` when missing; finished runs are not rerun.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import REPO, apply_overrides, asc_resolution, prepare_data, xrai_cli  # noqa: E402

METHODS = ("xrai", "emc", "xrai-known-pose")
#: ``min_total_intensity`` of the level ``true``: every image keeps the beam's own fluence (scale >= 1)
TRUE_FLUENCE = 1.0


def level_config(base: dict, level: str, n_train: int, n_test: int, overrides: list[str]) -> dict:
    """The demo config at one photon level (Poisson noise on), with ``key.path=value`` overrides (YAML values)."""
    cfg = copy.deepcopy(base)
    sim = cfg["simulation"]
    sim.update(poisson_noise=True, train_sizes=[n_train], test_size=n_test,
               min_total_intensity=TRUE_FLUENCE if level == "true" else float(level))
    cfg["structure"]["mirror"] = os.environ.get("XRAI_PDB_MIRROR", cfg["structure"].get("mirror"))
    return apply_overrides(cfg, overrides)


def run_method(cfg: dict, method: str, paths: dict, out: Path, threads: int, env: dict,
               run: bool = True) -> dict | None:
    """One ``xrai train`` / ``xrai emc`` process; wall and CPU seconds (the child's own rusage).

    A finished run is not rerun. ``run=False``: only report finished runs (None otherwise); a run
    finished without this script's timing reports its own wall time and no CPU time.
    """
    done = out / "timing.json"
    if done.exists():
        return json.loads(done.read_text())
    if not run or (out / "bench_config.yaml").exists():
        prov = out / "provenance.json"
        if prov.exists() and (out / "intensity.h5").exists():
            return {"wall_s": float(json.loads(prov.read_text()).get("wall_s", float("nan"))), "cpu_s": None}
        if run:
            print(f"{out}: started by another process and not finished; skipped", flush=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = copy.deepcopy(cfg)
    run_cfg["train"]["num_threads"] = threads
    run_cfg["emc"]["num_threads"] = threads
    cfg_file = out / "bench_config.yaml"
    cfg_file.write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    sub = "emc" if method == "emc" else "train"
    cmd = xrai_cli() + [sub, "--config", str(cfg_file), "--run", "0", "--train-data", str(paths["train"]),
                        "--test-data", str(paths["test"]), "--out-dir", str(out), "--log", str(out / "train.log")]
    if sub == "train":
        cmd[len(xrai_cli()) + 1:len(xrai_cli()) + 1] = ["--method", method]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{method}: {sub} failed (status {status}); see {out / 'train.log'}")
    timing = {"wall_s": time.time() - t0, "cpu_s": usage.ru_utime + usage.ru_stime}
    done.write_text(json.dumps(timing))
    return timing


def metrics(out: Path, paths: dict, method: str) -> dict:
    """Median test pose error and fraction within 5 degrees (learned poses), and the amplitude resolution."""
    import h5py
    import torch

    from xrai.evaluation.align import transform_volume
    from xrai.evaluation.evaluate import pose_error_summary, true_rotations
    from xrai.evaluation.metrics import pose_errors_deg, shell_correlation
    from xrai.volume import read_volume_h5
    from xrai.xray.phasing import measured_mask

    res: dict = {}
    A = torch.eye(3, dtype=torch.float64)
    if method != "xrai-known-pose":
        summary = pose_error_summary(out / "poses_test.h5", paths["test"])
        res.update(median_deg=summary["median_deg"], frac_within_5=summary["frac_within_5"])
        with h5py.File(out / "poses_test.h5", "r") as f:
            R_pred = torch.from_numpy(f["rotations"][...]).double()
            index = torch.from_numpy(f["index"][...]).long()
        _, A = pose_errors_deg(R_pred, true_rotations(paths["test"], index))
    amp, grid = read_volume_h5(str(out / "intensity.h5"), "amplitude")
    true_int, _ = read_volume_h5(str(paths["intensity"]), "intensity")
    aligned = transform_volume(amp.double(), A)  # learned V(k) = V_true(A k)
    inside = measured_mask(grid)
    nan = torch.full_like(aligned, float("nan"))
    asc = shell_correlation(torch.where(inside, aligned, nan),
                            torch.where(inside, true_int.double().clamp_min(0).sqrt(), nan), grid)
    res["resolution_A"] = asc_resolution(asc)  # the detector's edge when it never falls below 0.5
    res["asc_mean"] = float(asc["mean"])
    return res


def mean_photons(path: Path, n: int = 2000) -> float:
    """Mean photons per pattern of the first ``n`` images."""
    from xrai.data.hdf5 import DiffractionDataset

    with DiffractionDataset(path) as ds:
        return ds.mean_photons_per_pattern(n)


def write_rows(rows: list[dict], json_path: Path, markdown: str, markdown_path: Path | None) -> None:
    """The rows as JSON at ``json_path``; the markdown table printed, and written to ``markdown_path`` if given."""
    json_path.write_text(json.dumps(rows, indent=1))
    print(markdown)
    if markdown_path:
        markdown_path.write_text(markdown + "\n")


def table(rows: list[dict]) -> str:
    lines = ["| photons / pattern (level) | train images | method | median test pose error | within 5° | "
             "resolution (Å, ASC 0.5) | mean ASC | wall min | CPU min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = "—" if r.get("median_deg") is None else f"{r['median_deg']:.2f}°"
        frac = "—" if r.get("frac_within_5") is None else f"{100 * r['frac_within_5']:.0f}%"
        lines.append(f"| {r['photons']:.0f} ({r['level']}) | {r['n_train']} | {r['method']} | {med} | {frac} | "
                     f"{'none' if math.isinf(r['resolution_A']) else format(r['resolution_A'], '.1f')} | {r['asc_mean']:.3f} | {r['wall_s'] / 60:.1f} | "
                     f"{'—' if r['cpu_s'] is None else format(r['cpu_s'] / 60, '.1f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for n_train in sorted({r["n_train"] for r in rows}):
        for method, style in (("xrai", "o-"), ("emc", "s--"), ("emc, slow annealing", "d--"),
                              ("xrai-known-pose", "^:")):
            sel = sorted((r for r in rows if r["method"] == method and r["n_train"] == n_train),
                         key=lambda r: r["photons"])
            if not sel:
                continue
            label = f"{method}, {n_train} images"
            if method != "xrai-known-pose":
                ax1.plot([r["photons"] for r in sel], [r["median_deg"] for r in sel], style, label=label)
            ax2.plot([r["photons"] for r in sel], [r["asc_mean"] for r in sel], style, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("mean photons per pattern")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.axhline(5.0, color="grey", lw=0.8)
    ax1.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("median test pose error (deg)")
    ax2.set_ylabel("mean amplitude shell correlation with the truth")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle("2CEX_A, 32 px, Poisson noise: pose error and resolution against photons per pattern")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=REPO / "config" / "demo.yaml")
    ap.add_argument("--photons", nargs="+", default=["20000", "2000", "200", "50", "true"],
                    help="min_total_intensity values; 'true' = the beam's own fluence")
    ap.add_argument("--sizes", nargs="+", type=int, default=[16384], help="training-set sizes")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (YAML value)")
    ap.add_argument("--no-run", action="store_true", help="only tabulate the runs already finished")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)

    base = yaml.safe_load(args.config.read_text())
    env = dict(os.environ, XRAI_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    rows = []
    for level in args.photons:
        for n_train in args.sizes:
            cfg = level_config(base, level, n_train, args.test_size, args.set)
            d = args.work / f"photons_{level}" / str(n_train)
            d.mkdir(parents=True, exist_ok=True)
            cfg_path = d / "config.yaml"
            if args.no_run and not (d / "config.yaml").exists():
                continue
            if not args.no_run:
                cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            paths = prepare_data(cfg_path, d, base["proteins"][0], env)
            photons = mean_photons(paths["train"])
            for method in args.methods:
                out = d / method
                timing = run_method(cfg, method, paths, out, args.threads, env, run=not args.no_run)
                if timing is None:
                    continue
                row = {"level": level, "photons": photons, "n_train": n_train, "method": method, **timing,
                       **metrics(out, paths, method)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_rows(rows, args.work / "photons.json", table(rows), args.markdown)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
