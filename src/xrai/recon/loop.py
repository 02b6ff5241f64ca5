"""What every training loop shares: the endless shuffled batch stream and the progress display.

:class:`BatchStream` walks a dataset epoch after epoch (each shuffled with ``(seed, epoch)``) and
resumes from its :meth:`BatchStream.position` after a checkpoint; :class:`Progress` is a tqdm bar
on a terminal and plain log lines with resource use (``xrai.utils.resource_usage``) otherwise.

Usage::

    stream = BatchStream(dataset, 64, seed=0)
    progress = Progress(total=1000, start=0, log_every=50, device=torch.device("cpu"))
    raw = stream.next()                       # {"images": ..., "index": ..., ...}
    progress.update(step, row, loss)          # row: None, or {"loss", "lr", "images_per_s", "_batch", ...}
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


class Progress:
    """A tqdm bar on a terminal; plain log lines every ``log_every`` steps otherwise (Slurm logs)."""

    def __init__(self, total: int, start: int, log_every: int, device: torch.device) -> None:
        self.total, self.log_every, self.device = total, log_every, device
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, row: dict | None, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3e}", refresh=False)
            if row is not None and row.get("test_pose_median_deg") not in (None, ""):
                self.bar.write(f"step {step}: test pose median {row['test_pose_median_deg']:.2f} deg")
            return
        if row is not None:  # rows are made every log_every steps and at evaluations
            from xrai.utils import resource_usage

            use = resource_usage(self.device)
            eta = (self.total - step) / max(row["images_per_s"], 1e-9) * row.get("_batch", 1)
            extra = ""
            if row.get("test_pose_median_deg") not in (None, ""):
                extra = f" | test pose median {row['test_pose_median_deg']:.2f} deg"
            elif row.get("test_loss") not in (None, ""):
                extra = f" | test loss {row['test_loss']:.4g}"
            logger.info("step %d/%d (%.0f%%) loss %.4g lr %.2g | %.0f img/s | rss %.0f MB (peak %.0f)%s | eta %s%s",
                        step, self.total, 100 * step / self.total, row["loss"], row["lr"], row["images_per_s"],
                        use["rss_mb"], use["peak_rss_mb"],
                        f" cuda {use['cuda_mb']:.0f} MB" if "cuda_mb" in use else "", _fmt_time(eta), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"



class BatchStream:
    """Endless shuffled batches: epoch after epoch, each shuffled with ``(seed, epoch)``; resumable by position.

    ``drop_last``: every batch has ``batch_size`` images (an epoch's short last batch is dropped).
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, epoch: int = 0, batch_in_epoch: int = 0, *,
                 drop_last: bool = False) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.batch_in_epoch, self.drop_last = epoch, batch_in_epoch, drop_last
        self._it: Iterator | None = None

    def next(self) -> dict[str, torch.Tensor]:
        while True:
            if self._it is None:
                self._it = self.dataset.iter_batches(self.batch_size, shuffle=True, seed=self.seed,
                                                     epoch=self.epoch, skip=self.batch_in_epoch,
                                                     drop_last=self.drop_last)
            try:
                raw = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            self.batch_in_epoch += 1
            return raw

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
