"""Figures of the report: densities, FSC curves, training curves, pose errors, images vs. decoder.

All inputs are found from the ``metrics.json`` files through the pipeline's fixed
layout (``docs/architecture.md``), so the same code draws the figures of any run.
Each figure is written as PNG (for the HTML report) and PDF (for a paper).

Usage::

    xrai figures --kind protein --metrics results/metrics/2CEX_A/*/*/metrics.json \\
        --out-dir results/figures/2CEX_A
"""

from __future__ import annotations

import argparse
import csv
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xrai.config import size_label
from xrai.errors import XraiError
from xrai.io import atomic_path, read_json, read_mrc
from xrai.report.table import METHOD_NAMES

logger = logging.getLogger(__name__)


@dataclass
class Reconstruction:
    """Where the outputs of one (protein, size, method) live, found from its metrics.json."""

    metrics_path: Path
    metrics: dict

    @property
    def root(self) -> Path:  # results/
        return self.metrics_path.parents[4]

    @property
    def protein(self) -> str:
        return str(self.metrics["protein"])

    @property
    def size(self) -> int:
        return int(self.metrics["size"])

    @property
    def method(self) -> str:
        return str(self.metrics["method"])

    @property
    def label(self) -> str:
        return f"{METHOD_NAMES.get(self.method, self.method)}, {size_label(self.size)}"

    @property
    def run_dir(self) -> Path:
        best = read_json(self.root / "reconstructions" / self.protein / str(self.size) / self.method / "best.json")
        return Path(best["run_dir"])

    @property
    def density_path(self) -> Path:
        """The phased density aligned to the reference, written by ``xrai evaluate`` beside metrics.json."""
        from xrai.evaluation.evaluate import ALIGNED_DENSITY

        aligned = self.metrics_path.parent / ALIGNED_DENSITY
        if not aligned.exists():
            raise XraiError(f"{aligned}: file not found (written by xrai evaluate beside {self.metrics_path.name})")
        return aligned

    def dataset_path(self, split: str) -> Path:
        d = self.root / "datasets" / self.protein
        if split == "train":
            return d / f"train_{self.size}.h5"
        tests = sorted(d.glob("test_*.h5"))
        if not tests:
            raise XraiError(f"{d}: no test dataset found")
        return tests[0]


def load_reconstructions(paths: list[str]) -> list[Reconstruction]:
    order = list(METHOD_NAMES)
    recs = [Reconstruction(Path(p), read_json(p)) for p in paths]
    recs.sort(key=lambda r: (r.size, order.index(r.method) if r.method in order else 99))
    return recs


