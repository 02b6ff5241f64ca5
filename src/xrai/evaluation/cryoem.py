"""Evaluation of a cryo-EM reconstruction: ``metrics.json`` with FSC resolutions, rotation and shift errors.

No phasing: the reconstruction is a real-space potential (``volume.mrc``). It is aligned onto the
reference potential over rotation, translation and hand (:func:`xrai.evaluation.align.align_volumes`),
then correlated shell by shell (:func:`xrai.evaluation.metrics.fsc`); the resolution is given at
FSC 0.5 and 0.143, in pixels (Nyquist = 2 px, cryoAI's unit) and Å (cryoPoseNet's).

Poses (``poses_{train,test}.h5``, xrai poses ``R`` and RELION origins ``shifts_A``) are compared
with the STAR file's after the global rotation of the paper's metric
(:func:`xrai.evaluation.metrics.pose_errors_deg`, which folds the in-plane pi ambiguity; for
projections the mirror hand is that same fold, since ``M R M = Rz(pi) R Rz(pi)`` for
``M = diag(1, 1, -1)``). Reported: median, mean (cryoPoseNet's MAE), RMSE, cryoAI's median
squared Frobenius norm; the fraction of images on the minority pi branch (``pi_flip_fraction``);
shift errors in Å and cryoAI's mean squared error in pixels, after the global 3D translation
between the two frames is fitted (an image's origin moves by the in-plane part of
``R^T c`` when the volume moves by ``c``).

Usage::

    from xrai.evaluation.cryoem import evaluate_cryoem
    metrics = evaluate_cryoem(run_dir="results/.../run0", reference="results/reference/4AKE/potential.mrc",
                              train_data="train.star", test_data="test.star", method="xrai")
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

#: FSC thresholds reported (0.5: cryoPoseNet and cryoAI; 0.143: the gold-standard criterion)
FSC_CUTOFFS = (0.5, 0.143)
#: images within this pose error fit the global translation between the frames
SHIFT_FIT_MAX_DEG = 5.0


def read_cryoem_poses(path: str | Path) -> dict:
    """``rotations`` (N, 3, 3) float64, ``shifts_A`` (N, 2), ``index`` (N,), ``source`` from a poses file."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise XraiError(f"{p}: file not found")
    try:
        with h5py.File(p, "r") as f:
            out = {"rotations": torch.from_numpy(np.asarray(f["rotations"][...], dtype=np.float64)),
                   "index": np.asarray(f["index"][...], dtype=np.int64),
                   "shifts_A": (np.asarray(f["shifts_A"][...], dtype=np.float64) if "shifts_A" in f else None),
                   "source": str(f.attrs.get("source", "encoder"))}
    except OSError as exc:
        raise XraiError(f"{p}: not a readable HDF5 file ({exc})") from None
    except KeyError as exc:
        raise XraiError(f"{p}: missing dataset {exc} (expected 'rotations' (N, 3, 3) and 'index' (N,))") from None
    if out["rotations"].shape[1:] != (3, 3) or out["index"].shape != (out["rotations"].shape[0],):
        raise XraiError(f"{p}: 'rotations' must be (N, 3, 3) and 'index' (N,)")
    return out


