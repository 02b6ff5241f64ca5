"""``metrics.json`` for one reconstruction: aligned FSC and resolution, amplitude check, pose errors, times.

For the best run of a (protein, dataset size, method):

1. the phased density is aligned to the reference density over rotation, translation
   and hand (:func:`xrai.evaluation.align.align_volumes`);
2. the FSC between them gives the resolution at ``evaluation.fsc_cutoff`` in pixels
   (``box / shell``, Nyquist = 2 px, as the paper's Table 1) and in Å;
3. phase-free check: the run's amplitude volume, rotated by the same rotation, against
   ``sqrt`` of the true intensity, per shell inside the detector's corner ``|q| <= q_max``
   (:func:`xrai.evaluation.metrics.shell_correlation`);
4. the paper's pose error (appendix A.1, :func:`xrai.evaluation.metrics.pose_errors_deg`) of the
   encoder's poses on the train and test sets, each set aligned by its own global
   rotation; ``null`` for the known-pose bounds (their poses files hold the ground truth);
5. times: the training wall time from the run's ``metrics.csv`` and Snakemake's
   benchmark files (``<benchmarks>/train/{protein}/{size}/{method}/run{k}.tsv`` and
   ``<benchmarks>/phase/{protein}/{size}/{method}.tsv``, column ``s``) when present; the
   training time is the larger of the two (a resumed run's benchmark covers its last attempt only).

Usage::

    xrai evaluate --config config.yaml --protein 2CEX_A --size 2048 --method xrai \\
        --density results/phased/2CEX_A/2048/xrai/density.mrc \\
        --best results/reconstructions/2CEX_A/2048/xrai/best.json \\
        --reference results/reference/2CEX_A/density.mrc \\
        --reference-intensity results/reference/2CEX_A/intensity.h5 \\
        --train-data results/datasets/2CEX_A/train_2048.h5 --test-data results/datasets/2CEX_A/test_512.h5 \\
        --benchmarks results/benchmarks --out results/metrics/2CEX_A/2048/xrai/metrics.json
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path

import numpy as np
import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


#: the aligned phased density, written beside metrics.json
ALIGNED_DENSITY = "aligned_density.mrc"



def read_volume_and_reference(volume: str | Path, reference: str | Path) -> tuple[np.ndarray, np.ndarray, float]:
    """``(volume, reference, the reference's voxel size Å)`` from two MRC files sharing box and voxel size.

    >>> vol, ref, ref_voxel = read_volume_and_reference("density.mrc", "reference.mrc")  # doctest: +SKIP
    """
    from xrai.io import read_mrc

    vol, voxel = read_mrc(volume)
    ref, ref_voxel = read_mrc(reference)
    if vol.shape != ref.shape:
        raise XraiError(f"{volume}: shape {vol.shape} differs from the reference {reference} {ref.shape}")
    if not math.isclose(voxel, ref_voxel, rel_tol=1e-3):
        raise XraiError(f"{volume}: voxel size {voxel:.4f} Å differs from the reference's {ref_voxel:.4f} Å")
    return vol, ref, ref_voxel

def read_poses(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(rotations (N, 3, 3) float64, index (N,), source)`` from a ``poses_{train,test}.h5`` file.

    ``source`` is the file's ``source`` attribute (``encoder`` or ``ground_truth``; ``encoder`` if absent).
    """
    import h5py

    p = Path(path)
    if not p.exists():
        raise XraiError(f"{p}: file not found")
    try:
        with h5py.File(p, "r") as f:
            R = torch.from_numpy(np.asarray(f["rotations"][...], dtype=np.float64))
            index = torch.from_numpy(np.asarray(f["index"][...], dtype=np.int64))
            source = f.attrs.get("source", "encoder")
    except OSError as exc:
        raise XraiError(f"{p}: not a readable HDF5 file ({exc})") from None
    except KeyError as exc:
        raise XraiError(f"{p}: missing dataset {exc} (expected 'rotations' (N, 3, 3) and 'index' (N,))") from None
    if R.dim() != 3 or R.shape[1:] != (3, 3) or index.shape != (R.shape[0],):
        raise XraiError(f"{p}: 'rotations' must be (N, 3, 3) and 'index' (N,), got {tuple(R.shape)} and {tuple(index.shape)}")
    return R, index, source.decode() if isinstance(source, bytes) else str(source)


def true_rotations(dataset: str | Path, index: torch.Tensor) -> torch.Tensor:
    """Ground-truth rotations ``(N, 3, 3)`` of images ``index`` of a diffraction dataset (only orientations are read)."""
    from xrai.data.hdf5 import DiffractionDataset

    with DiffractionDataset(dataset) as ds:  # validates the file
        return ds.true_rotations(index)


def pose_error_summary(poses_path: str | Path, dataset: str | Path) -> dict | None:
    """The paper's pose error summary for one poses file, or ``None`` when the poses are the ground truth."""
    from xrai.evaluation.metrics import (
        aligned_folded_rotations,
        frobenius_sq_error,
        pose_errors_deg,
        summarize_pose_errors,
    )

    R_pred, index, source = read_poses(poses_path)
    if source == "ground_truth":
        return None
    R_true = true_rotations(dataset, index)
    err, A = pose_errors_deg(R_pred, R_true)
    fro = frobenius_sq_error(aligned_folded_rotations(R_pred, R_true, A), R_true)
    summary = summarize_pose_errors(err, fro)
    summary["global_rotation"] = A.tolist()
    return summary


def benchmark_seconds(path: str | Path) -> float | None:
    """Wall seconds (column ``s``, first row) of a Snakemake benchmark TSV, or ``None`` if absent."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        return float(rows[0]["s"])
    except (KeyError, IndexError, ValueError) as exc:
        logger.warning("%s: not a Snakemake benchmark file (%s); ignored", p, exc)
        return None


def training_wall_seconds(run_dir: str | Path) -> float | None:
    """``wall_s`` of the last row of a run's ``metrics.csv`` (the training loop's own clock), or ``None``."""
    p = Path(run_dir) / "metrics.csv"
    if not p.is_file():
        return None
    with open(p, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("wall_s")]
    return float(rows[-1]["wall_s"]) if rows else None


def _read_phase_time(density_path: Path) -> float | None:
    from xrai.io import read_json

    p = density_path.parent / "phasing.json"
    if not p.is_file():
        return None
    value = read_json(p).get("time_s")
    return float(value) if value is not None else None


def _finite_or_none(value: float) -> float | None:
    """JSON has no inf / NaN: an undefined number is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _sum_or_none(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


# --------------------------------------------------------------------------- evaluation


def amplitude_correlation(run_amplitude: torch.Tensor, true_amplitude: torch.Tensor, grid, rotation: np.ndarray,
                          inverted: bool) -> dict:
    """Shell correlation of the run's amplitudes, under the density's alignment, with the true ones (``|q| <= q_max``)."""
    from xrai.evaluation.align import invert_volume, transform_volume
    from xrai.evaluation.metrics import shell_correlation
    from xrai.xray.phasing import measured_mask

    src = invert_volume(run_amplitude.double()) if inverted else run_amplitude.double()
    rotated = transform_volume(src, torch.as_tensor(rotation, dtype=torch.float64))
    inside = measured_mask(grid)
    nan = torch.full_like(rotated, float("nan"))
    out = shell_correlation(torch.where(inside, rotated, nan), torch.where(inside, true_amplitude.double(), nan), grid)
    return {"shell": out["shell"], "freq_A_inv": out["freq_A_inv"], "corr": out["corr"],
            "mean": _finite_or_none(out["mean"])}


def evaluate(
    *,
    protein: str,
    size: str | int,
    method: str,
    density: str | Path,
    best: str | Path,
    reference: str | Path,
    reference_intensity: str | Path,
    train_data: str | Path,
    test_data: str | Path,
    benchmarks: str | Path | None,
    cfg: dict,
    aligned_out: str | Path | None = None,
) -> dict:
    """Compute the content of ``metrics.json`` (see the module docstring).

    ``aligned_out``: also write the phased density after the alignment (rotation, shift, hand),
    in the reference's frame, as MRC (the figures show it beside the reference).
    """
    from xrai.evaluation.align import align_volumes
    from xrai.evaluation.metrics import fsc, resolution_from_fsc
    from xrai.io import provenance, read_json, write_mrc
    from xrai.volume import read_volume_h5

    ev = cfg.get("evaluation", {})
    cutoff = float(ev.get("fsc_cutoff", 0.5))
    step = float(ev.get("align_angular_step_deg", 15))
    best_info = read_json(best)
    if "run_dir" not in best_info:
        raise XraiError(f"{best}: missing key 'run_dir'")
    run_dir = Path(best_info["run_dir"])

    rho, ref, ref_voxel = read_volume_and_reference(density, reference)
    box = ref.shape[0]

    al = align_volumes(rho, ref, angular_step_deg=step)
    if aligned_out is not None:
        write_mrc(aligned_out, np.asarray(al.aligned, dtype=np.float32), ref_voxel)
    curve = fsc(al.aligned, ref, ref_voxel)
    res_px, res_A = resolution_from_fsc(curve, box, ref_voxel, cutoff)
    logger.info("%s %s %s: resolution %.2f px = %.2f Å (FSC %.2f), alignment cc %.3f",
                protein, size, method, res_px, res_A, cutoff, al.cc)

    run_amp, run_grid = read_volume_h5(str(run_dir / "intensity.h5"), "amplitude")
    true_int, true_grid = read_volume_h5(str(reference_intensity), "intensity")
    if run_grid.size != true_grid.size or not math.isclose(run_grid.q_max, true_grid.q_max, rel_tol=1e-4):
        raise XraiError(f"{run_dir / 'intensity.h5'}: grid {run_grid} differs from the reference's {true_grid}")
    amp_corr = amplitude_correlation(run_amp, true_int.clamp_min(0).sqrt(), true_grid, al.rotation, al.inverted)

    pose = {}
    for split, data in (("train", train_data), ("test", test_data)):
        poses_path = run_dir / f"poses_{split}.h5"
        if not poses_path.exists():
            logger.warning("%s: no poses file; pose_error_%s is null", poses_path, split)
            pose[split] = None
        else:
            pose[split] = pose_error_summary(poses_path, data)
            if pose[split] is not None:
                logger.info("%s pose error: median %.2f deg, MSE %.1f deg^2, %.0f%% within 5 deg", split,
                            pose[split]["median_deg"], pose[split]["mse_deg2"], 100 * pose[split]["frac_within_5"])

    run_k = best_info.get("run")
    bench = Path(benchmarks) if benchmarks else None
    train_bench = (benchmark_seconds(bench / "train" / protein / str(size) / method / f"run{run_k}.tsv")
                   if bench is not None and run_k is not None else None)
    phase_bench = benchmark_seconds(bench / "phase" / protein / str(size) / f"{method}.tsv") if bench else None
    train_wall = training_wall_seconds(run_dir)
    phase_log = _read_phase_time(Path(density))
    # a resumed run's benchmark file covers only its last attempt, while the training log's clock
    # (metrics.csv wall_s) carries on across attempts: the larger one is the run's training time
    train_s = max((t for t in (train_bench, train_wall) if t is not None), default=None)
    phase_s = phase_bench if phase_bench is not None else phase_log

    return {
        "protein": protein,
        "size": int(size) if str(size).isdigit() else size,
        "method": method,
        "run": run_k,
        "run_dir": str(run_dir),
        "resolution_px": _finite_or_none(res_px),
        "resolution_A": _finite_or_none(res_A),
        "fsc_cutoff": cutoff,
        "voxel_size_A": ref_voxel,
        "box": box,
        "fsc": curve,
        "amplitude_correlation": amp_corr,
        "alignment": al.as_dict(),
        "pose_error_train": pose["train"],
        "pose_error_test": pose["test"],
        "time_s": {
            "train": train_s,
            "phase": phase_s,
            "total": _sum_or_none(train_s, phase_s),
            "train_log_wall": train_wall,
            "train_benchmark": train_bench,
            "phase_benchmark": phase_bench,
            "phase_log": phase_log,
        },
        "provenance": provenance() | {"inputs": {
            "density": str(density), "best": str(best), "reference": str(reference),
            "reference_intensity": str(reference_intensity), "train_data": str(train_data),
            "test_data": str(test_data), "benchmarks": str(benchmarks) if benchmarks else None}},
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai evaluate`` (the same as scripts/evaluate.py passes)."""
    parser.add_argument("--protein", required=True, help="protein label, e.g. 2CEX_A")
    parser.add_argument("--size", required=True, help="training set size (the dataset wildcard)")
    parser.add_argument("--method", required=True, help="reconstruction method (xrai, known-pose, emc, ...)")
    parser.add_argument("--density", required=True, metavar="MRC", help="phased density")
    parser.add_argument("--best", required=True, metavar="JSON", help="best.json of the reconstruction")
    parser.add_argument("--reference", required=True, metavar="MRC", help="reference density")
    parser.add_argument("--reference-intensity", required=True, metavar="H5", help="true intensity volume")
    parser.add_argument("--train-data", required=True, metavar="H5", help="training dataset (true orientations)")
    parser.add_argument("--test-data", required=True, metavar="H5", help="test dataset (true orientations)")
    parser.add_argument("--benchmarks", metavar="DIR", default=None, help="Snakemake benchmark folder (optional)")
    parser.add_argument("--out", required=True, metavar="JSON", help="metrics.json to write")


def run(args: argparse.Namespace) -> None:
    """``xrai evaluate``: write metrics.json, and beside it the aligned density (``aligned_density.mrc``),
    the resolved config and the provenance."""
    from xrai.config import load_config
    from xrai.io import write_json, write_run_metadata

    cfg = load_config(args.config)
    metrics = evaluate(
        protein=args.protein, size=args.size, method=args.method, density=args.density, best=args.best,
        reference=args.reference, reference_intensity=args.reference_intensity, train_data=args.train_data,
        test_data=args.test_data, benchmarks=args.benchmarks, cfg=cfg,
        aligned_out=Path(args.out).parent / ALIGNED_DENSITY,
    )
    write_json(args.out, metrics)
    write_run_metadata(Path(args.out).parent, cfg)
    logger.info("wrote %s", args.out)
