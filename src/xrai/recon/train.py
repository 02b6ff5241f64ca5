"""Training of the amortized reconstruction (``xrai train``) and best-run selection (``xrai select-best``).

One loop serves every method; what differs between methods is a :class:`Recipe`:

* ``xrai-paper``: the X-RAI paper (sections 2.1-2.2, appendix A.1): VGG encoder + FourierNet,
  symmetrized L2 loss (equation 4), Adam (amsgrad), lr ``train.lr``, batch ``train.batch_size``;
* ``known-pose``: the same decoder, with the encoder replaced by the true rotations
  (the upper bound on volume quality and the decoder's sanity check);
* ``xrai``: the project's default recipe, :class:`xrai.recon.abinitio.XraiRecipe` (docs/method.md):
  the same encoder-decoder idea, bootstrapped by a bounded pose search, converging on a CPU.

The loop trains a fixed number of steps ``train.steps`` whatever the dataset size (as many
passes as needed), streaming shuffled batches from :class:`xrai.data.hdf5.DiffractionDataset`
(memory stays flat). ``checkpoint.pt`` is written atomically every ``train.checkpoint_every``
steps and when SIGTERM / SIGINT arrives (Slurm's time limit, preemption, Ctrl-C): the job
then exits with status 128 + signal, and rerunning the same command resumes from the
checkpoint to the same final step, bit for bit on the CPU. The other outputs are written
once, atomically, at the end (docs/architecture.md, "Files").

Usage::

    xrai train --config config/test.yaml --method known-pose --run 0 \\
        --train-data results/datasets/2CEX_A/train_2048.h5 \\
        --test-data results/datasets/2CEX_A/test_512.h5 \\
        --out-dir results/reconstructions/2CEX_A/2048/known-pose/run0
    xrai select-best --config config/test.yaml --run-dirs run0 run1 --out best.json

or from Python::

    from xrai.config import load_config
    from xrai.recon.train import train
    train(load_config("config/test.yaml"), "xrai-paper", 0, "train.h5", "test.h5", "out/run0")
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrai.data.hdf5 import DiffractionDataset
from xrai.errors import XraiError
from xrai.imaging import ImagingModel
from xrai.recon.checkpoint import (  # noqa: F401  (re-exported: the loop's public names)
    CHECKPOINT_FORMAT,
    StopRequest,
    TrainingInterrupted,
    load_checkpoint,
    resumable_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from xrai.recon.cryoem_train import CRYOEM_METHODS, train_cryoem
from xrai.recon.loop import BatchStream, Progress  # noqa: F401  (BatchStream re-exported)
from xrai.recon.models import Autoencoder
from xrai.recon.recipe import Batch, Recipe
from xrai.recon.recipes import RECIPES, get_recipe
from xrai.xray.imaging import EwaldImaging

logger = logging.getLogger(__name__)

#: config keys a training run's result depends on (the rule train's params name the same ones)
TRAINING_CONFIG_KEYS = ("detector", "beam", "volume", "train")
#: what a checkpoint must share with the run that resumes it (else the run starts afresh)
RESUME_KEYS = ("method", "seed", "n_train", "batch_size", "config", "likelihood", "train_fingerprint",
               "test_fingerprint")
#: columns of metrics.csv; the test_* ones are filled every train.eval_every steps
METRIC_COLUMNS = (
    "step", "epoch", "loss", "lr", "images_per_s", "rss_mb", "wall_s",
    "test_loss", "test_pose_median_deg", "test_pose_mse_deg2", "test_pose_frac_within_5",
)


def imaging_model(cfg: dict, dataset: DiffractionDataset) -> ImagingModel:
    """The imaging model of ``dataset`` (its pixels and image formation), checked against the config."""
    return EwaldImaging.from_config(cfg, dataset.pixel_position_reciprocal)


# --------------------------------------------------------------------------- evaluation and outputs


def _batches_of(recipe: Recipe, dataset: Any, batch_size: int, device: torch.device,
                stop: int | None = None) -> Iterator[Batch]:
    """Sequential batches of ``dataset`` (the first ``stop`` images if given)."""
    n = len(dataset) if stop is None else min(stop, len(dataset))
    for start in range(0, n, batch_size):
        yield recipe.batch(dataset.read(start, min(start + batch_size, n)), device)


@torch.no_grad()
def evaluate_poses(recipe: Recipe, model: Autoencoder, batches: list[Batch]) -> dict:
    """Test loss and (for learned poses) the paper's pose error on the given batches, in eval mode."""
    from xrai.evaluation.metrics import pose_errors_deg, summarize_pose_errors

    was_training = model.training
    model.eval()
    try:
        outs = [recipe.infer(model, b) for b in batches]
    finally:
        model.train(was_training)
    # Gaussian: in normalised units (amplitude / scale)^2; Poisson: negative log-likelihood per pixel
    scale2 = float(model.decoder.scale) ** 2 if recipe.likelihood == "gaussian" else 1.0
    row: dict[str, Any] = {"test_loss": float(torch.cat([o.per_image for o in outs]).mean()) / scale2}
    if recipe.learns_poses:
        R_pred = torch.cat([o.rotations for o in outs]).double().cpu()
        R_true = torch.cat([b.rotations for b in batches]).double().cpu()
        summary = summarize_pose_errors(pose_errors_deg(R_pred, R_true)[0])
        row.update(test_pose_median_deg=summary["median_deg"], test_pose_mse_deg2=summary["mse_deg2"],
                   test_pose_frac_within_5=summary["frac_within_5"])
    return row


