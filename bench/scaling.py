"""Scaling benchmark: cost of EMC (non-amortized pose search) and X-RAI (amortized) against the number of images.

For N in ``--sizes`` (default 2K, 8K, 32K, 128K images of 2CEX chain A at the ``--config`` scale,
32 px for config/demo.yaml), on this machine:

* EMC (``xrai.recon.emc``, the config's ``emc`` schedule):
  - *measured*: a full ``run_emc`` for N <= ``--emc-full-max``; the time to target is the wall
    time at the first iteration whose median train pose error is below ``--target-deg``;
  - *timed*: for every N, ``--timed-iterations`` iterations at each level of the schedule
    (seconds per iteration at each level) and the initial pass;
  - *extrapolated* (said so in the table): for N above ``--emc-full-max``, the time to target is
    the initial pass plus, per level, the iterations the largest measured run needed times the
    seconds per iteration timed at that N.
* X-RAI (``xrai train --method xrai``, whatever recipe that is when the benchmark runs: its class
  and the git commit are recorded): seconds per step from a short run at every N up to
  ``--xrai-probe-max``, and from the time those runs spend outside the step loop, the
  preparation time and the per-image cost of inferring the poses of all images (fitted
  ``p + r (N + test)``); the steps and wall time to the target (test pose median) from
  ``--xrai-metrics`` (a finished run's metrics.csv) or from a run made here of the schedule of
  ``--xrai-steps`` steps, stopped at the first evaluation below the target.

Then: the growth exponents (least-squares slope of log time against log N), the crossover N above
which X-RAI reaches the target sooner (EMC's time to target fitted as ``a + b N``), the
extrapolation to the paper's 5M images, a table on stdout, ``scaling.json`` in ``--work`` and the
plot ``--plot`` (default docs/scaling.png).

Usage::

    .venv/bin/python bench/scaling.py --work /tmp/xrai-scaling
    .venv/bin/python bench/scaling.py --work /tmp/xrai-scaling --sizes 2048 8192 --emc-full-max 8192 \\
        --xrai-metrics results/reconstructions/2CEX_A/16384/xrai/run0/metrics.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_N = 5_000_000
logger = logging.getLogger("bench.scaling")


# --------------------------------------------------------------------------- data


def prepare_data(cfg: dict, work: Path, sizes: list[int], n_test: int, mirror: Path) -> dict:
    """Structure, one training file per N (each a prefix of the largest: same seeds) and a test file."""
    from xrai.structure import fetch_structure
    from xrai.xray.simulate import simulate_dataset

    cif = work / "2CEX_A.cif"
    if not cif.exists():
        fetch_structure({"pdb": "2CEX", "chains": ["A"]}, {"mirror": str(mirror)}, cif, work / "2CEX_A.json")
    files: dict = {"train": {}, "simulate_s": {}}
    for n in sizes:
        path = work / f"train_{n}.h5"
        if not path.exists():
            t0 = time.perf_counter()
            simulate_dataset(cfg, cif, "train", n, path)
            files["simulate_s"][n] = time.perf_counter() - t0
        files["train"][n] = path
    files["test"] = work / f"test_{n_test}.h5"
    if not files["test"].exists():
        simulate_dataset(cfg, cif, "test", n_test, files["test"])
    return files


# --------------------------------------------------------------------------- EMC


def emc_full_run(cfg: dict, train: Path, test: Path, out: Path, target: float) -> dict:
    """A full ``run_emc``; per-level iteration counts and seconds, and the time to the target pose error."""
    from xrai.recon.emc import run_emc

    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    run_emc(cfg, 0, train, test, out)
    total = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    first = float(rows[0]["wall_s"]) - float(rows[0]["iteration_s"])  # the initial pass
    hit = next((r for r in rows if float(r["train_pose_median_deg"]) < target), None)
    per_level: dict[int, list[float]] = {}
    for r in rows[: rows.index(hit) + 1 if hit else len(rows)]:
        per_level.setdefault(int(r["level"]), []).append(float(r["iteration_s"]))
    return {
        "iterations": len(rows), "wall_s": total, "init_s": first,
        "iterations_to_target": {lv: len(v) for lv, v in per_level.items()} if hit else None,
        "time_to_target_s": float(hit["wall_s"]) if hit else None,
        "final_train_pose_median_deg": float(rows[-1]["train_pose_median_deg"]),
        "test_pose_median_deg": float(rows[-1]["test_pose_median_deg"] or "nan"),
    }


def emc_timed(cfg: dict, train: Path, levels: list[int], iterations: int) -> dict:
    """Seconds of the initial pass and per iteration at each level (model from a random start, beta = 1)."""
    from xrai.data.hdf5 import DiffractionDataset
    from xrai.recon.emc import EMCSettings, ExpandMaximizeCompress
    from xrai.utils import resource_usage
    from xrai.xray.geometry import reciprocal_grid
    from xrai.xray.imaging import detector_pixel_factor

    s = EMCSettings.from_config(cfg)
    ds = DiffractionDataset(train)
    c = detector_pixel_factor(cfg, ds.pixel_position_reciprocal).double() ** 2
    emc = ExpandMaximizeCompress(reciprocal_grid(cfg), ds.pixel_position_reciprocal, c, likelihood="gaussian",
                                 chunk_size=s.chunk_size)
    t0 = time.perf_counter()
    emc.initialize(ds, torch.Generator().manual_seed(0))
    out = {"init_s": time.perf_counter() - t0, "per_iteration_s": {}}
    for level in levels:
        times = []
        for _ in range(iterations):
            emc._slices = None  # each timed iteration pays its own expand, as after a level change
            times.append(emc.iterate(ds, level, 1.0).seconds)
        out["per_iteration_s"][level] = float(np.mean(times))
        logger.info("EMC N=%d level %d: %.2f s / iteration", len(ds), level, out["per_iteration_s"][level])
    out["peak_rss_mb"] = resource_usage()["peak_rss_mb"]
    return out


# --------------------------------------------------------------------------- X-RAI


def xrai_recipe() -> dict:
    from xrai.recon.recipes import RECIPES

    recipe = RECIPES["xrai"]
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src/xrai/train.py"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {"recipe": recipe.__name__, "doc": (recipe.__doc__ or "").strip().splitlines()[0],
            "commit": commit + ("+uncommitted train.py" if dirty else "")}


class _TargetReached(Exception):
    pass


def xrai_run(cfg: dict, train: Path, test: Path, out: Path, steps: int, eval_every: int,
             target: float | None = None, eval_images: int = 256) -> list[dict]:
    """``xrai train --method xrai`` for ``steps`` steps (the schedule of a run that long); its metrics rows.

    With ``target``, the run stops at the first evaluation whose test pose median is below it
    (read from the checkpoint written at every evaluation) and the rows so far are returned.
    """
    from xrai.recon.train import load_checkpoint
    from xrai.recon.train import train as run_train

    c = copy.deepcopy(cfg)
    c["train"].update(steps=steps, eval_every=eval_every, log_every=min(10, steps),
                      checkpoint_every=eval_every if target is not None else max(steps, 1),
                      eval_images=min(c["train"]["eval_images"], eval_images))
    if out.exists():
        import shutil

        shutil.rmtree(out)

    def stop_at_target(step: int) -> None:
        if step % eval_every == 0 and step < steps:
            rows = load_checkpoint(out / "checkpoint.pt")["metrics"]
            last = rows[-1].get("test_pose_median_deg") if rows else None
            if last not in (None, "") and float(last) < target:
                raise _TargetReached

    try:
        run_train(c, "xrai", 0, train, test, out, step_callback=stop_at_target if target is not None else None)
    except _TargetReached:
        return list(load_checkpoint(out / "checkpoint.pt")["metrics"])
    return list(csv.DictReader(open(out / "metrics.csv")))


def seconds_per_step(rows: list[dict], batch: int) -> float:
    """Mean seconds per step over the logged windows, the first (warm-up) one left out when possible."""
    windows = [r for r in rows if r.get("images_per_s")]
    use = windows[1:] if len(windows) > 1 else windows
    return float(np.mean([batch / float(r["images_per_s"]) for r in use]))


def steps_to_target(rows: list[dict], target: float) -> int | None:
    hit = [int(r["step"]) for r in rows if r.get("test_pose_median_deg") not in (None, "")
           and float(r["test_pose_median_deg"]) < target]
    return min(hit) if hit else None


# --------------------------------------------------------------------------- analysis


def growth_exponent(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log t against log N."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def linear_fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """``t = a + b N`` by least squares (a clipped at 0)."""
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(ts, float), 1)
    return max(float(a), 0.0), float(b)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    rows = result["rows"]
    ns = [r["n"] for r in rows]
    measured = [r for r in rows if r["emc_source"] == "measured"]
    extrap = [r for r in rows if r["emc_source"] == "extrapolated"]
    ax.plot([r["n"] for r in measured], [r["emc_time_to_target_s"] for r in measured], "o", color="C3",
            label="EMC to target (measured)")
    ax.plot([r["n"] for r in extrap], [r["emc_time_to_target_s"] for r in extrap], "o", mfc="none", color="C3",
            label="EMC to target (timed iterations x counts)")
    fl = result["emc_fit"]["final_level"]
    ax.plot(ns, [r["emc_s_per_iteration"][str(fl)] for r in rows], "s--", color="C1", ms=4,
            label=f"EMC one iteration at level {fl}")
    a, b = result["emc_fit"]["a_s"], result["emc_fit"]["b_s_per_image"]
    xs = np.logspace(math.log10(min(ns)), math.log10(PAPER_N), 100)
    ax.plot(xs, a + b * xs, ":", color="C3", label=f"EMC fit {a:.0f} s + {b * 1e3:.2f} ms x N")
    x = result["xrai"]
    x_total = x.get("time_to_target_s") or x.get("time_lower_bound_s")
    if x_total:
        what = (f"X-RAI training to target ({x['steps_to_target']} steps)" if x.get("time_to_target_s")
                else f"X-RAI: target not reached in {x['steps_run']} steps (lower bound)")
        ax.plot(xs, np.full_like(xs, x_total), "-" if x.get("time_to_target_s") else "--", color="C0", label=what)
        ax.plot(xs, x_total + x["inference_s_per_image"] * xs, "-.", color="C0", alpha=0.7,
                label=f"X-RAI + pose inference of all N ({x['inference_s_per_image'] * 1e3:.1f} ms/image)")
    for key, style in (("crossover_n", "grey"), ("crossover_n_with_inference", "C0")):
        if result.get(key):
            ax.axvline(result[key], color=style, lw=0.8, ls=":")
            ax.annotate(f"N ~ {result[key]:.2g}", (result[key], a + b * result[key]), fontsize=7, color=style,
                        xytext=(3, -12), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training images N")
    ax.set_ylabel("seconds (this CPU)")
    ax.set_title(f"EMC vs X-RAI, {result['image_px']} px, target median pose error < {result['target_deg']} deg",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "config" / "demo.yaml"))
    p.add_argument("--work", required=True, help="directory for datasets and runs (reused when rerun)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--target-deg", type=float, default=5.0)
    p.add_argument("--emc-full-max", type=int, default=8192, help="full EMC runs up to this N; timed above")
    p.add_argument("--timed-iterations", type=int, default=1)
    p.add_argument("--xrai-probe-steps", type=int, default=40, help="steps of the per-step timing runs")
    p.add_argument("--xrai-probe-max", type=int, default=8192,
                   help="X-RAI timing runs up to this N (each also infers the pose of all its images)")
    p.add_argument("--xrai-metrics", help="metrics.csv of a finished xrai run (steps to target)")
    p.add_argument("--xrai-steps", type=int, default=0,
                   help="if no --xrai-metrics: run this many steps here (on the second size) to find the steps to target")
    p.add_argument("--xrai-eval-every", type=int, default=250)
    p.add_argument("--plot", default=str(REPO / "docs" / "scaling.png"))
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from xrai.config import load_config
    from xrai.utils import set_cpu_threads

    threads = set_cpu_threads(args.threads)
    cfg = load_config(args.config)
    cfg["emc"]["device"] = cfg["train"]["device"] = "cpu"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mirror = Path(os.environ.get("XRAI_PDB_MIRROR") or REPO.parent / "shared" / "pdb")
    load_start = os.getloadavg()
    files = prepare_data(cfg, work, args.sizes, args.test_images, mirror)

    from xrai.recon.emc import EMCSettings

    settings = EMCSettings.from_config(cfg)
    result: dict = {"config": args.config, "image_px": cfg["detector"]["n_pixels"], "grid": cfg["volume"]["grid_size"],
                    "target_deg": args.target_deg, "threads": threads, "cpu": _cpu_name(),
                    "emc_schedule": {"levels": settings.levels, "level_iterations": settings.level_iterations,
                                     "beta": [settings.beta_start, settings.beta_factor, settings.beta_every,
                                              settings.beta_max]},
                    "simulate_s": {str(k): v for k, v in files["simulate_s"].items()}, "rows": []}

    # ---- EMC: full runs where affordable, timed iterations everywhere
    full: dict[int, dict] = {}
    for n in args.sizes:
        if n <= args.emc_full_max:
            logger.info("EMC full run, N=%d", n)
            full[n] = emc_full_run(cfg, files["train"][n], files["test"], work / f"emc_{n}", args.target_deg)
            logger.info("EMC N=%d: %s", n, full[n])
    counts_from = max((n for n in full if full[n]["iterations_to_target"]), default=None)
    if counts_from is None:
        raise SystemExit("no full EMC run reached the target; raise emc.n_iterations or --emc-full-max")
    counts = full[counts_from]["iterations_to_target"]
    timed = {n: emc_timed(cfg, files["train"][n], sorted(counts), args.timed_iterations) for n in args.sizes}

    # ---- X-RAI: seconds per step and the per-image cost of the final pose inference, from short runs;
    # steps to target from a finished run or a run made here
    batch = int(cfg["train"]["batch_size"])
    xrai: dict = xrai_recipe() | {"s_per_step": {}, "overhead_s": {}}
    probe_sizes = [n for n in args.sizes if n <= args.xrai_probe_max]
    for n in probe_sizes:
        t0 = time.perf_counter()
        rows = xrai_run(cfg, files["train"][n], files["test"], work / f"xrai_probe_{n}", args.xrai_probe_steps,
                        eval_every=10**9)
        total = time.perf_counter() - t0
        xrai["s_per_step"][n] = seconds_per_step(rows, batch)
        # outside the step loop: preparing (profile, first merge) and the poses of every train and test image
        xrai["overhead_s"][n] = total - float(rows[-1]["wall_s"])
        logger.info("X-RAI N=%d: %.3f s / step, %.0f s outside the steps", n, xrai["s_per_step"][n],
                    xrai["overhead_s"][n])
    s_step = float(np.mean(list(xrai["s_per_step"].values())))
    images = [n + args.test_images for n in probe_sizes]
    if len(probe_sizes) > 1:
        p0, r_inf = linear_fit(images, [xrai["overhead_s"][n] for n in probe_sizes])
    else:
        p0, r_inf = 0.0, xrai["overhead_s"][probe_sizes[0]] / images[0]
    xrai["prepare_s"], xrai["inference_s_per_image"] = p0, r_inf
    if args.xrai_metrics:
        rows = list(csv.DictReader(open(args.xrai_metrics)))
        xrai["steps_source"] = args.xrai_metrics
    elif args.xrai_steps:
        n_run = args.sizes[min(1, len(args.sizes) - 1)]
        rows = xrai_run(cfg, files["train"][n_run], files["test"], work / f"xrai_full_{n_run}", args.xrai_steps,
                        eval_every=args.xrai_eval_every, target=args.target_deg, eval_images=args.test_images)
        xrai["steps_source"] = f"run here: N={n_run}, {args.xrai_steps} steps"
    else:
        rows = []
        xrai["steps_source"] = "none (give --xrai-metrics or --xrai-steps)"
    xrai["steps_run"] = max((int(r["step"]) for r in rows), default=0)
    xrai["steps_to_target"] = steps_to_target(rows, args.target_deg)
    xrai["best_test_pose_median_deg"] = min((float(r["test_pose_median_deg"]) for r in rows
                                             if r.get("test_pose_median_deg") not in (None, "")), default=None)
    # the run's own wall clock (its steps and periodic evaluations) plus the preparation
    wall_at = {int(r["step"]): float(r["wall_s"]) for r in rows if r.get("wall_s") not in (None, "")}
    if xrai["steps_to_target"]:
        xrai["time_to_target_s"] = p0 + wall_at.get(xrai["steps_to_target"], xrai["steps_to_target"] * s_step)
    elif xrai["steps_run"]:
        xrai["time_lower_bound_s"] = p0 + wall_at.get(xrai["steps_run"], xrai["steps_run"] * s_step)
    if xrai["steps_run"] and xrai["steps_run"] in wall_at:
        xrai["run_s_per_step"] = wall_at[xrai["steps_run"]] / xrai["steps_run"]
    result["xrai"] = {k: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v) for k, v in xrai.items()}

    # ---- table rows
    for n in args.sizes:
        t = timed[n]
        if n in full and full[n]["time_to_target_s"]:
            source, to_target = "measured", full[n]["time_to_target_s"]
        else:
            source = "extrapolated"
            to_target = t["init_s"] + sum(k * t["per_iteration_s"][lv] for lv, k in counts.items())
        result["rows"].append({
            "n": n, "emc_source": source, "emc_time_to_target_s": to_target, "emc_init_s": t["init_s"],
            "emc_s_per_iteration": {str(lv): v for lv, v in t["per_iteration_s"].items()},
            "emc_peak_rss_mb": t["peak_rss_mb"], "xrai_s_per_step": xrai["s_per_step"].get(n),
            "emc_full": full.get(n),
        })
    ns = [r["n"] for r in result["rows"]]
    final_level = max(counts)
    per_it = [r["emc_s_per_iteration"][str(final_level)] for r in result["rows"]]
    tt = [r["emc_time_to_target_s"] for r in result["rows"]]
    a, b = linear_fit(ns, tt)
    result["emc_fit"] = {"final_level": final_level, "iterations_to_target": {str(k): v for k, v in counts.items()},
                         "counts_from_n": counts_from, "a_s": a, "b_s_per_image": b,
                         "exponent_per_iteration": growth_exponent(ns, per_it),
                         "exponent_time_to_target": growth_exponent(ns, tt),
                         "exponent_time_to_target_upper_half": growth_exponent(ns[-2:], tt[-2:]) if len(ns) > 1 else None,
                         "time_to_target_at_5M_s": a + b * PAPER_N,
                         "s_per_iteration_at_5M": float(np.polyval(np.polyfit(ns, per_it, 1), PAPER_N))}
    if len(probe_sizes) > 1:
        result["xrai"]["exponent_per_step"] = growth_exponent(probe_sizes, [xrai["s_per_step"][n] for n in probe_sizes])
    x_total = xrai.get("time_to_target_s") or xrai.get("time_lower_bound_s")
    if x_total:
        bound = not xrai.get("time_to_target_s")
        # training only (the volume): constant in N
        result["crossover_n"] = (x_total - a) / b if b > 0 and x_total > a else None
        # training + the pose of every training image (one inference each): grows with N too
        result["crossover_n_with_inference"] = (x_total - a) / (b - r_inf) if b > r_inf and x_total > a else None
        result["crossover_is_lower_bound"] = bound
        result["xrai_time_with_inference_at_5M_s"] = x_total + r_inf * PAPER_N
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}
    (work / "scaling.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, Path(args.plot))
    print_table(result)
    return result


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def print_table(r: dict) -> None:
    fl = r["emc_fit"]["final_level"]
    levels = sorted(int(k) for k in r["emc_fit"]["iterations_to_target"])
    head = ["N", "EMC to target (s)", "source"] + [f"EMC s/it L{lv}" for lv in levels] + ["X-RAI s/step"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in r["rows"]:
        cells = [f"{row['n']:,}", f"{row['emc_time_to_target_s']:.0f}", row["emc_source"]]
        cells += [f"{row['emc_s_per_iteration'][str(lv)]:.2f}" for lv in levels]
        cells += [f"{row['xrai_s_per_step']:.3f}" if row["xrai_s_per_step"] else "-"]
        print("| " + " | ".join(cells) + " |")
    f, x = r["emc_fit"], r["xrai"]
    print(f"\nEMC iterations to target (from N={f['counts_from_n']:,}): {f['iterations_to_target']}")
    print(f"growth exponents: EMC per iteration (level {fl}) {f['exponent_per_iteration']:.2f}, EMC time to target "
          f"{f['exponent_time_to_target']:.2f} (top two sizes {f['exponent_time_to_target_upper_half']:.2f})"
          + (f", X-RAI per step {x['exponent_per_step']:.2f}" if "exponent_per_step" in x else ""))
    print(f"EMC time to target ~ {f['a_s']:.0f} s + {f['b_s_per_image'] * 1e3:.3f} ms x N; at 5M: "
          f"{f['time_to_target_at_5M_s'] / 3600:.1f} h ({f['s_per_iteration_at_5M'] / 60:.0f} min per level-{fl} iteration)")
    print(f"X-RAI ({x['recipe']}, {x['commit']}): {sum(x['s_per_step'].values()) / len(x['s_per_step']):.3f} s/step, "
          f"prepare {x['prepare_s']:.0f} s, pose inference {x['inference_s_per_image'] * 1e3:.2f} ms/image; steps to "
          f"target {x['steps_to_target']} (source: {x['steps_source']}; best test median {x['best_test_pose_median_deg']})")
    if x.get("time_to_target_s"):
        print(f"X-RAI time to target {x['time_to_target_s']:.0f} s")
    elif x.get("time_lower_bound_s"):
        print(f"X-RAI target not reached in {x['steps_run']} steps: time to target > {x['time_lower_bound_s']:.0f} s")
    for key, what in (("crossover_n", "training only"), ("crossover_n_with_inference", "with pose inference of all N")):
        if key in r:
            val = r[key]
            print(f"crossover N ({what}): " + ("none" if val is None else
                  f"{'>= ' if r['crossover_is_lower_bound'] else '~ '}{val:,.0f}"))
    if "xrai_time_with_inference_at_5M_s" in r:
        print(f"X-RAI at 5M with pose inference: {r['xrai_time_with_inference_at_5M_s'] / 3600:.1f} h")
    print(f"load average start {r['load_average']['start']}, end {r['load_average']['end']}")


if __name__ == "__main__":
    main(sys.argv[1:])
