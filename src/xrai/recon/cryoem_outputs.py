"""The pose files every cryo-EM training loop writes, and the passes over a particle set that fill them.

``poses_{train,test}.h5``: ``rotations`` (N, 3, 3) xrai poses, ``shifts_A`` (N, 2) RELION
origins (Å), ``branch`` (N,) int8 (1 where the in-plane pi-rotated image won a symmetrized
loss; 0 for methods without one), ``index`` (N,), attribute ``source`` (``ground_truth``,
``search``, ``encoder``) and the run's attributes (method, run, dataset).

Usage::

    from xrai.recon.cryoem_outputs import infer_all, write_poses
    R, t, idx, branch = infer_all(test_ds, recipe.infer)
    write_poses(out / "poses_test.h5", R, t, idx, "encoder", {"method": "cryoai"}, branch=branch)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: images per inference batch of :func:`infer_all`
INFER_BATCH = 256


def write_poses(path: Path, rotations: np.ndarray, shifts_A: np.ndarray, index: np.ndarray, source: str,
                attrs: dict, branch: np.ndarray | None = None) -> None:
    """Write a poses file atomically (this module's docstring); ``branch`` None: zeros (no pi branch)."""
    import h5py

    from xrai.io import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("rotations", data=rotations.astype(np.float32))
        f.create_dataset("shifts_A", data=shifts_A.astype(np.float32))
        f.create_dataset("branch", data=(np.zeros(len(index)) if branch is None else branch).astype(np.int8))
        f.create_dataset("index", data=index.astype(np.int64))
        f.attrs.update({k: str(v) for k, v in attrs.items()})
        f.attrs["source"] = source


def true_poses(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The STAR file's rotations, origins (zeros without any) and index, in file order."""
    R, t, idx = [], [], []
    for b in dataset.iter_batches(1024, shuffle=False):
        R.append(b["rotations"].numpy())
        t.append(b["shifts_A"].numpy() if "shifts_A" in b else np.zeros((len(b["index"]), 2)))
        idx.append(b["index"].numpy())
    return np.concatenate(R), np.concatenate(t), np.concatenate(idx)


def infer_all(dataset: Any, infer: Callable[[dict], tuple[torch.Tensor, ...]], log_every_s: float = 60.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``infer(batch) -> (R, origins[, branch])`` over a whole dataset in order: rotations, origins, index, branch.

    A progress line (images done, rate, time left) at most every ``log_every_s`` seconds.
    """
    R, t, idx, br = [], [], [], []
    t0 = t_log = time.perf_counter()
    done = 0
    for batch in dataset.iter_batches(INFER_BATCH, shuffle=False):
        out = infer(batch)
        done += len(batch["index"])
        now = time.perf_counter()
        if now - t_log >= log_every_s and done < len(dataset):
            rate = done / (now - t0)
            logger.info("poses of %s: %d / %d images (%.1f images/s, %.0f s left)", getattr(dataset, "path", "dataset"),
                        done, len(dataset), rate, (len(dataset) - done) / rate)
            t_log = now
        R.append(out[0].cpu().numpy())
        t.append(out[1].cpu().numpy())
        br.append(out[2].cpu().numpy() if len(out) > 2 else np.zeros(len(batch["index"]), dtype=np.int8))
        idx.append(batch["index"].numpy())
    return np.concatenate(R), np.concatenate(t), np.concatenate(idx), np.concatenate(br)