@torch.no_grad()
def write_poses(path: Path, recipe: Recipe, model: Autoencoder, dataset: Any, batch_size: int,
                device: torch.device, attrs: dict) -> None:
    """Predict (or, for known poses, copy) the pose of every image of ``dataset`` into ``path``, streaming.

    ``rotations`` (N, 3, 3) float32 are the poses of the images as recorded (already
    corrected by ``RZ_PI`` where the pi-rotated branch won), ``branch`` (N,) int8, ``index`` (N,).
    """
    import h5py

    from xrai.io import atomic_path

    n = len(dataset)
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            rot = f.create_dataset("rotations", (n, 3, 3), dtype="f4", chunks=(min(n, 4096), 3, 3))
            branch = f.create_dataset("branch", (n,), dtype="i1")
            index = f.create_dataset("index", (n,), dtype="i8")
            for b in _batches_of(recipe, dataset, batch_size, device):
                lo, hi = int(b.index[0]), int(b.index[-1]) + 1
                if recipe.learns_poses:
                    out = recipe.infer(model, b)
                    rot[lo:hi] = out.rotations.float().cpu().numpy()
                    branch[lo:hi] = out.branch.cpu().numpy()
                else:
                    rot[lo:hi] = b.rotations.float().cpu().numpy()
                    branch[lo:hi] = 0
                index[lo:hi] = b.index.numpy()
            f.attrs.update({k: str(v) if isinstance(v, Path) else v for k, v in attrs.items()})
            f.attrs["source"] = "encoder" if recipe.learns_poses else "ground_truth"
    finally:
        model.train(was_training)


