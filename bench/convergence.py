"""Convergence benchmark: minutes and steps to a median test pose error below 10, 5 and 2 degrees.

Runs ``xrai train`` (the same entry point as the pipeline) on the demo dataset (config/demo.yaml:
2CEX_A, 32 px, 16,384 train / 10,000 test images, noise-free) for

* ``xrai`` (the default recipe, src/xrai/abinitio.py), for several seeds;
* ``xrai-paper`` (the X-RAI paper's recipe);
* ``known-pose`` (the paper's FourierNet with the true rotations, with the config's
  ``train.methods`` overrides) and ``xrai-known-pose`` (the default recipe's merged volume at
  the true rotations, one pass over the data): the resolution bounds of the two decoders;
* ablations of ``xrai``, each with one ingredient removed (``--ablations``);

each in its own process with one CPU thread (``--threads``), and prints one table row per run:
steps, wall-clock minutes and CPU minutes to < 10, < 5, < 2 degrees (median over ``train.eval_images`` test images, evaluated every
``--eval-every`` steps), the final median / fractions over *all* test images (the poses
file), and the resolution of the amplitude volume against the true one (the shell where
the amplitude shell correlation, after the global rotation found by the pose metric,
first falls below 0.5; Angstrom). Wall-clock times include the periodic evaluations and
depend on what else the machine runs; CPU minutes are the process's own (user + system).

Usage::

    python bench/convergence.py --work /tmp/conv --seeds 0 1 2 --markdown /tmp/conv/table.md \\
        --plot docs/convergence-2CEX_A.png
    python bench/convergence.py --work /tmp/conv --only xrai --seeds 0 --steps 2000
    python bench/convergence.py --work /tmp/conv --protein 4AKE --only xrai --seeds 0
    python bench/convergence.py --work /tmp/conv --protein SYN1 --only xrai --seeds 0   # a built structure

The datasets (fetch, simulate, reference) are made in ``--work`` when missing.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from xrai.config import method_config

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (10.0, 5.0, 2.0)
#: the resolution bounds: each decoder trained at the true poses
KNOWN_POSE = ("known-pose", "xrai-known-pose")
#: ablations of the default recipe: name -> (what changes, train.xrai overrides)
ABLATIONS = {
    "no-search": ("no grid search (encoder heads + refinement only)", {"search_steps": 0}),
    "one-head": ("1 encoder head instead of 8", {"heads": 1}),
    "no-train-refine": ("no pattern-search refinement of the training targets", {"refine_deg": []}),
    "curriculum": ("a resolution curriculum: 0.3 of the corner |q| until step 400, all by step 1000",
                   {"curriculum": [[0, 0.3], [400, 0.3], [700, 0.6], [1000, 1.0]]}),
}


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to ``cfg`` in place; returns it."""
    for item in overrides:
        key, value = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return cfg


def xrai_cli() -> list[str]:
    return [sys.executable, "-m", "xrai.cli"]


def run_cmd(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, env=env)


#: the structure this benchmark builds (``--protein SYN1``): not a PDB entry
SYNTHETIC = "SYN1"


