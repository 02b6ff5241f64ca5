"""Small helpers shared by the steps: device choice, CPU threads, seeds, resource use.

Usage::

    from xrai.utils import pick_device, seed_everything, resource_usage
    device = pick_device("auto")        # cuda if present, else cpu
    seed_everything(0)
    print(resource_usage())             # {'rss_mb': ..., 'peak_rss_mb': ..., 'cuda_mb': ...}
"""

from __future__ import annotations

import logging
import os
import random
import resource

import numpy as np
import torch

from xrai.errors import XraiError

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise XraiError("device 'cuda' requested but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device(name)


#: glibc mallopt parameters: keep freed memory instead of returning it to the kernel after every step
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_allocator() -> bool:
    """Stop glibc's malloc from unmapping and re-faulting large buffers at every step.

    The same as ``MALLOC_MMAP_THRESHOLD_=32MiB MALLOC_TRIM_THRESHOLD_=huge MALLOC_TOP_PAD_=1GiB``,
    set from inside the process: page faults took half of a CPU training step without it
    (shared/notes/convergence-findings.md). Returns False where there is no glibc (nothing changes).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, 2**30) == 1
    return bool(ok)


def set_cpu_threads(n: int = 0) -> int:
    """Use ``n`` intra-op threads. 0: ``XRAI_THREADS`` (set from a Snakemake rule's ``threads``),
    else the CPUs this process may use (e.g. Slurm's cpus-per-task). Also :func:`tune_allocator`."""
    tune_allocator()
    if n <= 0:
        n = int(os.environ.get("XRAI_THREADS", "0") or 0)
    if n <= 0:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, because ru_maxrss of a child forked from a
    large parent (Snakemake) reports the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resource_usage(device: torch.device | None = None) -> dict[str, float]:
    """Current and peak resident memory of this process (MB), and CUDA memory when on a GPU."""
    import psutil

    out = {
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if device is not None and device.type == "cuda":
        out["cuda_mb"] = torch.cuda.memory_allocated(device) / 2**20
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