@torch.no_grad()
def write_volume(out_dir: Path, model: Autoencoder, cfg: dict, device: torch.device, provenance: dict) -> None:
    """Sample the decoder on the config's reciprocal grid: ``intensity.h5`` and ``amplitude.mrc``.

    Voxels beyond the detector's corner ``|q| > q_max`` were never observed; they are set to 0.
    """
    from xrai.io import write_mrc
    from xrai.volume import write_volume_h5
    from xrai.xray.geometry import reciprocal_grid

    grid = reciprocal_grid(cfg)
    coords = grid.coordinates(dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        amplitude = model.decoder.sample_grid(coords).double()
    finally:
        model.train(was_training)
    amplitude = torch.where(coords.norm(dim=-1) <= grid.q_max * (1 + 1e-6), amplitude, torch.zeros_like(amplitude))
    amplitude = amplitude.cpu()
    write_volume_h5(str(out_dir / "intensity.h5"), grid, provenance, intensity=amplitude**2, amplitude=amplitude)
    write_mrc(out_dir / "amplitude.mrc", amplitude.numpy(), grid.voxel_size)


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """``metrics.csv`` with :data:`METRIC_COLUMNS` (blank where a value was not measured), atomically."""
    from xrai.io import write_csv

    write_csv(path, rows, METRIC_COLUMNS)


# --------------------------------------------------------------------------- the loop


def train(
    cfg: dict,
    method: str,
    run: int,
    train_data: str | os.PathLike,
    test_data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    protein: str | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> Path:
    """Train (or resume) one run and write every output into ``out_dir``; return ``out_dir``.

    ``protein``: a name of ``cfg['proteins']`` whose ``train`` overrides apply (before ``method``'s).

    ``step_callback(step)`` is called after every completed step (tests use it to send
    a signal half-way). On SIGTERM / SIGINT the checkpoint is written and
    :class:`TrainingInterrupted` (a ``SystemExit``) is raised.
    """
    from xrai.config import config_values, method_config, protein_config, step_config
    from xrai.io import provenance, write_run_metadata
    from xrai.utils import pick_device, resource_usage, seed_everything, set_cpu_threads

    cfg = protein_config(cfg, protein)
    if Path(train_data).suffix == ".star":  # a RELION particle set: the cryo-EM loop
        if "methods" in (cfg.get("train") or {}):
            cfg = method_config(cfg, method)
        return train_cryoem(cfg, method, run, train_data, test_data, out_dir)
    run_config = config_values(step_config(cfg, method=method), TRAINING_CONFIG_KEYS)
    cfg = method_config(cfg, method)
    tcfg = cfg["train"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(tcfg["seed"]) + int(run)
    total = int(tcfg["steps"])
    batch_size = int(tcfg["batch_size"])
    device = pick_device(tcfg.get("device", "auto"))
    threads = set_cpu_threads(int(tcfg.get("num_threads", 0))) if device.type == "cpu" else torch.get_num_threads()
    recipe = get_recipe(method, cfg)
    train_ds = DiffractionDataset(train_data)
    test_ds = DiffractionDataset(test_data)
    if train_ds.image_shape != test_ds.image_shape:
        raise XraiError(f"{test_data}: images {test_ds.image_shape} differ from the train set's {train_ds.image_shape}")
    logger.info("train %s run %d: seed %d, %d steps of %d images, %s (%d threads); train %s (%d images), test %s (%d)",
                method, run, seed, total, batch_size, device, threads, train_ds.path, len(train_ds),
                test_ds.path, len(test_ds))

    recipe.configure(train_ds)
    seed_everything(seed)
    model = recipe.build_model(imaging_model(cfg, train_ds)).to(device)
    optimizer = recipe.build_optimizer(model)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters (%s)", n_params,
                ", ".join(f"{name} {sum(p.numel() for p in m.parameters())}" for name, m in model.named_children()))

    ckpt_path = out / "checkpoint.pt"
    info = {"method": method, "run": int(run), "seed": seed, "train_data": str(Path(train_data).resolve()),
            "n_train": len(train_ds), "batch_size": batch_size, "config": run_config,
            "likelihood": recipe.likelihood,
            "train_fingerprint": train_ds.fingerprint(), "test_fingerprint": test_ds.fingerprint()}
    rows: list[dict] = []
    wall_before = 0.0
    window = None
    state = resumable_checkpoint(ckpt_path, info, RESUME_KEYS)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        recipe.load_state_dict(state["recipe"])
        set_rng_state(state["rng"])
        step, rows, wall_before = int(state["step"]), list(state["metrics"]), float(state["wall_s"])
        window = state["window"]
        stream = BatchStream(train_ds, batch_size, seed, **state["data"])
        logger.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, stream.epoch)
        if step > total:
            raise XraiError(f"{ckpt_path}: already at step {step} > train.steps = {total}")
    else:
        recipe.prepare(model, train_ds, device)
        step = 0
        stream = BatchStream(train_ds, batch_size, seed)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "info": info, "step": step, "total_steps": total,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "recipe": recipe.state_dict(),
            "rng": rng_state(), "data": stream.position(), "metrics": rows, "wall_s": wall,
            "window": {"losses": loss_window, "images": n_window}, "train_config": tcfg,
        })

    eval_batches = list(_batches_of(recipe, test_ds, batch_size, device, stop=int(tcfg["eval_images"])))
    log_every, eval_every = int(tcfg["log_every"]), int(tcfg["eval_every"])
    ckpt_every = int(tcfg["checkpoint_every"])
    stop = StopRequest()
    progress = Progress(total, step, log_every, device)
    model.train()
    t_start = time.perf_counter()
    wall = wall_before
    t_window, n_window, loss_window = time.perf_counter(), 0, []
    if window is not None:  # the log window in progress when the checkpoint was written
        n_window, loss_window = int(window["images"]), list(window["losses"])
    try:
        with stop.installed():
            while step < total and stop.signum is None:
                batch = recipe.batch(stream.next(), device)
                stats = recipe.training_step(model, optimizer, batch, step)
                step += 1
                n_window += len(batch)
                loss_window.append(stats["loss"])
                if not math.isfinite(stats["loss"]):
                    raise XraiError(f"training diverged at step {step} (loss {stats['loss']}); "
                                    "lower train.lr or train.grad_clip")
                row = None
                is_eval = step % eval_every == 0 or step == total
                if step % log_every == 0 or is_eval:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    dt = time.perf_counter() - t_window
                    row = {"step": step, "epoch": stream.epoch, "loss": float(np.mean(loss_window)),
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": n_window / max(dt, 1e-9),
                           "rss_mb": resource_usage(device)["rss_mb"], "_batch": batch_size,
                           "test_loss": "", "test_pose_median_deg": ""}
                    if is_eval:
                        row.update(evaluate_poses(recipe, model, eval_batches))
                    wall = wall_before + time.perf_counter() - t_start
                    row["wall_s"] = wall
                    rows.append({k: v for k, v in row.items() if not k.startswith("_")})
                    t_window, n_window, loss_window = time.perf_counter(), 0, []
                progress.update(step, row, stats["loss"])
                wall = wall_before + time.perf_counter() - t_start
                if stop.checkpoint_due(step, total, ckpt_every):
                    checkpoint()
                if step_callback is not None:
                    step_callback(step)
            if stop.signum is not None and step < total:
                stop.interrupt(checkpoint, step, f"at step {step}/{total}", ckpt_path)
    finally:
        progress.close()

    # ---- the recipe's passes after the steps (xrai: polish passes over the training set), then one more evaluation
    t_finish = time.perf_counter()
    if recipe.finish(model, train_ds, device, batch_size):
        wall += time.perf_counter() - t_finish
        row = {"step": step, "epoch": stream.epoch, "lr": optimizer.param_groups[0]["lr"],
               "rss_mb": resource_usage(device)["rss_mb"]}
        row.update(evaluate_poses(recipe, model, eval_batches))
        row["wall_s"] = wall
        rows.append(row)
        if "test_pose_median_deg" in row:
            logger.info("after %s's final passes: test pose median %.2f deg", method, row["test_pose_median_deg"])

    # ---- outputs, written once at the end (each atomically)
    logger.info("training done at step %d (%.1f min); writing outputs to %s", step, wall / 60, out)
    prov = provenance(None, seed) | {"method": method, "run": int(run), "steps": step, "train_data": info["train_data"],
                                      "test_data": str(Path(test_data).resolve()), "wall_s": wall,
                                      "likelihood": recipe.likelihood}
    attrs = {"method": method, "run": int(run), "step": step, "seed": seed}
    write_poses(out / "poses_test.h5", recipe, model, test_ds, batch_size, device,
                attrs | {"dataset": str(Path(test_data).resolve())})
    write_poses(out / "poses_train.h5", recipe, model, train_ds, batch_size, device,
                attrs | {"dataset": info["train_data"]})
    write_volume(out, model, cfg, device, prov)
    write_metrics_csv(out / "metrics.csv", rows)
    write_run_metadata(out, cfg, seed)
    from xrai.io import write_json

    write_json(out / "provenance.json", prov)
    return out


