"""Checkpoints and stop signals shared by every training loop (X-ray, EMC, cryo-EM).

A checkpoint is one ``torch.save`` dict written atomically (``format``, ``info`` naming what it
was made with, the model, optimizer, RNG and recipe states). A run resumes from it only when
its ``info`` matches (:func:`resumable_checkpoint`); otherwise it starts afresh with one log
line saying why. :class:`StopRequest` turns SIGTERM / SIGINT (Slurm's time limit, Ctrl-C) into
a checkpoint at the end of the current step and exit status 128 + signal
(:class:`TrainingInterrupted`).

Usage::

    from xrai.recon.checkpoint import StopRequest, resumable_checkpoint, save_checkpoint
    state = resumable_checkpoint(out / "checkpoint.pt", info, ("config", "seed"))
    with StopRequest().installed() as stop:
        while step < total and stop.signum is None:
            ...                               # one step
            if stop.checkpoint_due(step, total, every):
                checkpoint()
        if stop.signum is not None and step < total:
            stop.interrupt(checkpoint, step, f"at step {step}/{total}", path)
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- signals


class StopRequest:
    """Signal handler that records SIGTERM / SIGINT; the loop checkpoints at the end of the step and exits.

    A second SIGINT (Ctrl-C twice) interrupts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: will checkpoint after the current step and exit", signal.Signals(signum).name)

    def checkpoint_due(self, step: int, total: int, every: int) -> bool:
        """After ``step``: a checkpoint every ``every`` steps, after the last one and when a stop was requested."""
        return step % every == 0 or step == total or self.signum is not None

    def interrupt(self, checkpoint: Callable[[], None], step: int, where: str, path: Path) -> NoReturn:
        """Write the checkpoint, say so in one line and raise :class:`TrainingInterrupted`.

        ``where``: the loop's position, e.g. ``"at step 5/8"`` or ``"after iteration 3"``.
        """
        checkpoint()
        logger.warning("stopped by %s %s; checkpoint written to %s; rerun to resume",
                       signal.Signals(self.signum).name, where, path)
        raise TrainingInterrupted(self.signum, step)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install for SIGTERM and SIGINT (main thread only), restore the previous handlers afterwards."""
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint is written on SIGTERM / SIGINT; exit status 128 + signal number."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """The RNG states of torch (CPU and CUDA), numpy and python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (a kill during the write leaves the previous one intact).

    Through a Python file, so a full disk surfaces as its OSError (one line from atomic_path).
    """
    from xrai.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def checkpoint_mismatch(saved: dict, current: dict, keys: tuple[str, ...]) -> str | None:
    """Why a checkpoint's ``info`` (``saved``) does not fit this run's (``current``), or None if it does.

    >>> checkpoint_mismatch({"config": {"train": {"steps": 300}}}, {"config": {"train": {"steps": 400}}}, ("config",))
    'written with other config values (train.steps 300 -> 400)'
    """
    for key in keys:
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if old is None:
            return f"written by an older xrai that did not record '{key}'"
        if key == "config":
            diffs = _differences(old, new)
            more = f", and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            return f"written with other config values ({', '.join(diffs[:3])}{more})"
        if key.endswith("_fingerprint"):
            return f"written for another {key.removesuffix('_fingerprint')} dataset (its contents differ)"
        return f"written for {key}={old!r}, this run has {new!r}"
    return None


def resumable_checkpoint(path: Path, info: dict, keys: tuple[str, ...]) -> dict | None:
    """The checkpoint at ``path`` if this run (``info``) may resume from it; None (with one log line
    saying why) when it was written for another config or dataset, or there is none."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    why = checkpoint_mismatch(state["info"], info, keys)
    if why is not None:
        logger.warning("%s: %s; starting afresh", path, why)
        return None
    return state


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (our own file: full unpickling)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / foreign file
        raise XraiError(f"{path}: not a readable xrai checkpoint ({exc}); delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise XraiError(f"{path}: not an xrai checkpoint of format {CHECKPOINT_FORMAT}; delete it to start afresh")
    return state
