"""The loop of cryo-EM methods trained by gradient steps (cryoAI, cryoPoseNet), and their base class.

A method is a :class:`CryoemGradientRecipe`: it builds ``self.model`` (an ``nn.Module`` holding
every learnable parameter and buffer) over the dataset's imaging model
(:class:`xrai.cryoem.imaging.CentralSliceImaging`), its optimizer, one gradient step, the
inference of pose and origin of an image, and the volume. :func:`train_cryoem_gradient` runs
it for a fixed number of steps (``train.<method>.steps``, else ``train.steps``) whatever the
dataset size, on shuffled batches streamed from ``ParticleDataset.iter_batches``
(:class:`xrai.recon.loop.BatchStream`), with progress lines and resource use.

``checkpoint.pt`` (model, optimizer, RNG, recipe state, stream position, metrics) is written
atomically every ``train.checkpoint_every`` steps and on SIGTERM / SIGINT (then the run exits
with 128 + signal); rerunning resumes from it when its info (method, seed, config, dataset
fingerprints) matches, else starts afresh with one log line (:mod:`xrai.recon.checkpoint`).

Outputs, as :func:`xrai.recon.cryoem_train.train_cryoem`'s: ``volume.mrc`` (the model's
potential ``[x, y, z]`` at the particles' pixel size), ``poses_train.h5`` / ``poses_test.h5``
(:mod:`xrai.recon.cryoem_outputs`, ``source = encoder``), ``metrics.csv`` (step, epoch, loss,
lr, images_per_s, rss_mb, wall_s), ``timing.json``, ``config.yaml``, ``provenance.json``.
No ``half_fsc.json``: there are no half sets to correlate (``xrai evaluate-cryoem`` does not
read it; it correlates against the reference).

Usage::

    from xrai.recon.cryoai import CryoAIRecipe
    from xrai.recon.cryoem_gradient import train_cryoem_gradient
    train_cryoem_gradient(cfg, "cryoai", CryoAIRecipe, 0, ParticleDataset("train.star"),
                          ParticleDataset("test.star"), "out/run0")
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
from xrai.recon.cryoem_outputs import infer_all, write_poses
from xrai.recon.loop import BatchStream, Progress

logger = logging.getLogger(__name__)

#: what a checkpoint must share with the run that resumes it (else the run starts afresh)
RESUME_KEYS = ("method", "seed", "n_train", "batch_size", "config", "train_fingerprint", "test_fingerprint")
#: train keys that do not change the result: a checkpoint stays valid when only they change
NEUTRAL_TRAIN_KEYS = ("methods", "num_threads", "checkpoint_every", "device")
#: columns of metrics.csv
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "rss_mb", "wall_s")


class CryoemGradientRecipe:
    """A cryo-EM method trained by gradient steps; subclass it and list it in ``cryoem_train.GRADIENT_METHODS``.

    The loop calls, in order: ``__init__`` (builds ``self.model``), :meth:`build_optimizer`,
    :meth:`prepare` (fresh start only; its effects must live in ``self.model``'s buffers or in
    :meth:`state_dict`), :meth:`training_step` per step, then :meth:`infer` over both sets
    and :meth:`volume`. Settings come from ``train.<name>`` (``-`` read as ``_``):
    ``steps`` (default ``train.steps``) and ``batch_size`` (default :attr:`default_batch_size`).
    """

    name: str = "base"
    #: False: the method is given the true shifts (cryoPoseNet); infer returns them
    estimates_shifts: bool = True
    #: batch size without ``train.<name>.batch_size``
    default_batch_size: int = 64

    def __init__(self, cfg: dict, imaging: CentralSliceImaging, seed: int) -> None:
        self.cfg = cfg
        self.imaging = imaging
        self.seed = int(seed)
        train = cfg.get("train") or {}
        self.settings: dict = dict(train.get(self.section_name()) or {})
        self.steps = int(self.settings.get("steps", train.get("steps", 1000)))
        self.batch_size = int(self.settings.get("batch_size", self.default_batch_size))
        self.model: nn.Module = nn.Module()

    @classmethod
    def section_name(cls) -> str:
        """The config section of this method: ``train.<section_name>``."""
        return cls.name.replace("-", "_")

    @classmethod
    def imaging_pad(cls, cfg: dict) -> int:
        """The Fourier padding of the imaging model the method trains on (``train.<name>.pad``, default 1)."""
        return int(((cfg.get("train") or {}).get(cls.section_name()) or {}).get("pad", 1))

    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def prepare(self, dataset: Any) -> None:
        """Data-dependent set-up before step 0 (fresh start only); effects live in ``self.model``'s buffers."""

    def training_step(self, batch: dict, optimizer: torch.optim.Optimizer, step: int) -> dict:
        """One gradient step on ``batch`` (``ParticleDataset`` keys); ``{"loss": float, ...}``."""
        raise NotImplementedError

    @torch.no_grad()
    def infer(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xrai poses ``R`` (B, 3, 3), RELION origins ``shifts_A`` (B, 2) in Å, ``branch`` (B,) int8."""
        raise NotImplementedError

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        """The real-space potential ``[x, y, z]``, ``N^3``, origin at ``N // 2`` (scale free)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Extra state beyond the model and the optimizer (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run_info(method: str, run: int, seed: int, train_ds: Any, test_ds: Any, batch_size: int, tcfg: dict) -> dict:
    """What a cryo-EM run's checkpoint records of the run that made it (compared on :data:`RESUME_KEYS`)."""
    return {"method": method, "run": int(run), "seed": seed, "train_data": str(Path(train_ds.path).resolve()),
            "n_train": len(train_ds), "batch_size": batch_size,
            "config": {k: v for k, v in tcfg.items() if k not in NEUTRAL_TRAIN_KEYS},
            "train_fingerprint": train_ds.fingerprint(), "test_fingerprint": test_ds.fingerprint()}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "index" else v for k, v in batch.items()}