def build_synthetic_structure(path: Path, n_residues: int = 320, seed: int = 7) -> None:
    """A made-up, protein-like molecule: a 320-residue backbone (N, CA, C, O, CB) on a random walk.

    CA atoms 3.8 Å apart, steered to stay inside an ellipsoid of semi-axes 16 x 21 x 30 Å
    (elongated, no symmetry) and away from earlier atoms (>= 4 Å), as a compact chain would.
    Written as PDB with ``gemmi`` so ``xrai fetch`` reads it like any other file.
    """
    import gemmi
    import numpy as np

    rng = np.random.default_rng(seed)
    axes = np.array([16.0, 21.0, 30.0])
    ca = [np.zeros(3)]
    direction = rng.normal(size=3)
    while len(ca) < n_residues:
        for _ in range(200):
            d = direction + 0.9 * rng.normal(size=3)
            d /= np.linalg.norm(d)
            x = ca[-1] + 3.8 * d
            inside = ((x / axes) ** 2).sum() < 1.0
            clear = len(ca) < 3 or np.min(np.linalg.norm(np.array(ca[:-2]) - x, axis=1)) >= 4.0
            if inside and clear:
                break
        ca.append(x)
        direction = d
    ca = np.array(ca)
    st = gemmi.Structure()
    st.name = SYNTHETIC
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    names = (("N", "N", -1.45), ("CA", "C", 0.0), ("C", "C", 1.52), ("O", "O", 2.4), ("CB", "C", 1.53))
    for i, x in enumerate(ca):
        res = gemmi.Residue()
        res.name = "ALA"
        res.seqid = gemmi.SeqId(i + 1, " ")
        t = (ca[min(i + 1, len(ca) - 1)] - ca[max(i - 1, 0)])
        t /= np.linalg.norm(t) + 1e-9
        side = np.cross(t, rng.normal(size=3))
        side /= np.linalg.norm(side) + 1e-9
        for name, el, off in names:
            pos = x + off * (side if name in ("O", "CB") else t)
            atom = gemmi.Atom()
            atom.name = name
            atom.element = gemmi.Element(el)
            atom.pos = gemmi.Position(*pos)
            atom.occ = 1.0
            atom.b_iso = 20.0
            res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    path.parent.mkdir(parents=True, exist_ok=True)
    st.write_pdb(str(path))


def prepare_data(cfg_path: Path, work: Path, protein: str, env: dict) -> dict:
    """Structure, train/test datasets and reference volumes of ``protein`` in ``work`` (made when missing)."""
    cfg = yaml.safe_load(cfg_path.read_text())
    n_train = int(cfg["simulation"]["train_sizes"][0])
    n_test = int(cfg["simulation"]["test_size"])
    d = work / "data" / protein
    d.mkdir(parents=True, exist_ok=True)
    paths = {"structure": d / f"{protein}.cif", "train": d / f"train_{n_train}.h5", "test": d / f"test_{n_test}.h5",
             "density": d / "density.mrc", "intensity": d / "intensity.h5"}
    base = xrai_cli()
    if not paths["structure"].exists():
        run_cmd(base + ["fetch", "--config", str(cfg_path), "--protein", protein, "--out", str(paths["structure"])], env)
    for split, n in (("train", n_train), ("test", n_test)):
        if not paths[split].exists():
            run_cmd(base + ["simulate", "--config", str(cfg_path), "--structure", str(paths["structure"]),
                            "--split", split, "--n-images", str(n), "--out", str(paths[split])], env)
    if not paths["intensity"].exists():
        run_cmd(base + ["reference", "--config", str(cfg_path), "--structure", str(paths["structure"]),
                        "--density", str(paths["density"]), "--intensity", str(paths["intensity"])], env)
    return paths