# --------------------------------------------------------------------------- select-best


#: select-best scores at most this many train images (evenly spaced): the median is then exact to ~0.1%
SELECT_MAX_IMAGES = 200_000


def train_pose_error(run_dir: str | os.PathLike, max_images: int = SELECT_MAX_IMAGES) -> dict:
    """Median (and MSE) train pose error of one run, from its ``poses_train.h5`` and the dataset it names.

    Datasets larger than ``max_images`` are scored on ``max_images`` evenly spaced images.
    """
    import h5py

    from xrai.evaluation.metrics import pose_errors_deg, summarize_pose_errors

    p = Path(run_dir) / "poses_train.h5"
    if not p.exists():
        raise XraiError(f"{p}: file not found (is {run_dir} a finished training run?)")
    try:
        with h5py.File(p, "r") as f:
            n = f["rotations"].shape[0]
            rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(np.int64))
            R_pred = torch.from_numpy(f["rotations"][rows] if len(rows) < n else f["rotations"][...]).double()
            index = torch.from_numpy(f["index"][rows] if len(rows) < n else f["index"][...]).long()
            dataset = f.attrs["dataset"]
    except (OSError, KeyError) as exc:
        raise XraiError(f"{p}: not a poses file with 'rotations', 'index' and attr 'dataset' ({exc})") from None
    with DiffractionDataset(dataset) as ds:  # validates the file (shape of 'orientations' included)
        R_true = ds.true_rotations(index)
    return summarize_pose_errors(pose_errors_deg(R_pred, R_true)[0])


