"""Atomic file output and run provenance shared by every step.

Every output is written to a temporary name in the destination directory and
renamed when complete, so a killed job never leaves a half-written file that
looks finished. A write that fails for a reason the user can fix (disk full, quota,
read-only or forbidden folder, file size limit) becomes one line,
``cannot write <file> to <folder>: <cause>`` (:func:`write_failure`), wherever it happens.

Usage::

    from xrai.io import atomic_path, write_json
    with atomic_path("results/x.h5") as tmp:
        write_something(tmp)          # renamed to results/x.h5 only on success
    write_json("results/summary.json", {"atoms": 2362})
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrai import __version__
from xrai.errors import XraiError

logger = logging.getLogger(__name__)


#: errno of a failed write the user can fix -> what to tell them
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file size limit was reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied (the folder is not writable)",
    errno.EPERM: "operation not permitted",
}


#: Free space kept beyond the planned size when checking the disk.
DISK_MARGIN_BYTES = 256 * 2**20


def human_bytes(nbytes: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000.0
    return f"{nbytes:.1f} TB"


def check_disk_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse (XraiError with the numbers) when ``directory`` has less than ``needed`` bytes free (plus a margin)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d).free
    if needed + DISK_MARGIN_BYTES > free:
        raise XraiError(
            f"{what}: needs {human_bytes(needed)} ({needed} bytes) + {human_bytes(DISK_MARGIN_BYTES)} margin, "
            f"but only {human_bytes(free)} ({free} bytes) are free in {d}")


def _write_errno(exc: BaseException) -> int | None:
    """The errno of a write failure in ``exc`` or the exceptions it came from (torch wraps them)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if code is None and isinstance(e, (OSError, RuntimeError)):  # HDF5 puts it in the message
            m = re.search(r"errno = (\d+)", str(e))
            code = int(m.group(1)) if m else None
        if code in WRITE_ERRNOS:
            return code
        e = e.__cause__ or e.__context__
    return None


def write_failure(path: str | os.PathLike, exc: BaseException) -> XraiError | None:
    """``XraiError("cannot write <file> to <folder>: <cause>")`` if ``exc`` is a failed write of ``path``, else None.

    >>> write_failure("out/x.h5", OSError(errno.ENOSPC, "No space left on device"))
    XraiError('cannot write x.h5 to out: no space left on the device (disk full)')
    """
    code = _write_errno(exc)
    if code is None:
        return None
    p = Path(path)
    return XraiError(f"cannot write {p.name} to {p.parent}: {WRITE_ERRNOS[code]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file keeps the destination's suffix (so libraries that look at
    extensions behave), and is removed if the block raises.
    """
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{dest.name}.", suffix=(suffix if suffix is not None else dest.suffix) + ".tmp",
            dir=dest.parent,
        )
    except OSError as exc:
        raise (write_failure(dest, exc) or exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs get the usual permissions (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        failure = write_failure(dest, exc) if _concerns(exc, tmp, dest) else None
        if failure is not None:
            raise failure from None
        raise


def _concerns(exc: BaseException, *paths: Path) -> bool:
    """Whether ``exc`` is about one of ``paths`` (or names no file): a failed read elsewhere is no write failure."""
    name = getattr(exc, "filename", None)
    if not name or not isinstance(exc, OSError):
        return True
    return Path(name).resolve().parent in {p.resolve().parent for p in paths}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict], columns: Sequence[str]) -> None:
    """Write ``rows`` as CSV with ``columns`` (blank where a value is missing or None), atomically."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with a clear error naming the file if it is missing or malformed."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise XraiError(f"{p}: file not found") from None
    except json.JSONDecodeError as exc:
        raise XraiError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def provenance(config: dict | None = None, seed: int | None = None) -> dict:
    """Return what made an output: package version, python, torch, host, seed, resolved config."""
    import torch

    info: dict[str, Any] = {
        "xrai_version": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "argv": sys.argv,
    }
    if seed is not None:
        info["seed"] = int(seed)
    if config is not None:
        info["config"] = config
    return info


def write_run_metadata(out_dir: str | os.PathLike, config: dict, seed: int | None = None) -> None:
    """Save the resolved config (``config.yaml``) and provenance (``provenance.json``) in ``out_dir``."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    write_json(out / "provenance.json", provenance(None, seed))


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size: float) -> None:
    """Write a 3D array (indexed [x, y, z]) as MRC with ``voxel_size`` (Angstrom) in the header, atomically.

    MRC stores sections along z, so the array is transposed to (z, y, x) on disk
    and back by :func:`read_mrc`.
    """
    import mrcfile

    arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            mrc.voxel_size = float(voxel_size)


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read an MRC volume written by :func:`write_mrc`: ``(array [x, y, z], voxel_size in Angstrom)``."""
    import mrcfile

    p = Path(path)
    if not p.exists():
        raise XraiError(f"{p}: file not found")
    try:
        with mrcfile.open(p, permissive=False) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).transpose(2, 1, 0).copy()
            voxel = float(mrc.voxel_size.x)
    except ValueError as exc:
        raise XraiError(f"{p}: not a valid MRC file ({exc})") from None
    if data.ndim != 3:
        raise XraiError(f"{p}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise XraiError(f"{p}: volume contains NaN or infinite values")
    return data, voxel