def fit_frame_translation(d: np.ndarray, R_true: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Least-squares ``c`` (3,) in ``d_i = sign_i (R_i^T c)_xy`` for origin differences ``d`` (N, 2) in Å."""
    rows = sign[:, None, None] * np.transpose(R_true, (0, 2, 1))[:, :2, :]  # (N, 2, 3)
    c, *_ = np.linalg.lstsq(rows.reshape(-1, 3), d.reshape(-1), rcond=None)
    return c


def per_image_errors(poses: dict, R_true: torch.Tensor, shifts_true_A: np.ndarray | None) -> dict:
    """Per-image errors of one split: ``rotation_deg`` (N,), ``shift_A`` (N,) or None, and the fit behind them.

    Also ``A`` (the global rotation), ``flipped`` (N,) bool (on the pi branch) and
    ``frame_translation_A`` (3,) or None (see the module docstring). :func:`pose_metrics`
    summarises these; the report's histograms draw them.
    """
    from xrai.evaluation.metrics import pose_errors_deg
    from xrai.rotations import RZ_PI, angle_between

    R_pred = poses["rotations"]
    err, A = pose_errors_deg(R_pred, R_true)
    aligned = A @ R_pred
    flipped = angle_between(aligned @ RZ_PI.to(aligned), R_true) < angle_between(aligned, R_true)
    out = {"rotation_deg": err, "A": A, "flipped": flipped, "shift_A": None, "frame_translation_A": None}
    if poses["shifts_A"] is not None and shifts_true_A is not None:
        d = poses["shifts_A"] - shifts_true_A
        sign = np.where(flipped.numpy(), -1.0, 1.0)
        good = err.numpy() <= SHIFT_FIT_MAX_DEG
        use = good if good.sum() >= 10 else np.ones_like(good)
        c = fit_frame_translation(d[use], R_true.numpy()[use], sign[use])
        resid = d - sign[:, None] * np.einsum("nji,j->ni", R_true.numpy(), c)[:, :2]
        out["shift_A"], out["frame_translation_A"] = np.linalg.norm(resid, axis=1), c
    return out


def pose_metrics(poses: dict, R_true: torch.Tensor, shifts_true_A: np.ndarray | None, pixel_size_A: float) -> dict:
    """Rotation and shift errors of one split (see the module docstring)."""
    from xrai.evaluation.metrics import (
        aligned_folded_rotations,
        frobenius_sq_error,
        summarize_pose_errors,
    )

    e = per_image_errors(poses, R_true, shifts_true_A)
    err, A, flipped = e["rotation_deg"], e["A"], e["flipped"]
    folded = aligned_folded_rotations(poses["rotations"], R_true, A)
    out = summarize_pose_errors(err, frobenius_sq_error(folded, R_true))
    majority = bool(flipped.double().mean() > 0.5)
    out |= {"mae_deg": out["mean_deg"], "rmse_deg": math.sqrt(out["mse_deg2"]),
            "pi_flip_fraction": float((flipped != majority).double().mean()), "hand_flipped": majority,
            "global_rotation": A.tolist()}
    if e["shift_A"] is not None:
        s = e["shift_A"]
        out["shift_error"] = {"median_A": float(np.median(s)), "mean_A": float(s.mean()),
                              "mse_px2": float(np.mean((s / pixel_size_A) ** 2)),
                              "frame_translation_A": e["frame_translation_A"].tolist()}
    return out


def evaluate_cryoem(*, run_dir: str | Path, reference: str | Path, train_data: str | Path, test_data: str | Path,
                    method: str, protein: str = "", size: str | int = "", cfg: dict | None = None,
                    aligned_out: str | Path | None = None, train_seconds: float | None = None) -> dict:
    """The content of ``metrics.json`` for one cryo-EM reconstruction (``run_dir`` holds ``volume.mrc`` and poses)."""
    from xrai.data.star import ParticleDataset
    from xrai.evaluation.align import align_volumes
    from xrai.evaluation.evaluate import read_volume_and_reference
    from xrai.evaluation.metrics import fsc, resolution_from_fsc
    from xrai.io import provenance, read_json, write_mrc

    run = Path(run_dir)
    ev = (cfg or {}).get("evaluation", {}) or {}
    vol, ref, ref_voxel = read_volume_and_reference(run / "volume.mrc", reference)
    box = ref.shape[0]
    al = align_volumes(vol, ref, angular_step_deg=float(ev.get("align_angular_step_deg", 15)))
    if aligned_out is not None:
        write_mrc(aligned_out, np.asarray(al.aligned, dtype=np.float32), ref_voxel)
    curve = fsc(al.aligned, ref, ref_voxel)
    resolution = {}
    for cutoff in FSC_CUTOFFS:
        px, ang = resolution_from_fsc(curve, box, ref_voxel, cutoff)
        resolution[str(cutoff)] = {"px": px if math.isfinite(px) else None, "A": ang if math.isfinite(ang) else None}
    logger.info("%s %s %s: resolution %.2f A (FSC 0.5), %.2f A (0.143), alignment cc %.3f", protein, size, method,
                resolution["0.5"]["A"] or math.inf, resolution["0.143"]["A"] or math.inf, al.cc)

    pose = {}
    for split, data in (("train", train_data), ("test", test_data)):
        path = run / f"poses_{split}.h5"
        if not path.is_file():
            pose[split] = None
            continue
        poses = read_cryoem_poses(path)
        if poses["source"] == "ground_truth":
            pose[split] = None
            continue
        with ParticleDataset(data) as ds:
            R_true = ds.true_rotations(poses["index"])
            shifts = ds.true_shifts(poses["index"])
            pose[split] = pose_metrics(poses, R_true, shifts, ds.pixel_size_A)
        logger.info("%s pose error: median %.2f deg, MAE %.2f deg%s", split, pose[split]["median_deg"],
                    pose[split]["mae_deg"], f", shift median {pose[split]['shift_error']['median_A']:.2f} A"
                    if "shift_error" in pose[split] else "")
    amortized = {}
    for variant in ("encoder", "encoder_only"):  # the fast default's amortized path, when it wrote it
        path = run / f"poses_test_{variant}.h5"
        if path.is_file():
            poses = read_cryoem_poses(path)
            with ParticleDataset(test_data) as ds:
                amortized[variant] = pose_metrics(poses, ds.true_rotations(poses["index"]),
                                                  ds.true_shifts(poses["index"]), ds.pixel_size_A)
            logger.info("test pose error (%s): median %.2f deg", variant, amortized[variant]["median_deg"])
    timing = read_json(run / "timing.json") if (run / "timing.json").is_file() else {}
    train_s = train_seconds if train_seconds is not None else timing.get("wall_s")
    return {
        "modality": "cryoem", "protein": protein, "size": int(size) if str(size).isdigit() else size,
        "method": method, "run_dir": str(run),
        "resolution": resolution,
        "resolution_A": resolution["0.5"]["A"], "resolution_px": resolution["0.5"]["px"], "fsc_cutoff": 0.5,
        "voxel_size_A": ref_voxel, "box": box, "fsc": curve, "alignment": al.as_dict(),
        "pose_error_train": pose["train"], "pose_error_test": pose["test"],
        "pose_error_test_encoder": amortized.get("encoder"), "pose_error_test_encoder_only": amortized.get("encoder_only"),
        "time_s": {"train": train_s, "total": train_s},
        "provenance": provenance() | {"inputs": {"run_dir": str(run), "reference": str(reference),
                                                 "train_data": str(train_data), "test_data": str(test_data)}},
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai evaluate-cryoem``."""
    parser.add_argument("--protein", default="", help="protein label, e.g. 4AKE")
    parser.add_argument("--size", default="", help="training set size (the dataset wildcard)")
    parser.add_argument("--method", required=True, help="reconstruction method")
    parser.add_argument("--run-dir", required=True, help="the reconstruction's run folder (volume.mrc, poses)")
    parser.add_argument("--reference", required=True, metavar="MRC", help="reference potential")
    parser.add_argument("--train-data", required=True, metavar="STAR", help="training particle set (true poses)")
    parser.add_argument("--test-data", required=True, metavar="STAR", help="test particle set (true poses)")
    parser.add_argument("--out", required=True, metavar="JSON", help="metrics.json to write")


def run(args: argparse.Namespace) -> None:
    """``xrai evaluate-cryoem``: ``metrics.json`` and beside it ``aligned_volume.mrc``."""
    from xrai.config import load_config
    from xrai.io import write_json

    cfg = load_config(args.config)
    metrics = evaluate_cryoem(run_dir=args.run_dir, reference=args.reference, train_data=args.train_data,
                              test_data=args.test_data, method=args.method, protein=args.protein, size=args.size,
                              cfg=cfg, aligned_out=Path(args.out).parent / "aligned_volume.mrc")
    write_json(args.out, metrics)
    logger.info("wrote %s", args.out)
