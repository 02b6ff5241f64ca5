"""The cryo-EM training loop (``xrai train`` on a RELION particle set): known-pose bound or the fast default.

It picks the cryo-EM imaging model (:class:`xrai.cryoem.imaging.CentralSliceImaging`) for the
dataset and runs a recipe of :mod:`xrai.recon.cryoem`, streaming the particles. Outputs in the
run folder: ``volume.mrc`` (the Wiener-filtered potential, the particles' pixel size),
``half_fsc.json``, ``poses_train.h5`` / ``poses_test.h5`` (``rotations`` xrai poses, ``shifts_A``
RELION origins, ``branch``, ``index``; ``source`` ground_truth or search), ``metrics.csv``
(steps, resolution limit, time per ingredient, memory), ``timing.json``, ``config.yaml``, ``provenance.json``,
and for the fast default ``checkpoint.pt`` (the training steps' state: a killed run resumes from it
when its config and data are the ones it was made with, else it starts afresh with one log line;
the inference-only settings, :attr:`CryoemSearchSettings.POST_TRAINING`, are not compared, so a
change of them reruns only the inference and the final merge).

Usage::

    from xrai.recon.cryoem_train import train_cryoem
    train_cryoem(cfg, "xrai", 0, "train.star", "test.star", "out/run0")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrai.cryoem.imaging import CentralSliceImaging
from xrai.errors import XraiError
from xrai.recon.checkpoint import (
    CHECKPOINT_FORMAT,
    StopRequest,
    resumable_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from xrai.recon.cryoai import CryoAIRecipe
from xrai.recon.cryoem import CryoemSearchRecipe, CryoemSearchSettings
from xrai.recon.cryoem_gradient import (
    RESUME_KEYS,
    CryoemGradientRecipe,
    run_info,
    train_cryoem_gradient,
)
from xrai.recon.cryoem_outputs import infer_all, true_poses, write_poses
from xrai.recon.cryoposenet import CryoPoseNetRecipe
from xrai.recon.loop import BatchStream
from xrai.recon.wiener import WienerMerge
from xrai.utils import resource_usage

logger = logging.getLogger(__name__)

#: cryo-EM methods trained by gradient steps (:mod:`xrai.recon.cryoem_gradient`): name -> recipe class
GRADIENT_METHODS: dict[str, type[CryoemGradientRecipe]] = {CryoAIRecipe.name: CryoAIRecipe,
                                                           CryoPoseNetRecipe.name: CryoPoseNetRecipe}
#: method names that run on cryo-EM sets -> what runs
CRYOEM_METHODS = {"xrai": "xrai", "xrai-cryoem": "xrai", "known-pose": "cryoem-known-pose",
                  "xrai-known-pose": "cryoem-known-pose", "cryoem-known-pose": "cryoem-known-pose",
                  **{name: name for name in GRADIENT_METHODS}}


def known_pose_volume(dataset: Any, imaging: CentralSliceImaging, batch_size: int = 256,
                      poses: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, WienerMerge]:
    """Wiener reconstruction ``[x, y, z]`` from the dataset's true (or the given) poses and origins, streamed."""
    if poses is None and not dataset.has_poses:
        raise XraiError(f"{dataset.path}: the particles have no poses; the known-pose bound needs them")
    merge = WienerMerge(imaging.reconstruction_grid())
    for b in dataset.iter_batches(batch_size, shuffle=False):
        if poses is not None:
            idx = b["index"].numpy()
            b = b | {"rotations": torch.from_numpy(poses[0][idx]), "shifts_A": torch.from_numpy(poses[1][idx])}
        merge.insert(imaging, imaging.spectrum(b["images"]), b["rotations"], b)
    return merge.real_volume(imaging.size), merge