def select_best(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Pick the run with the lowest median train pose error (appendix A.1); write ``best.json``."""
    import re

    from xrai.io import write_json

    if not run_dirs:
        raise XraiError("select-best: no --run-dirs given")
    candidates = []
    for d in run_dirs:
        summary = train_pose_error(d)
        m = re.search(r"run(\d+)$", Path(d).name)
        candidates.append({"run": int(m.group(1)) if m else None, "run_dir": str(d),
                           "train_pose_median_deg": summary["median_deg"], "train_pose_mse_deg2": summary["mse_deg2"]})
        logger.info("%s: train pose median %.3f deg", d, summary["median_deg"])
    best = min(candidates, key=lambda c: c["train_pose_median_deg"])
    result = {"run": best["run"], "run_dir": best["run_dir"], "train_pose_median_deg": best["train_pose_median_deg"],
              "candidates": candidates}
    write_json(out, result)
    logger.info("best: %s (%.3f deg)", best["run_dir"], best["train_pose_median_deg"])
    return result


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai train``."""
    parser.add_argument("--method", required=True, choices=sorted(set(RECIPES) | set(CRYOEM_METHODS)),
                        help="training recipe (on a .star particle set: the cryo-EM ones)")
    parser.add_argument("--run", type=int, default=0, help="run number k (seed = train.seed + k)")
    parser.add_argument("--train-data", required=True, metavar="H5", help="training dataset (xrai simulate)")
    parser.add_argument("--test-data", required=True, metavar="H5", help="test dataset (pose error, poses_test.h5)")
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="run directory (resumes from its checkpoint.pt)")
    parser.add_argument("--protein", metavar="NAME", help="apply this entry of the config's proteins' train overrides")


def run(args: argparse.Namespace) -> None:
    """``xrai train``."""
    from xrai.config import load_config

    train(load_config(args.config), args.method, args.run, args.train_data, args.test_data, args.out_dir,
          protein=args.protein)


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xrai select-best``."""
    parser.add_argument("--run-dirs", nargs="+", required=True, metavar="DIR", help="finished run directories")
    parser.add_argument("--out", required=True, metavar="JSON", help="best.json to write")


def run_select(args: argparse.Namespace) -> None:
    """``xrai select-best``."""
    select_best(args.run_dirs, args.out)