def train_cryoem_gradient(cfg: dict, method: str, recipe_cls: type[CryoemGradientRecipe], run: int, train_ds: Any,
                          test_ds: Any, out_dir: str | Path, *,
                          step_callback: Callable[[int], None] | None = None) -> Path:
    """Train (or resume) one run of a gradient-trained cryo-EM method into ``out_dir``; return ``out_dir``.

    ``step_callback(step)`` is called after every completed step (tests send a signal half-way).
    On SIGTERM / SIGINT the checkpoint is written and :class:`TrainingInterrupted` is raised.
    """
    from xrai.io import provenance, write_csv, write_json, write_mrc, write_run_metadata
    from xrai.utils import pick_device, resource_usage, seed_everything, set_cpu_threads

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.get("train") or {}
    seed = int(tcfg.get("seed", 0)) + int(run)
    device = pick_device(str(tcfg.get("device", "auto")))
    threads = set_cpu_threads(int(tcfg.get("num_threads", 0))) if device.type == "cpu" else torch.get_num_threads()
    seed_everything(seed)
    imaging = CentralSliceImaging.for_dataset(train_ds, pad=recipe_cls.imaging_pad(cfg)).to(device)
    recipe = recipe_cls(cfg, imaging, seed)
    recipe.model.to(device)
    optimizer = recipe.build_optimizer()
    total, batch_size = recipe.steps, recipe.batch_size
    logger.info("train %s run %d on cryo-EM: seed %d, %d steps of %d images, %s (%d threads); train %s (%d images), "
                "test %s (%d); model %d parameters", method, run, seed, total, batch_size, device, threads,
                train_ds.path, len(train_ds), test_ds.path, len(test_ds),
                sum(p.numel() for p in recipe.model.parameters()))

    ckpt_path = out / "checkpoint.pt"
    info = run_info(method, run, seed, train_ds, test_ds, batch_size, tcfg)
    rows: list[dict] = []
    wall_before = 0.0
    state = resumable_checkpoint(ckpt_path, info, RESUME_KEYS)
    if state is not None:
        recipe.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        recipe.load_state_dict(state["recipe"])
        set_rng_state(state["rng"])
        step, rows, wall_before = int(state["step"]), list(state["metrics"]), float(state["wall_s"])
        stream = BatchStream(train_ds, batch_size, seed, **state["data"])
        n_window, loss_window = int(state["window"]["images"]), list(state["window"]["losses"])
        logger.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, stream.epoch)
        if step > total:
            raise XraiError(f"{ckpt_path}: already at step {step} > train.{recipe.section_name()}.steps = {total}")
    else:
        recipe.prepare(train_ds)
        step, n_window, loss_window = 0, 0, []
        stream = BatchStream(train_ds, batch_size, seed)
    wall = wall_before

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "info": info, "step": step, "total_steps": total,
            "model": recipe.model.state_dict(), "optimizer": optimizer.state_dict(), "recipe": recipe.state_dict(),
            "rng": rng_state(), "data": stream.position(), "metrics": rows, "wall_s": wall,
            "window": {"losses": loss_window, "images": n_window},
        })

    log_every, ckpt_every = int(tcfg.get("log_every", 50)), int(tcfg.get("checkpoint_every", 500))
    stop = StopRequest()
    progress = Progress(total, step, log_every, device)
    recipe.model.train()
    t_start = t_window = time.perf_counter()
    try:
        with stop.installed():
            while step < total and stop.signum is None:
                batch = _to_device(stream.next(), device)
                stats = recipe.training_step(batch, optimizer, step)
                step += 1
                n_window += len(batch["index"])
                loss_window.append(float(stats["loss"]))
                if not math.isfinite(stats["loss"]):
                    raise XraiError(f"training diverged at step {step} (loss {stats['loss']}); "
                                    f"lower the learning rates of train.{recipe.section_name()}")
                row = None
                if step % log_every == 0 or step == total:
                    dt = time.perf_counter() - t_window
                    wall = wall_before + time.perf_counter() - t_start
                    row = {"step": step, "epoch": stream.epoch, "loss": float(np.mean(loss_window)),
                           "lr": optimizer.param_groups[0]["lr"], "images_per_s": n_window / max(dt, 1e-9),
                           "rss_mb": resource_usage(device)["rss_mb"], "wall_s": wall}
                    rows.append(row)
                    row = row | {"_batch": batch_size}
                    t_window, n_window, loss_window = time.perf_counter(), 0, []
                progress.update(step, row, float(stats["loss"]))
                wall = wall_before + time.perf_counter() - t_start
                if stop.checkpoint_due(step, total, ckpt_every):
                    checkpoint()
                if step_callback is not None:
                    step_callback(step)
            if stop.signum is not None and step < total:
                stop.interrupt(checkpoint, step, f"at step {step}/{total}", ckpt_path)
    finally:
        progress.close()

    # ---- outputs, written once at the end (each atomically)
    logger.info("training done at step %d (%.1f min); writing outputs to %s", step, wall / 60, out)
    recipe.model.eval()
    t_out = time.perf_counter()
    attrs = {"method": method, "run": int(run), "step": step, "seed": seed}
    for name, ds in (("train", train_ds), ("test", test_ds)):
        R, t, idx, branch = infer_all(ds, lambda b: recipe.infer(_to_device(b, device)))
        write_poses(out / f"poses_{name}.h5", R, t, idx, "encoder", attrs | {"dataset": ds.path}, branch=branch)
    infer_s = time.perf_counter() - t_out
    write_mrc(out / "volume.mrc", recipe.volume().cpu().numpy().astype(np.float32), train_ds.pixel_size_A)
    total_s = wall + time.perf_counter() - t_out  # the method's time: training, inference and the volume
    write_csv(out / "metrics.csv", rows, METRIC_COLUMNS)
    write_run_metadata(out, cfg, seed)
    write_json(out / "timing.json", {"wall_s": total_s, "train_s": wall, "infer_s": infer_s, "steps": step,
                                     **provenance(cfg, seed)})
    logger.info("cryo-EM %s done: %d steps in %.1f s, inference %.1f s -> %s", method, step, wall, infer_s, out)
    return out