def _search_steps(recipe: CryoemSearchRecipe, info: dict, train_ds: Any, seed: int, ckpt_path: Path,
                  checkpoint_every: int, step_callback: Callable[[int], None] | None) -> tuple[list[dict], float]:
    """The fast default's training steps, resumed from ``ckpt_path`` where its ``info`` matches this run's.

    The checkpoint (recipe state, RNG, stream position, metrics rows) is written atomically every
    ``checkpoint_every`` steps, after the last one, and on SIGTERM / SIGINT, which then raise
    :class:`TrainingInterrupted` (exit status 128 + signal). Returns the metrics rows and the
    training's wall seconds (of every attempt).
    """
    s = recipe.s
    state = resumable_checkpoint(ckpt_path, info, RESUME_KEYS)
    if state is not None:
        recipe.load_state_dict(state["recipe"])
        set_rng_state(state["rng"])
        step, rows, wall_before = int(state["step"]), list(state["metrics"]), float(state["wall_s"])
        stream = BatchStream(train_ds, s.batch_size, seed, drop_last=True, **state["data"])
        logger.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, stream.epoch)
        if step > s.steps:
            raise XraiError(f"{ckpt_path}: already at step {step} > train.xrai_cryoem.steps = {s.steps}")
    else:
        recipe.initialise(train_ds)
        step, rows, wall_before = 0, [], 0.0
        stream = BatchStream(train_ds, s.batch_size, seed, drop_last=True)
    t_start = time.perf_counter()
    wall = wall_before

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {"format": CHECKPOINT_FORMAT, "info": info, "step": step, "total_steps": s.steps,
                                    "recipe": recipe.state_dict(), "rng": rng_state(), "data": stream.position(),
                                    "metrics": rows, "wall_s": wall})

    stop = StopRequest()
    with stop.installed():
        while step < s.steps and stop.signum is None:
            info_step = recipe.training_step(stream.next(), step)
            step += 1
            wall = wall_before + time.perf_counter() - t_start
            if step % 50 == 0 or step == s.steps:
                rows.append({"step": step, "epoch": stream.epoch, "wall_s": wall, **info_step,
                             "rss_mb": resource_usage()["rss_mb"], **{f"{k}_s": v for k, v in recipe.timings.items()}})
                logger.info("step %d/%d: resolution limit %.1f A, %.0f s, rss %.0f MB (%s)", step, s.steps,
                            info_step["q_limit_A"], wall, rows[-1]["rss_mb"],
                            ", ".join(f"{k} {v:.0f}" for k, v in recipe.timings.items()))
            if stop.checkpoint_due(step, s.steps, checkpoint_every):
                checkpoint()
            if step_callback is not None:
                step_callback(step)
        if stop.signum is not None and step < s.steps:
            stop.interrupt(checkpoint, step, f"at step {step}/{s.steps}", ckpt_path)
    return rows, wall


def _cryoem_method(method: str) -> str:
    if method not in CRYOEM_METHODS:
        raise XraiError(f"method '{method}' does not run on cryo-EM particle sets; expected one of {sorted(CRYOEM_METHODS)}")
    return CRYOEM_METHODS[method]


