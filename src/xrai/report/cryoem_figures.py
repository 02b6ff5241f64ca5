"""Figures of the report's cryo-EM section: particle images, FSC curves, pose errors, density slices.

Per protein, from the cryo-EM ``metrics.json`` files (``xrai evaluate-cryoem``) and the pipeline's
fixed layout (``docs/architecture.md``):

* ``cryoem_images``: a few test particles, clean (the reference potential projected at the STAR
  file's pose and shift, :class:`xrai.cryoem.imaging.CentralSliceImaging`), with that particle's
  CTF, and as recorded (noisy); only those particles are computed, nothing is re-simulated;
* ``cryoem_fsc``: each method's FSC against the reference, lines at 0.5 and 0.143, x in Å⁻¹;
* ``cryoem_pose_errors``: per-image rotation and shift errors on train and test
  (:func:`xrai.evaluation.cryoem.per_image_errors`, the numbers behind metrics.json);
* ``cryoem_densities``: central slices and sums along x, y, z of each ``aligned_volume.mrc``
  beside the reference potential.

Each is written as PNG (the HTML report) and PDF (a paper), atomically (``figures._save``).

Usage::

    xrai figures-cryoem --metrics results/metrics/4AKE/*/*/metrics.json --out-dir results/figures/4AKE
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

import numpy as np
import torch

from xrai.config import size_label
from xrai.errors import XraiError
from xrai.io import read_json, read_mrc
from xrai.report.cryoem_table import LABELS
from xrai.report.figures import Reconstruction, _save, _views

logger = logging.getLogger(__name__)

#: figure names (``<name>.png`` and ``<name>.pdf`` in the output folder)
FIGURES = ("cryoem_images", "cryoem_fsc", "cryoem_pose_errors", "cryoem_densities")
#: the aligned reconstruction ``xrai evaluate-cryoem`` writes beside metrics.json
ALIGNED_VOLUME = "aligned_volume.mrc"


class CryoemReconstruction(Reconstruction):
    """One cryo-EM (protein, size, method): its run folder from metrics.json, its particle sets (STAR)."""

    @property
    def label(self) -> str:
        return f"{LABELS.get(self.method, self.method)}, {size_label(self.size)}"

    @property
    def run_dir(self) -> Path:
        # metrics.json names the run folder relative to the pipeline's working directory (results/..)
        run = Path(self.metrics["run_dir"])
        return run if run.is_absolute() else self.root.parent / run

    @property
    def density_path(self) -> Path:
        aligned = self.metrics_path.parent / ALIGNED_VOLUME
        if not aligned.is_file():
            raise XraiError(f"{aligned}: file not found (written by xrai evaluate-cryoem beside {self.metrics_path.name})")
        return aligned

    @property
    def reference_path(self) -> Path:
        return self.root / "reference" / self.protein / "potential.mrc"

    def dataset_path(self, split: str) -> Path:
        d = self.root / "datasets" / self.protein
        if split == "train":
            return d / f"train_{self.size}.star"
        tests = sorted(d.glob("test_*.star"))
        if not tests:
            raise XraiError(f"{d}: no test particle set (test_*.star) found")
        return tests[0]


def load_cryoem_reconstructions(paths: list[str | Path]) -> list[CryoemReconstruction]:
    """Cryo-EM metrics.json files of one protein, sorted by size then method (the tables' order)."""
    if not paths:
        raise XraiError("figures-cryoem: no metrics.json given (--metrics)")
    recs = [CryoemReconstruction(Path(p), read_json(p)) for p in paths]
    for r in recs:
        if r.metrics.get("modality") != "cryoem":
            raise XraiError(f"{r.metrics_path}: not a cryo-EM metrics.json (modality {r.metrics.get('modality')!r}, "
                            "expected 'cryoem')")
    proteins = sorted({r.protein for r in recs})
    if len(proteins) != 1:
        raise XraiError(f"figures-cryoem: metrics.json files of one protein expected, got {proteins}")
    order = list(LABELS)
    recs.sort(key=lambda r: (r.size, order.index(r.method) if r.method in order else 99))
    return recs


# --------------------------------------------------------------------------- particle images


def particle_images(potential_xyz: np.ndarray, batch: dict, pixel_size_A: float, pad: int = 2
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, with_ctf)`` images ``(B, N, N)`` in V·Å of the potential at a batch's true poses and shifts.

    ``batch`` is a ``ParticleDataset.read`` batch (``rotations``, ``shifts_A`` and the CTF keys);
    ``clean`` has the shift only, ``with_ctf`` the shift and the particle's CTF (the simulator's
    noise-free image, up to interpolation).
    """
    from xrai.cryoem.imaging import CentralSliceImaging
    from xrai.fourier import fourier_volume, sample_fourier

    n = potential_xyz.shape[0]
    imaging = CentralSliceImaging(n, pixel_size_A, pad)
    spectrum, grid = fourier_volume(torch.from_numpy(np.asarray(potential_xyz)), pixel_size_A, pad)
    values = sample_fourier(spectrum, imaging.coordinates(batch["rotations"].double()), grid)
    shifts_only = {"shifts_A": batch["shifts_A"]} if "shifts_A" in batch else None
    # projections are voxel sums: times the pixel size for V·Å, the simulator's unit
    clean = imaging.to_images(imaging.form_image(values, shifts_only)) * pixel_size_A
    with_ctf = imaging.to_images(imaging.form_image(values, batch)) * pixel_size_A
    return clean, with_ctf


def figure_images(recs: list[CryoemReconstruction], out_dir: Path, n_images: int = 4) -> None:
    """Test particles: clean projection, with its CTF, as recorded (one column per particle)."""
    import matplotlib.pyplot as plt

    from xrai.data.star import ParticleDataset

    ref, voxel = read_mrc(recs[0].reference_path)
    with ParticleDataset(recs[0].dataset_path("test")) as ds:
        if not ds.has_poses:
            raise XraiError(f"{ds.path}: the particles have no poses: the clean images need the true ones")
        if abs(ds.pixel_size_A - voxel) > 1e-3 * voxel or ds.image_shape != ref.shape[:2]:
            raise XraiError(f"{recs[0].reference_path}: {ref.shape[0]}³ at {voxel:.4g} Å does not match the "
                            f"particles of {ds.path} ({ds.image_shape} px at {ds.pixel_size_A:.4g} Å)")
        batch = ds.read(0, min(n_images, len(ds)))
        pixel = ds.pixel_size_A
    clean, ctf = particle_images(ref, batch, pixel)
    recorded = batch["images"]
    n = len(recorded)
    rows = [("clean (true pose, shift)", clean), ("with CTF", ctf), ("recorded", recorded)]
    half = ref.shape[0] * pixel / 2
    fig, axes = plt.subplots(3, n, figsize=(2.4 * n, 7.4), squeeze=False)
    for j in range(n):
        defocus = float(batch["defocus_u_A"][j] + batch["defocus_v_A"][j]) / 2e4 if "defocus_u_A" in batch else None
        for i, (name, imgs) in enumerate(rows):
            ax = axes[i, j]
            img = imgs[j].numpy()
            lim = float(np.abs(img).max()) or 1.0
            # images are [row y, column x] with the origin at the bottom: the STAR convention's x right, y up
            ax.imshow(img, origin="lower", cmap="gray", vmin=-lim if i else img.min(), vmax=lim,
                      extent=(-half, half, -half, half))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
            if i == 0:
                ax.set_title(f"particle {int(batch['index'][j])}" + (f"\ndefocus {defocus:.2f} µm" if defocus else ""),
                             fontsize=8)
    fig.suptitle(f"{recs[0].protein}: test particles ({ref.shape[0]} px, {pixel:.3g} Å/px)")
    _save(fig, out_dir, "cryoem_images")


# --------------------------------------------------------------------------- FSC


def figure_fsc(recs: list[CryoemReconstruction], out_dir: Path) -> None:
    """FSC of every method against the reference potential, with the 0.5 and 0.143 thresholds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in recs:
        f, res = r.metrics["fsc"], r.metrics["resolution"]
        at = [res[c]["A"] for c in ("0.5", "0.143")]
        extra = " (" + " / ".join("–" if a is None else f"{a:.2f} Å" for a in at) + ")"
        ax.plot(f["freq_A_inv"], f["fsc"], label=r.label + extra)
    for cutoff, style in ((0.5, "--"), (0.143, ":")):
        ax.axhline(cutoff, color="k", ls=style, lw=1, label=f"FSC = {cutoff}")
    ax.axvline(0.5 / float(recs[0].metrics["voxel_size_A"]), color="grey", lw=0.8)  # Nyquist
    ax.set_xlabel("spatial frequency (Å⁻¹)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="resolution at 0.5 / 0.143", title_fontsize=7)
    ax.set_title(f"{recs[0].protein}: FSC against the reference potential")
    _save(fig, out_dir, "cryoem_fsc")


# --------------------------------------------------------------------------- pose errors


def split_errors(r: CryoemReconstruction, split: str) -> dict | None:
    """Per-image errors (:func:`~xrai.evaluation.cryoem.per_image_errors`) of a run on a split; None for true poses."""
    from xrai.data.star import ParticleDataset
    from xrai.evaluation.cryoem import per_image_errors, read_cryoem_poses

    path = r.run_dir / f"poses_{split}.h5"
    if not path.is_file():
        raise XraiError(f"{path}: file not found (written by the training of {r.metrics_path})")
    poses = read_cryoem_poses(path)
    if poses["source"] == "ground_truth":
        return None
    with ParticleDataset(r.dataset_path(split)) as ds:
        return per_image_errors(poses, ds.true_rotations(poses["index"]), ds.true_shifts(poses["index"]))


def figure_pose_errors(recs: list[CryoemReconstruction], out_dir: Path) -> None:
    """Histograms of rotation (top) and shift (bottom) errors per image, train and test."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    rot_bins = np.linspace(0, 180, 91)
    plotted = False
    for j, split in enumerate(("train", "test")):
        for r in recs:
            e = split_errors(r, split)
            if e is None:
                continue
            rot = e["rotation_deg"].numpy()
            axes[0, j].hist(rot, bins=rot_bins, histtype="step", lw=1.5,
                            label=f"{r.label} (median {np.median(rot):.2f}°)")
            if e["shift_A"] is not None:
                s = e["shift_A"]
                axes[1, j].hist(s, bins=np.linspace(0, max(float(s.max()), 1.0), 60), histtype="step", lw=1.5,
                                label=f"{r.label} (median {np.median(s):.2f} Å)")
            plotted = True
        for t in (2, 5, 10):
            axes[0, j].axvline(t, color="grey", ls=":", lw=1)
        axes[0, j].set_xlabel("rotation error (°)")
        axes[1, j].set_xlabel("shift error (Å)")
        axes[0, j].set_title(f"{split} set")
        for i in range(2):
            axes[i, j].set_yscale("log")
            axes[i, j].set_ylabel("particles")
            if axes[i, j].get_legend_handles_labels()[0]:
                axes[i, j].legend(fontsize=8)
    if not plotted:
        axes[0, 0].text(0.5, 0.5, "no estimated poses (known-pose runs only)", ha="center",
                        transform=axes[0, 0].transAxes)
    fig.suptitle(f"{recs[0].protein}: pose errors (after the global rotation and frame translation)")
    _save(fig, out_dir, "cryoem_pose_errors")


# --------------------------------------------------------------------------- densities


def figure_densities(recs: list[CryoemReconstruction], out_dir: Path) -> None:
    """Reference potential beside each aligned reconstruction: central slices and sums along x, y, z."""
    import matplotlib.pyplot as plt

    ref, voxel = read_mrc(recs[0].reference_path)
    rows = [("reference potential", ref)] + [(r.label, read_mrc(r.density_path)[0]) for r in recs]
    titles = ["slice x = 0 (y–z)", "slice y = 0 (x–z)", "slice z = 0 (x–y)",
              "sum along x (y–z)", "sum along y (x–z)", "sum along z (x–y)"]
    fig, axes = plt.subplots(len(rows), 6, figsize=(15, 2.6 * len(rows)), squeeze=False)
    half = ref.shape[0] * voxel / 2
    for i, (label, vol) in enumerate(rows):
        # the same [row, column] layout as figures._views: slices there, sums here
        views = _views(vol)[:3] + [vol.sum(axis=a).T for a in range(3)]
        for j, img in enumerate(views):
            ax = axes[i, j]
            lo, hi = np.percentile(img, [0.5, 99.9])  # per panel: each method's own scale
            ax.imshow(img, origin="lower", cmap="magma", vmin=lo, vmax=max(hi, lo + 1e-12),
                      extent=(-half, half, -half, half))
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{textwrap.fill(label, 24)}\nÅ", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{recs[0].protein}: potentials (reconstructions aligned to the reference)")
    _save(fig, out_dir, "cryoem_densities")


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai figures-cryoem``."""
    parser.add_argument("--metrics", nargs="+", required=True, help="cryo-EM metrics.json files of one protein")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="folder for the figures (cryoem_*.png and .pdf; created if missing)")
    parser.add_argument("--n-images", type=int, default=4, help="test particles in the image montage")


def run(args: argparse.Namespace) -> None:
    """``xrai figures-cryoem``: the four cryo-EM figures of one protein."""
    import matplotlib

    matplotlib.use("Agg")
    if args.n_images < 1:
        raise XraiError(f"--n-images: must be >= 1, got {args.n_images}")
    recs = load_cryoem_reconstructions(args.metrics)
    out = Path(args.out_dir)
    figure_images(recs, out, args.n_images)
    figure_fsc(recs, out)
    figure_pose_errors(recs, out)
    figure_densities(recs, out)
    logger.info("cryo-EM figures of %s written to %s", recs[0].protein, out)