def _save(fig, out_dir: Path, name: str) -> None:
    """Write ``name``.png and ``name``.pdf atomically."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        with atomic_path(out_dir / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _views(vol: np.ndarray) -> list[np.ndarray]:
    """Central slices normal to x, y, z and a maximum projection along z (images indexed [row, col])."""
    c = [s // 2 for s in vol.shape]
    return [vol[c[0], :, :].T, vol[:, c[1], :].T, vol[:, :, c[2]].T, vol.max(axis=2).T]


def figure_densities(recs: list[Reconstruction], out_dir: Path) -> None:
    """Reference density beside each reconstruction: three central slices and a maximum projection."""
    import matplotlib.pyplot as plt

    ref, voxel = read_mrc(recs[0].root / "reference" / recs[0].protein / "density.mrc")
    rows = [("Reference", ref, voxel)]
    for r in recs:
        vol, vs = read_mrc(r.density_path)
        rows.append((r.label, vol, vs))
    titles = ["slice x = 0 (y–z)", "slice y = 0 (x–z)", "slice z = 0 (x–y)", "max projection along z"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 2.7 * len(rows)), squeeze=False)
    for i, (label, vol, vs) in enumerate(rows):
        half = vol.shape[0] * vs / 2
        for j, img in enumerate(_views(vol)):
            ax = axes[i, j]
            # density >= 0 in every row (the reference's small negative ripples would lift its background)
            ax.imshow(img, origin="lower", cmap="magma", extent=(-half, half, -half, half), vmin=0.0,
                      vmax=max(float(img.max()), 1e-12))
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{textwrap.fill(label, 24)}\nÅ", fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("Å", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{recs[0].protein}: electron densities (aligned to the reference)")
    _save(fig, out_dir, "densities")


def figure_fsc(recs: list[Reconstruction], out_dir: Path) -> None:
    """FSC curves against spatial frequency, with the cutoff line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    cutoff = recs[0].metrics.get("fsc_cutoff", 0.5)
    for r in recs:
        f = r.metrics["fsc"]
        res = r.metrics.get("resolution_A")
        extra = f" ({res:.1f} Å)" if res else ""
        ax.plot(f["freq_A_inv"], f["fsc"], label=r.label + extra)
    ax.axhline(cutoff, color="k", ls="--", lw=1, label=f"FSC = {cutoff}")
    ax.set_xlabel("spatial frequency (Å⁻¹)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{recs[0].protein}: FSC against the reference")
    _save(fig, out_dir, "fsc")


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else []:
        cols[key] = np.array([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
    return cols


def _pose_column(cols: dict[str, np.ndarray]) -> str | None:
    for key in cols:
        if "pose" in key and "median" in key and "train" not in key:
            return key
    return None


def figure_training_curves(recs: list[Reconstruction], out_dir: Path) -> None:
    """Loss and test pose error against steps and wall time."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    for i, r in enumerate(recs):
        color = f"C{i}"  # one colour per method in every panel
        path = r.run_dir / "metrics.csv"
        if not path.exists():
            continue
        cols = _read_csv(path)
        step, wall = cols.get("step"), cols.get("wall_s")
        # EMC has no loss (its metrics.csv has a log-likelihood, a different quantity): no line there
        pose_key = _pose_column(cols)
        # EMC scores the test set once, at the end; its per-iteration curve is on training images
        per_iteration = pose_key is None or np.isfinite(cols[pose_key]).sum() < 2
        if per_iteration and "train_pose_median_deg" in cols:
            pose_key, pose_label, style = "train_pose_median_deg", f"{r.label} (training images)", "--"
        else:
            pose_label, style = r.label, "-"
        if pose_key is not None and not np.isfinite(cols[pose_key]).any():
            pose_key = None  # known poses: nothing to plot
        for j, x in enumerate((step, None if wall is None else wall / 60)):
            if x is None:
                continue
            if "loss" in cols:
                ok = np.isfinite(cols["loss"])
                axes[0, j].plot(x[ok], cols["loss"][ok], color=color, label=r.label)
            if pose_key:
                ok = np.isfinite(cols[pose_key])
                axes[1, j].plot(x[ok], cols[pose_key][ok], style, color=color, marker="o", ms=3, label=pose_label)
    for j, xl in enumerate(("gradient steps (EMC: iterations)", "wall time (minutes)")):
        axes[0, j].set_ylabel("training loss")
        axes[0, j].set_yscale("log")
        axes[1, j].set_ylabel("median pose error (°)")
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel(xl)
        for i in range(2):
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(f"{recs[0].protein}: training (losses in each method's own units; pose errors on test images "
                 "unless marked)")
    _save(fig, out_dir, "training_curves")


def _pose_errors(r: Reconstruction, split: str) -> np.ndarray | None:
    """Per-image pose errors (degrees) of a run on a split, or None for ground-truth poses."""
    import h5py
    import torch

    from xrai.data.hdf5 import DiffractionDataset
    from xrai.evaluation.metrics import pose_errors_deg

    path = r.run_dir / f"poses_{split}.h5"
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        if f.attrs.get("source") == "ground_truth":
            return None
        pred = torch.from_numpy(f["rotations"][...]).double()
        index = f["index"][...]
    with DiffractionDataset(r.dataset_path(split)) as ds:
        true = ds.true_rotations(index)
    errors, _ = pose_errors_deg(pred, true)
    return errors.numpy()


def figure_pose_errors(recs: list[Reconstruction], out_dir: Path) -> None:
    """Histograms of per-image pose errors, train and test."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    bins = np.linspace(0, 180, 91)
    plotted = False
    for j, split in enumerate(("train", "test")):
        ax = axes[0, j]
        for r in recs:
            err = _pose_errors(r, split)
            if err is None:
                continue
            ax.hist(err, bins=bins, histtype="step", lw=1.5, label=f"{r.label} (median {np.median(err):.1f}°)")
            plotted = True
        for t in (2, 5, 10):
            ax.axvline(t, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("pose error (°)")
        ax.set_ylabel("images")
        ax.set_title(f"{split} set")
        ax.legend(fontsize=8)
    if not plotted:
        axes[0, 0].text(0.5, 0.5, "no estimated poses (known-pose runs only)", ha="center",
                        transform=axes[0, 0].transAxes)
    fig.suptitle(f"{recs[0].protein}: pose errors")
    _save(fig, out_dir, "pose_errors")


def figure_images(recs: list[Reconstruction], out_dir: Path, n_images: int = 4) -> None:
    """Test images beside the decoder output at the predicted pose, on a log scale (paper Figure 1)."""
    import h5py
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.colors import LogNorm

    from xrai.data.hdf5 import DiffractionDataset
    from xrai.volume import read_volume_h5, sample_volume

    ds = DiffractionDataset(recs[0].dataset_path("test"))
    batch = ds.read(0, n_images)
    images = torch.as_tensor(batch["images"]).double()
    q = ds.pixel_position_reciprocal.double()
    fig, axes = plt.subplots(2 * len(recs), n_images, figsize=(2.6 * n_images, 5.2 * len(recs)), squeeze=False)
    for i, r in enumerate(recs):
        volume, grid = read_volume_h5(r.run_dir / "intensity.h5", "intensity")
        with h5py.File(r.run_dir / "poses_test.h5", "r") as f:
            order = np.argsort(f["index"][...])
            rot = torch.from_numpy(f["rotations"][...][order][:n_images]).double()
        k = torch.einsum("nij,hwj->nhwi", rot, q)
        pred = sample_volume(volume.double(), k, grid)
        for j in range(n_images):
            img, p = images[j], pred[j]
            p = p * (img * p).sum() / (p * p).sum().clamp_min(1e-30)  # least-squares scale to the data
            vmax = float(img.max())
            norm = LogNorm(vmin=max(vmax * 1e-4, 1e-6), vmax=vmax)
            for row, data, name in ((2 * i, img, "input"), (2 * i + 1, p, "decoder")):
                ax = axes[row, j]
                ax.imshow(data.clamp_min(vmax * 1e-4).numpy(), cmap="inferno", norm=norm, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{textwrap.fill(r.label, 20)}\n{name}" if name == "input" else name, fontsize=8)
    fig.suptitle(f"{recs[0].protein}, train size {size_label(recs[0].size)}: test images (photons, log scale) "
                 "and decoder output at the predicted pose")
    _save(fig, out_dir, "images")


def photon_curve_points(recs: list[Reconstruction]) -> list[dict]:
    """One point per reconstruction: mean photons per training pattern (read from its dataset) beside its
    median test pose error (None for true poses), FSC resolution (Å) and mean amplitude shell correlation."""
    from xrai.data.hdf5 import DiffractionDataset

    points = []
    photons: dict[Path, float] = {}
    for r in recs:
        path = r.dataset_path("train")
        if path not in photons:
            with DiffractionDataset(path) as ds:
                photons[path] = ds.mean_photons_per_pattern()
        test = r.metrics.get("pose_error_test") or {}
        points.append({"protein": r.protein, "size": r.size, "method": r.method, "label": r.label,
                       "photons": photons[path], "median_deg": test.get("median_deg"),
                       "resolution_A": r.metrics.get("resolution_A"),
                       "asc_mean": (r.metrics.get("amplitude_correlation") or {}).get("mean")})
    return points


def figure_photon_curve(recs: list[Reconstruction], out_dir: Path) -> list[dict]:
    """Median test pose error, resolution and mean amplitude shell correlation against photons per pattern:
    one line per (method, training size) through the proteins (e.g. one structure simulated at several
    photon counts). Returns the points drawn."""
    import matplotlib.pyplot as plt

    points = photon_curve_points(recs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label in dict.fromkeys(p["label"] for p in points):
        line = sorted((p for p in points if p["label"] == label), key=lambda p: p["photons"])
        x = [p["photons"] for p in line]
        for ax, key in zip(axes, ("median_deg", "resolution_A", "asc_mean"), strict=True):
            xy = [(xi, p[key]) for xi, p in zip(x, line, strict=True) if p[key] is not None and np.isfinite(p[key])]
            if xy:
                ax.plot(*zip(*xy, strict=True), "o-", label=label)
    for p in points:
        axes[2].annotate(p["protein"], (p["photons"], p["asc_mean"] or 0.0), fontsize=6, alpha=0.6)
    for ax, ylabel in zip(axes, ("median test pose error (°)", "resolution (Å, FSC 0.5)",
                                 "mean amplitude shell correlation"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("mean photons per pattern")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    for t in (2, 5):
        axes[0].axhline(t, color="grey", ls=":", lw=1)
    fig.suptitle("Pose error and resolution against photons per pattern")
    _save(fig, out_dir, "photon_curve")
    return points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=["protein", "images", "photon-curve"], required=True,
                        help="protein: densities, FSC, training, pose errors; images: Figure 1 analogue; "
                             "photon-curve: errors against photons per pattern over proteins")
    parser.add_argument("--metrics", nargs="+", required=True,
                        help="metrics.json files of one protein (photon-curve: of every protein)")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="folder for the figures (PNG and PDF; created if missing)")


def run(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    recs = load_reconstructions(args.metrics)
    out = Path(args.out_dir)
    if args.kind == "protein":
        figure_densities(recs, out)
        figure_fsc(recs, out)
        figure_training_curves(recs, out)
        figure_pose_errors(recs, out)
    elif args.kind == "photon-curve":
        figure_photon_curve(recs, out)
    else:
        figure_images(recs, out)
    logger.info("figures written to %s", out)