def train_cryoem(cfg: dict, method: str, run: int, train_data: str | Path, test_data: str | Path,
                 out_dir: str | Path, *, step_callback: Callable[[int], None] | None = None) -> Path:
    """Reconstruct from a RELION particle set into ``out_dir``: ``volume.mrc``, ``half_fsc.json``,
    ``poses_train.h5`` / ``poses_test.h5``, ``metrics.csv`` (timings), ``config.yaml``, ``provenance.json``.

    Gradient-trained methods (:data:`GRADIENT_METHODS`) run in
    :func:`xrai.recon.cryoem_gradient.train_cryoem_gradient`. ``step_callback(step)`` is called after
    every training step (tests send a signal half-way); on SIGTERM / SIGINT the checkpoint is
    written and :class:`xrai.recon.checkpoint.TrainingInterrupted` is raised.
    """
    from xrai.data.star import ParticleDataset
    from xrai.io import provenance, write_csv, write_json, write_mrc, write_run_metadata
    from xrai.utils import seed_everything, set_cpu_threads

    kind = _cryoem_method(method)
    if kind in GRADIENT_METHODS:
        train_ds, test_ds = ParticleDataset(train_data), ParticleDataset(test_data)
        if train_ds.image_shape != test_ds.image_shape:
            raise XraiError(f"{test_data}: images {test_ds.image_shape} differ from the train set's "
                            f"{train_ds.image_shape}")
        return train_cryoem_gradient(cfg, method, GRADIENT_METHODS[kind], run, train_ds, test_ds, out_dir,
                                     step_callback=step_callback)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.get("train") or {}
    seed = int(tcfg.get("seed", 0)) + int(run)
    threads = set_cpu_threads(int(tcfg.get("num_threads", 0)))
    seed_everything(seed)
    train_ds, test_ds = ParticleDataset(train_data), ParticleDataset(test_data)
    if train_ds.image_shape != test_ds.image_shape:
        raise XraiError(f"{test_data}: images {test_ds.image_shape} differ from the train set's {train_ds.image_shape}")
    logger.info("train %s (%s) run %d on cryo-EM: %s (%d images), test %s (%d), %d threads", method, kind, run,
                train_ds.path, len(train_ds), test_ds.path, len(test_ds), threads)
    t0 = time.perf_counter()
    attrs = {"method": method, "run": run}
    rows = []
    if kind == "cryoem-known-pose":
        pad = int((tcfg.get("xrai_cryoem") or {}).get("final_pad", 2))
        volume, merge = known_pose_volume(train_ds, CentralSliceImaging.for_dataset(train_ds, pad=pad))
        for name, ds in (("train", train_ds), ("test", test_ds)):
            R, t, idx = true_poses(ds)
            write_poses(out / f"poses_{name}.h5", R, t, idx, "ground_truth", attrs | {"dataset": ds.path})
    else:
        recipe = CryoemSearchRecipe(cfg, CentralSliceImaging.for_dataset(train_ds, pad=1), seed=seed)
        s = recipe.s
        steps_cfg = dict(tcfg)  # the checkpoint of the steps stays valid across a change of inference settings
        if tcfg.get("xrai_cryoem"):
            steps_cfg["xrai_cryoem"] = {k: v for k, v in tcfg["xrai_cryoem"].items()
                                        if k not in CryoemSearchSettings.POST_TRAINING}
        rows, train_s = _search_steps(recipe, run_info(method, run, seed, train_ds, test_ds, s.batch_size, steps_cfg),
                                      train_ds, seed, out / "checkpoint.pt", int(tcfg.get("checkpoint_every", 500)),
                                      step_callback)
        t0 = time.perf_counter() - train_s  # the method's time counts the steps of every attempt once
        final_imaging = CentralSliceImaging.for_dataset(train_ds, pad=s.final_pad)
        for p in range(s.polish_passes):  # full-data EM: every training image at its pose, merged at once
            R, t, idx, _ = infer_all(train_ds, recipe.infer)
            order = np.argsort(idx)
            recipe.use_merge(known_pose_volume(train_ds, final_imaging, poses=(R[order], t[order]))[1])
            logger.info("polish pass %d/%d: half-set FSC 0.5 at %.2f A, %.0f s", p + 1, s.polish_passes,
                        1.0 / recipe.q_fsc, time.perf_counter() - t0)
        polish_s = time.perf_counter() - t0 - train_s
        poses = {}
        for name, ds in (("train", train_ds), ("test", test_ds)):
            R, t, idx, _ = infer_all(ds, recipe.infer)
            poses[name] = (R, t, idx)
            write_poses(out / f"poses_{name}.h5", R, t, idx, s.infer, attrs | {"dataset": ds.path})
        infer_s = time.perf_counter() - t0 - train_s - polish_s
        encoder_s = None
        if s.encoder:  # the amortized path on the held-out images, measured beside the poses above
            t1 = time.perf_counter()
            write_poses(out / "poses_test_encoder.h5", *infer_all(test_ds, recipe.encoder_poses)[:3], "encoder",
                         attrs | {"dataset": test_ds.path})
            encoder_s = time.perf_counter() - t1
            write_poses(out / "poses_test_encoder_only.h5",
                        *infer_all(test_ds, lambda b: recipe.encoder_poses(b, refine=False))[:3], "encoder",
                        attrs | {"dataset": test_ds.path})
            t0 += time.perf_counter() - t1  # not part of this method's time
        order = np.argsort(poses["train"][2])
        final = (poses["train"][0][order], poses["train"][1][order])
        volume, merge = known_pose_volume(train_ds, final_imaging, poses=final)
        rows.append({"step": s.steps, "train_s": train_s, "polish_s": polish_s, "infer_s": infer_s,
                     "infer_encoder_test_s": encoder_s,
                     "final_merge_s": time.perf_counter() - t0 - train_s - polish_s - infer_s})
    wall = time.perf_counter() - t0
    write_mrc(out / "volume.mrc", volume.numpy(), train_ds.pixel_size_A)
    curve = merge.half_fsc()
    write_json(out / "half_fsc.json", {"shell": list(range(len(curve))), "fsc": curve.tolist(),
                                       "box": merge.grid.size, "pixel_size_A": train_ds.pixel_size_A})
    columns = sorted({k for r in rows for k in r} | {"step", "wall_s"}, key=lambda c: (c != "step", c))
    rows.append({"step": rows[-1]["step"] if rows else 0, "wall_s": wall})
    write_csv(out / "metrics.csv", rows, columns)
    write_run_metadata(out, cfg, seed)
    write_json(out / "timing.json", {"wall_s": wall, **provenance(cfg, seed)})
    logger.info("cryo-EM %s done in %.1f s -> %s", kind, wall, out)
    return out