def _cpu_seconds(pid: int) -> float | None:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def train_run(cfg: dict, method: str, seed: int, paths: dict, out: Path, threads: int, env: dict) -> dict:
    """One ``xrai train`` process; returns its timeline: (wall, cpu) samples and the per-step log times."""
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = copy.deepcopy(cfg)
    run_cfg["train"]["seed"] = int(seed)
    run_cfg["train"]["num_threads"] = int(threads)
    # the config's per-method overrides (decoder, lr, batch_size), as in the pipeline; the bench sets the steps
    steps = int(run_cfg["train"]["steps"])
    run_cfg["train"] = method_config(run_cfg, method)["train"]
    run_cfg["train"].update(steps=steps, methods=[{"name": method, "runs": 1}])
    cfg_file = out / "bench_config.yaml"
    cfg_file.write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    log = out / "train.log"
    if (out / "metrics.csv").exists() and (out / "timeline.json").exists():
        return json.loads((out / "timeline.json").read_text())
    cmd = xrai_cli() + ["train", "--config", str(cfg_file), "--method", method, "--run", "0",
                        "--train-data", str(paths["train"]), "--test-data", str(paths["test"]),
                        "--out-dir", str(out), "--log", str(log)]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    samples = [(0.0, 0.0)]
    while proc.poll() is None:
        cpu = _cpu_seconds(proc.pid)
        if cpu is not None:
            samples.append((time.time() - t0, cpu))
        time.sleep(2.0)
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed}: xrai train failed with exit code {proc.returncode}; see {log}")
    # wall-clock time of every logged step (log lines carry second-resolution timestamps)
    step_times = {}
    for line in log.read_text().splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\S* .*step (\d+)/(\d+)", line)
        if m:
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            step_times[int(m.group(2))] = ts - t0
    timeline = {"samples": samples, "step_wall": step_times, "total_wall": time.time() - t0,
                "total_cpu": samples[-1][1] if len(samples) > 1 else None}
    (out / "timeline.json").write_text(json.dumps(timeline))
    return timeline


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-9)
    return ys[-1]


def time_to_targets(out: Path, timeline: dict) -> dict:
    """Steps, wall and CPU minutes at the first evaluation below each threshold (None: not reached)."""
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    evals = [(int(r["step"]), float(r["test_pose_median_deg"])) for r in rows if r.get("test_pose_median_deg")]
    sw = {int(k): v for k, v in timeline["step_wall"].items()}
    ws, cs = zip(*timeline["samples"], strict=True)
    res = {"curve": []}
    for step, med in evals:
        wall = sw.get(step)
        cpu = _interp(wall, list(ws), list(cs)) if wall is not None else None
        res["curve"].append({"step": step, "median_deg": med, "wall_min": None if wall is None else wall / 60,
                             "cpu_min": None if cpu is None else cpu / 60})
    for thr in THRESHOLDS:
        hit = next((c for c in res["curve"] if c["median_deg"] < thr), None)
        res[f"lt{thr:g}"] = hit
    return res


def final_metrics(out: Path, paths: dict, method: str) -> dict:
    """Test and train pose errors (all images) and the amplitude resolution against the truth."""
    import h5py
    import torch

    from xrai.evaluation.align import transform_volume
    from xrai.evaluation.evaluate import pose_error_summary, true_rotations
    from xrai.evaluation.metrics import pose_errors_deg, shell_correlation
    from xrai.volume import read_volume_h5
    from xrai.xray.phasing import measured_mask

    res: dict = {}
    A = torch.eye(3, dtype=torch.float64)
    if method not in KNOWN_POSE:
        res["test"] = pose_error_summary(out / "poses_test.h5", paths["test"])
        res["train"] = pose_error_summary(out / "poses_train.h5", paths["train"])
        with h5py.File(out / "poses_test.h5", "r") as f:
            R_pred = torch.from_numpy(f["rotations"][...]).double()
            index = torch.from_numpy(f["index"][...]).long()
        _, A = pose_errors_deg(R_pred, true_rotations(paths["test"], index))
    if method == "xrai":
        res["test_encoder_only"] = encoder_only_errors(out, paths)
    amp, grid = read_volume_h5(str(out / "intensity.h5"), "amplitude")
    true_int, _ = read_volume_h5(str(paths["intensity"]), "intensity")
    # learned V(k) = V_true(A k)  =>  V_true(k) = V(A^T k): transform_volume(vol, R) = vol(R^T x)
    aligned = transform_volume(amp.double(), A)
    inside = measured_mask(grid)
    nan = torch.full_like(aligned, float("nan"))
    asc = shell_correlation(torch.where(inside, aligned, nan), torch.where(inside, true_int.double().clamp_min(0).sqrt(), nan),
                            grid)
    res["asc"] = asc
    res["resolution_A"] = asc_resolution(asc)
    res["asc_mean"] = asc["mean"]
    res["fsc"] = phased_fsc(amp, grid, paths, cfg_of(out))
    return res


def _jsonable(o):
    """numpy / torch values as JSON (lists and numbers)."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def cfg_of(out: Path) -> dict:
    from xrai.config import load_config

    return load_config(out / "bench_config.yaml")


def phased_fsc(amplitude, grid, paths: dict, cfg: dict) -> dict:
    """The pipeline's resolution: phase (ER/HIO + shrinkwrap, the config's settings), align to the reference
    density (rotation, shift, hand), FSC 0.5 -- as ``xrai phase`` and ``xrai evaluate`` do."""
    from xrai.evaluation.align import align_volumes
    from xrai.evaluation.metrics import fsc, resolution_from_fsc
    from xrai.io import read_mrc
    from xrai.xray.phasing import measured_mask, phase_er_hio

    pc = cfg["phasing"]
    res = phase_er_hio(amplitude, n_starts=int(pc["n_starts"]), n_iterations=int(pc["n_iterations"]),
                       beta=float(pc["beta"]), hio_per_cycle=int(pc["hio_per_cycle"]), er_per_cycle=int(pc["er_per_cycle"]),
                       shrinkwrap_every=int(pc["shrinkwrap_every"]), threshold=float(pc["shrinkwrap_threshold"]),
                       sigma_start=float(pc["shrinkwrap_sigma_start"]), sigma_end=float(pc["shrinkwrap_sigma_end"]),
                       seed=int(pc["seed"]), device="cpu", mask=measured_mask(grid))
    ref, voxel = read_mrc(paths["density"])
    al = align_volumes(res.density.numpy(), ref, angular_step_deg=float(cfg["evaluation"]["align_angular_step_deg"]))
    curve = fsc(al.aligned, ref, voxel)
    px, angstrom = resolution_from_fsc(curve, ref.shape[0], voxel, float(cfg["evaluation"]["fsc_cutoff"]))
    return {"resolution_A": angstrom, "resolution_px": px, "align_cc": al.cc, "curve": curve}


def encoder_only_errors(out: Path, paths: dict) -> dict:
    """Test pose error of the trained ``xrai`` encoder alone (best head, no refinement): the amortized part."""
    import torch

    from xrai.config import load_config
    from xrai.data.hdf5 import DiffractionDataset
    from xrai.evaluation.metrics import pose_errors_deg, summarize_pose_errors
    from xrai.recon.abinitio import XraiRecipe
    from xrai.recon.train import imaging_model

    cfg = load_config(out / "bench_config.yaml")
    recipe = XraiRecipe(cfg)
    ds = DiffractionDataset(paths["test"])
    recipe.configure(DiffractionDataset(paths["train"]))
    model = recipe.build_model(imaging_model(cfg, ds))
    model.load_state_dict(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"])
    model.eval()
    R_pred, R_true = [], []
    with torch.no_grad():
        for i in range(0, len(ds), 500):
            b = recipe.batch(ds.read(i, min(i + 500, len(ds))), torch.device("cpu"))
            R_pred.append(recipe.infer_poses(model, b, refine=False)[0])
            R_true.append(b.rotations)
    return summarize_pose_errors(pose_errors_deg(torch.cat(R_pred), torch.cat(R_true))[0])


def asc_resolution(asc: dict, cutoff: float = 0.5) -> float:
    """1 / q (Angstrom) where the amplitude shell correlation first falls below ``cutoff`` (linear between shells).

    ``inf`` when even the first shell lies below the cutoff: nothing was resolved.
    """
    f, c = asc["freq_A_inv"], asc["corr"]
    if not c or c[0] < cutoff:
        return math.inf
    for i in range(1, len(c)):
        if f[i] > 0 and c[i] < cutoff:
            f0, c0 = f[i - 1], c[i - 1]
            q = f0 + (f[i] - f0) * (c0 - cutoff) / max(c0 - c[i], 1e-12)
            return 1.0 / q
    return 1.0 / f[-1]


def fmt(hit: dict | None, key: str) -> str:
    if hit is None or hit.get(key) is None:
        return "–"
    return f"{hit[key]:.0f}" if key == "step" else f"{hit[key]:.1f}"


def table(results: list[dict]) -> str:
    head = ("| run | seed | steps | <10°: step / wall / CPU min | <5° | <2° | final test median ° (encoder alone) | "
            "within 2° / 5° / 10° | train median ° | amplitude shell corr. (mean) | phased FSC 0.5 Å | wall / CPU min |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        cells = [r["label"], str(r["seed"]), str(r["steps"])]
        for thr in THRESHOLDS:
            if r.get("targets") is None or r["method"] in KNOWN_POSE:
                cells.append("n/a")
                continue
            hit = r["targets"].get(f"lt{thr:g}")
            cells.append("not reached" if hit is None else f"{fmt(hit, 'step')} / {fmt(hit, 'wall_min')} / {fmt(hit, 'cpu_min')}")
        fm = r["final"]
        if "test" in fm and fm["test"]:
            t = fm["test"]
            enc = fm.get("test_encoder_only")
            cells += [f"{t['median_deg']:.2f}" + (f" ({enc['median_deg']:.1f})" if enc else ""),
                      f"{100 * t['frac_within_2']:.0f}% / {100 * t['frac_within_5']:.0f}% / {100 * t['frac_within_10']:.0f}%",
                      f"{fm['train']['median_deg']:.2f}"]
        else:
            cells += ["n/a", "n/a", "n/a"]
        cells.append(f"{fm['asc_mean']:.3f}")
        cells.append(f"{fm['fsc']['resolution_A']:.2f}")
        tl = r.get("timeline")
        cells.append(f"{tl['total_wall'] / 60:.1f} / {(tl['total_cpu'] or 0) / 60:.1f}" if tl else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path, protein: str) -> None:
    """Median test pose error against steps and against CPU minutes, one line per run (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in results:
        curve = (r.get("targets") or {}).get("curve")
        if not curve:
            continue
        style = "-" if r["label"] == "xrai" else ("--" if r["label"].startswith("xrai ") else ":")
        label = r["label"] + (f" (seed {r['seed']})" if r["label"] == "xrai" else "")
        steps = [c["step"] for c in curve]
        med = [c["median_deg"] for c in curve]
        axes[0].plot(steps, med, style, marker=".", label=label)
        cpu = [c["cpu_min"] for c in curve]
        if all(v is not None for v in cpu):
            axes[1].plot(cpu, med, style, marker=".", label=label)
    for ax, xl in zip(axes, ("training step", "CPU minutes (one thread)"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        for thr in THRESHOLDS:
            ax.axhline(thr, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median test pose error (deg)")
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle(f"Convergence on {protein} (32 px, noise-free)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "config" / "demo.yaml"))
    p.add_argument("--protein", default="2CEX_A")
    p.add_argument("--work", default=str(REPO / "results" / "bench" / "convergence"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the default recipe")
    p.add_argument("--only", nargs="+", choices=["xrai", "xrai-paper", "known-pose", "ablations"],
                   default=["xrai", "xrai-paper", "known-pose", "ablations"])
    p.add_argument("--steps", type=int, default=None, help="train.steps of xrai (default: the config's)")
    p.add_argument("--paper-steps", type=int, default=60, help="train.steps of xrai-paper (~30 s a step on one CPU thread)")
    p.add_argument("--known-steps", type=int, default=None,
                   help="train.steps of known-pose (default: its train.methods entry's, else train.steps)")
    p.add_argument("--ablation-steps", type=int, default=None, help="default: the xrai runs' steps")
    p.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--xrai-overrides", default=None, metavar="YAML",
                   help="mapping merged into train.xrai of the xrai runs, e.g. '{curriculum: [[0, 1.0]]}'")
    p.add_argument("--label", default=None, help="suffix of the xrai runs' label (and run folder) with --xrai-overrides")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", default=None, help="also write the table (and the curves as JSON beside it)")
    p.add_argument("--plot", default=None, help="also plot the curves (PNG)")
    a = p.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("XRAI_PDB_MIRROR", str(REPO.parent / "shared" / "pdb"))
    work = Path(a.work)
    cfg_path = Path(a.config)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["proteins"] = [a.protein]
    if a.protein == SYNTHETIC:
        syn = work / "data" / f"{SYNTHETIC}.pdb"
        if not syn.exists():
            build_synthetic_structure(syn)
        cfg["proteins"] = [{"name": SYNTHETIC, "file": str(syn)}]
    cfg_p = work / f"config_{a.protein}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    cfg_p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    paths = prepare_data(cfg_p, work, a.protein, env)
    cfg["train"]["eval_every"] = int(a.eval_every)
    cfg["train"]["log_every"] = min(int(cfg["train"].get("log_every", 50)), int(a.eval_every))

    jobs = []
    if "xrai" in a.only:
        overrides = yaml.safe_load(a.xrai_overrides) if a.xrai_overrides else {}
        label = "xrai" + (f" {a.label}" if a.label else "")
        for s in a.seeds:
            jobs.append((label, "xrai", s, a.steps or int(cfg["train"]["steps"]), overrides))
    if "xrai-paper" in a.only:
        jobs.append(("xrai-paper", "xrai-paper", 0, a.paper_steps, {}))
    if "known-pose" in a.only:
        known_steps = a.known_steps or int(method_config(cfg, "known-pose")["train"]["steps"])
        jobs.append(("known-pose", "known-pose", 0, known_steps, {}))
        # one pass over the training set merges every image once at its true pose
        n_train = int(cfg["simulation"]["train_sizes"][0])
        jobs.append(("xrai-known-pose", "xrai-known-pose", 0, math.ceil(n_train / int(cfg["train"]["batch_size"])), {}))
    if "ablations" in a.only:
        for name in a.ablations:
            jobs.append((f"xrai {name}", "xrai", 0, a.ablation_steps or a.steps or int(cfg["train"]["steps"]),
                         ABLATIONS[name][1]))

    results = []
    for label, method, seed, steps, overrides in jobs:
        run_cfg = copy.deepcopy(cfg)
        run_cfg["train"]["steps"] = int(steps)
        run_cfg["train"].setdefault("xrai", {}).update(overrides)
        out = work / "runs" / a.protein / label.replace(" ", "_") / f"seed{seed}"
        tl = train_run(run_cfg, method, seed, paths, out, a.threads, env)
        final_file = out / "final.json"  # the final metrics of a finished run are computed once
        if final_file.exists() and final_file.stat().st_mtime >= (out / "metrics.csv").stat().st_mtime:
            final = json.loads(final_file.read_text())
        else:
            final = final_metrics(out, paths, method)
            final_file.write_text(json.dumps(final, default=_jsonable))
        res = {"label": label, "method": method, "seed": seed, "steps": steps, "overrides": overrides,
               "timeline": tl, "targets": time_to_targets(out, tl), "final": final}
        results.append(res)
        print(table([res]).splitlines()[-1], flush=True)

    text = table(results)
    print(text)
    if a.markdown:
        md = Path(a.markdown)
        md.write_text(text + "\n")
        md.with_suffix(".json").write_text(json.dumps(results, indent=1, default=_jsonable))
        print(f"wrote {md} and {md.with_suffix('.json')}")
    if a.plot:
        plot_curves(results, Path(a.plot), a.protein)
        print(f"wrote {a.plot}")
    bad = [r for r in results if r["final"].get("resolution_A") is None or math.isnan(r["final"]["resolution_A"])]
    if bad:
        print("warning: no resolution for", [r["label"] for r in bad])


if __name__ == "__main__":
    main()
