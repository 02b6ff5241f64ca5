"""``ParticleDataset``: the reader of RELION particle sets (a STAR file + MRC image stacks).

It reads what RELION, cryoSPARC (via pyem), cryoDRGN and :mod:`xrai.cryoem` write:

* RELION 3.1+: an ``optics`` table (``rlnOpticsGroup``, ``rlnVoltage``, ``rlnSphericalAberration``,
  ``rlnAmplitudeContrast``, ``rlnImagePixelSize``, ``rlnImageSize``; several groups allowed) and a
  ``particles`` table whose ``rlnOpticsGroup`` points into it; shifts ``rlnOriginX/YAngst`` in Å;
* RELION 3.0 and earlier: one table, voltage / Cs / amplitude contrast per particle, the pixel size
  from ``rlnImagePixelSize`` or ``1e4 * rlnDetectorPixelSize (µm) / rlnMagnification``, shifts
  ``rlnOriginX/Y`` in pixels (optics groups are made from the distinct per-particle values);
* ``rlnImageName`` = ``i@stack.mrcs`` (``i`` 1-based; ``.mrc`` too; a name without ``@`` is
  image 1), absolute or relative to the STAR file's folder, falling back to the current folder;
* particles without poses (ab initio) or without CTF parameters.

Conventions applied (RELION's, ``docs/architecture.md``): ``rotations`` are xrai poses
``R = A^T`` with ``A = relion_euler_to_matrix(rot, tilt, psi)`` (the image is the projection
of ``V(A^T r)``); ``shifts_A = (rlnOriginXAngst, rlnOriginYAngst)``: the particle sits at the
image centre ``(W // 2, H // 2)`` minus the origin; defocus in Å, positive underfocus, U along
``rlnDefocusAngle`` (degrees from the x axis).

Everything but the pixels is checked when the STAR file is opened (each stack's header, the
indices against the stacks' lengths); stacks are memory-mapped lazily in each process (so the
dataset can be handed to worker processes) and NaN / inf images are refused at read time.
The order of a pass comes from :class:`xrai.data.batching.BlockDataset` (a block is
``block_rows`` consecutive particles).

Usage::

    from xrai.data.star import ParticleDataset
    with ParticleDataset("results/datasets/4AKE/train.star") as ds:
        print(len(ds), ds.image_shape, ds.pixel_size_A, ds.has_poses, ds.has_ctf)
        batch = ds.read(0, 8)           # images (8, H, W), rotations (8, 3, 3), shifts_A (8, 2), ...
        for batch in ds.iter_batches(64, shuffle=True, seed=0, epoch=3):
            ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from xrai.data.batching import BlockDataset

logger = logging.getLogger(__name__)

POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: MRC modes RELION reads (int8, int16, float32, uint16) and float16 (mode 12).
MRC_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
#: Target bytes of one block (consecutive particles read together).
BLOCK_BYTES = 2**20
#: Bytes a page fault may map beyond the page asked for (fault-around, page-cache folios up to 2 MiB).
FAULT_AROUND_BYTES = 2 * 2**20
#: Pixel sizes of optics groups that differ by less than this (relative) are the same.
PIXEL_SIZE_RTOL = 1e-4


class ParticleDataset(BlockDataset):
    """Read one RELION particle set (STAR + MRC stacks), in order or shuffled, streamed.

    Attributes set at open: ``path``, ``n_images``, ``image_shape`` ``(H, W)``, ``pixel_size_A``,
    ``optics`` (pandas table, one row per optics group: ``rlnOpticsGroup``, ``rlnVoltage``,
    ``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnImagePixelSize``, ``rlnImageSize``),
    ``relion_format`` (``"3.1"`` with an optics table, else ``"3.0"``), ``has_poses``,
    ``has_shifts``, ``has_ctf``, ``mask`` (all True: every pixel is used), ``stack_paths``,
    ``image_dtype``, ``block_rows``.
    """

    def __init__(self, path: str | os.PathLike, *, shuffle_buffer_mb: float = 256.0,
                 block_rows: int | None = None, max_open_stacks: int = 64):
        self.path = Path(path)
        self.shuffle_buffer_mb = float(shuffle_buffer_mb)
        self.max_open_stacks = max(1, int(max_open_stacks))
        self._stacks: OrderedDict[int, object] = OrderedDict()
        self._pid: int | None = None
        self._parse()
        rows = block_rows if block_rows is not None else BLOCK_BYTES // self.image_bytes
        self.block_rows = max(1, min(int(rows), self.n_images))

    # ---------------------------------------------------------------- opening
    def _parse(self) -> None:
        import pandas as pd
        import starfile

        if not self.path.is_file():
            raise self._err("STAR file not found")
        try:
            blocks = starfile.read(self.path, always_dict=True)
        except Exception as exc:  # starfile raises whatever its parser hits
            raise self._err(f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
        tables = {name: t for name, t in blocks.items() if isinstance(t, pd.DataFrame)}
        particles = next((t for name, t in tables.items() if name == "particles" and "rlnImageName" in t), None)
        if particles is None:
            particles = next((t for t in tables.values() if "rlnImageName" in t), None)
        if particles is None:
            found = {name or "data_": list(t.columns)[:8] for name, t in tables.items()}
            raise self._err(f"no particle table: expected a loop with rlnImageName (tables found: {found or 'none'})")
        if len(particles) == 0:
            raise self._err("the particle table is empty")
        optics = tables.get("optics")
        self.relion_format = "3.1" if optics is not None else "3.0"
        self.n_images = len(particles)

        group, self.optics = (self._optics_31(particles, optics) if optics is not None
                              else self._optics_30(particles))
        self._group = group.astype(np.int32)
        self._images_from_names(particles["rlnImageName"])
        self._check_optics_agree()
        pixel = self.optics["rlnImagePixelSize"].to_numpy(np.float64)[self._group]

        self._read_poses(particles, pixel)
        self._read_ctf(particles, "optics table" if optics is not None else "particle table")
        self.mask = torch.ones(self.image_shape, dtype=torch.bool)
        logger.info("%s: RELION %s particle set, %d images of %s px at %.4g A/px in %d stack(s), %d optics group(s)",
                    self.path, self.relion_format, self.n_images, self.image_shape, self.pixel_size_A,
                    len(self.stack_paths), len(self.optics))

    def _read_poses(self, particles, pixel: np.ndarray) -> None:
        """Euler angles (all three or none) and origins (Å; RELION 3.0's pixels times the pixel size)."""
        self.has_poses = all(lab in particles for lab in POSE_LABELS)
        if not self.has_poses and any(lab in particles for lab in POSE_LABELS):
            logger.info("%s: only %s of %s present: read as particles without poses", self.path,
                        [lab for lab in POSE_LABELS if lab in particles], list(POSE_LABELS))
        self._angles = (np.stack([self._numeric(particles, lab) for lab in POSE_LABELS], axis=1)
                        if self.has_poses else None)
        self._shifts_A = self._pair(particles, "rlnOriginXAngst", "rlnOriginYAngst")
        if self._shifts_A is None:
            in_pixels = self._pair(particles, "rlnOriginX", "rlnOriginY")
            self._shifts_A = None if in_pixels is None else in_pixels * pixel[:, None]
        self.has_shifts = self._shifts_A is not None

    def _read_ctf(self, particles, where: str) -> None:
        """Defocus U, V, angle per particle (V = U, angle 0 where absent); voltage, Cs, Q0 must be in the optics."""
        self.has_ctf = "rlnDefocusU" in particles
        self._defocus = None
        if not self.has_ctf:
            return
        missing = [lab for lab in CTF_OPTICS_LABELS if self.optics[lab].isna().any()]
        if missing:
            raise self._err(f"particles have rlnDefocusU but the {where} lacks {missing}, needed for the CTF")
        u = self._numeric(particles, "rlnDefocusU")
        v = self._numeric(particles, "rlnDefocusV") if "rlnDefocusV" in particles else u
        angle = self._numeric(particles, "rlnDefocusAngle") if "rlnDefocusAngle" in particles else np.zeros_like(u)
        self._defocus = np.stack([u, v, angle], axis=1).astype(np.float32)
        if "rlnPhaseShift" in particles and np.any(self._numeric(particles, "rlnPhaseShift") != 0):
            logger.warning("%s: rlnPhaseShift (phase plate) is not read; the CTF is computed without it", self.path)

    def _pair(self, table, x: str, y: str) -> np.ndarray | None:
        """Columns ``x`` and ``y`` as (n, 2), None if neither is there; one without the other is an error."""
        if x not in table and y not in table:
            return None
        if x not in table or y not in table:
            raise self._err(f"the particle table has {x if x in table else y} but not {y if x in table else x}")
        return np.stack([self._numeric(table, x), self._numeric(table, y)], axis=1)

    def _numeric(self, table, label: str) -> np.ndarray:
        """Column ``label`` as float64; a non-numeric or missing value is an error naming it."""
        import pandas as pd

        values = pd.to_numeric(table[label], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise self._err(f"column {label}: expected a finite number for every row, got {table[label].iloc[k]!r} in row {k + 1}")
        return values

    def _pixel_size(self, table, where: str) -> np.ndarray | None:
        """Pixel size (Å) per row: rlnImagePixelSize, else 1e4 * rlnDetectorPixelSize (µm) / rlnMagnification."""
        if "rlnImagePixelSize" in table:
            size = self._numeric(table, "rlnImagePixelSize")
        elif "rlnDetectorPixelSize" in table and "rlnMagnification" in table:
            size = 1e4 * self._numeric(table, "rlnDetectorPixelSize") / self._numeric(table, "rlnMagnification")
        else:
            return None
        if not (size > 0).all():
            raise self._err(f"the {where} gives a pixel size <= 0 ({float(size.min())} A)")
        return size

    def _optics_31(self, particles, optics):
        """Per-particle row index into the optics table, and the table (standard columns)."""
        import pandas as pd

        if "rlnOpticsGroup" not in optics or len(optics) == 0:
            raise self._err("the optics table has no rlnOpticsGroup rows")
        ids = self._numeric(optics, "rlnOpticsGroup").astype(np.int64)
        if "rlnOpticsGroup" in particles:
            wanted = self._numeric(particles, "rlnOpticsGroup").astype(np.int64)
        elif len(ids) == 1:
            wanted = np.full(len(particles), ids[0])
        else:
            raise self._err(f"the particle table has no rlnOpticsGroup but the optics table has {len(ids)} groups")
        order = np.argsort(ids, kind="stable")
        row = order[np.clip(np.searchsorted(ids[order], wanted), 0, len(ids) - 1)]
        unknown = ids[row] != wanted
        if unknown.any():
            raise self._err(f"particles refer to optics group(s) {sorted(set(wanted[unknown].tolist()))[:5]} "
                            f"that the optics table lacks (it has {sorted(ids.tolist())})")

        pixel = self._pixel_size(optics, "optics table")
        if pixel is None:  # some writers keep it per particle: one value per group then
            per_particle = self._pixel_size(particles, "particle table")
            if per_particle is None:
                raise self._err("no pixel size: expected rlnImagePixelSize (or rlnDetectorPixelSize and "
                                "rlnMagnification) in the optics table or the particle table")
            if np.ptp(per_particle) > PIXEL_SIZE_RTOL * per_particle.max():
                raise self._err(f"particles disagree on the pixel size ({per_particle.min():.6g} to "
                                f"{per_particle.max():.6g} A): one dataset needs one pixel size")
            pixel = np.full(len(ids), per_particle.mean())
        table = pd.DataFrame({"rlnOpticsGroup": ids})
        for lab in CTF_OPTICS_LABELS:
            table[lab] = self._numeric(optics, lab) if lab in optics else np.nan
        table["rlnImagePixelSize"] = pixel
        table["rlnImageSize"] = self._numeric(optics, "rlnImageSize").astype(np.int64) if "rlnImageSize" in optics else -1
        if "rlnOpticsGroupName" in optics:
            table.insert(1, "rlnOpticsGroupName", optics["rlnOpticsGroupName"].astype(str).to_numpy())
        return row, table

    def _optics_30(self, particles):
        """RELION 3.0: optics groups made from the distinct per-particle (voltage, Cs, Q0, pixel size)."""
        import pandas as pd

        pixel = self._pixel_size(particles, "particle table")
        if pixel is None:
            raise self._err("no pixel size: expected an optics table with rlnImagePixelSize (RELION 3.1), or "
                            "rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification per particle (RELION 3.0)")
        values = pd.DataFrame({lab: self._numeric(particles, lab) if lab in particles else np.full(len(particles), np.nan)
                               for lab in CTF_OPTICS_LABELS})
        values["rlnImagePixelSize"] = pixel
        # groups numbered in order of first appearance, like the rows drop_duplicates keeps
        row = values.groupby(list(values.columns), dropna=False, sort=False).ngroup().to_numpy()
        table = values.drop_duplicates().reset_index(drop=True)
        table.insert(0, "rlnOpticsGroup", np.arange(1, len(table) + 1))
        table["rlnImageSize"] = -1
        return row, table

    def _images_from_names(self, names) -> None:
        """Parse ``i@stack`` names, resolve and check every stack (header, size, indices)."""
        import pandas as pd

        names = names.astype(str)
        parts = names.str.partition("@")
        has_at = parts[1] == "@"
        stack_names = parts[2].where(has_at, parts[0]).str.strip()
        index = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index)) | (stack_names == "").to_numpy()
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise self._err(f"rlnImageName {names.iloc[k]!r} (row {k + 1}): expected 'index@stack.mrcs' with a 1-based index")
        codes, uniques = pd.factorize(stack_names)
        self._stack_code = codes.astype(np.int32)
        self._slice = (index - 1).astype(np.int64)
        last = np.full(len(uniques), -1, dtype=np.int64)
        np.maximum.at(last, self._stack_code, self._slice)

        self.stack_paths, self._stack_lengths, shapes, dtypes = [], [], [], []
        for code, name in enumerate(uniques):
            path = self._resolve(name)
            nz, shape, dtype = self._stack_header(path)
            if last[code] >= nz:
                raise self._err(f"image {last[code] + 1}@{name} is past the end of stack {path}, which holds {nz} image(s)")
            self.stack_paths.append(path)
            self._stack_lengths.append(nz)
            shapes.append(shape)
            dtypes.append(dtype)
        distinct = sorted(set(shapes))
        if len(distinct) > 1:
            first = {s: self.stack_paths[shapes.index(s)].name for s in distinct}
            raise self._err(f"mixed image sizes: one dataset needs one image size, got {first} (size: first stack)")
        self.image_shape = distinct[0]
        self.image_dtype = np.dtype(dtypes[0])

    def _resolve(self, name: str) -> Path:
        p = Path(name)
        if p.is_absolute():
            candidates = [p]
        else:  # relative to the STAR file's folder, else (RELION's habit) to the current folder
            candidates = [self.path.parent / p, Path.cwd() / p]
        for c in candidates:
            if c.is_file():
                return c.absolute()
        raise self._err(f"stack file {name!r} not found (looked for {', '.join(str(c) for c in candidates)})")

    def _stack_header(self, path: Path) -> tuple[int, tuple[int, int], type]:
        """(images, (H, W), dtype) of one stack from its header; a truncated or bad file is an error."""
        import mrcfile

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(path, header_only=True) as mrc:
                    h = mrc.header
                    nx, ny, nz, mode, ext = int(h.nx), int(h.ny), int(h.nz), int(h.mode), int(h.nsymbt)
        except (ValueError, OSError) as exc:
            raise self._err(f"stack {path} is not a valid MRC file ({exc})") from None
        if mode not in MRC_MODES:
            raise self._err(f"stack {path}: MRC mode {mode} is not read (expected one of {sorted(MRC_MODES)})")
        if min(nx, ny, nz) < 1:
            raise self._err(f"stack {path}: bad MRC header (nx, ny, nz = {nx}, {ny}, {nz})")
        expected = 1024 + ext + nx * ny * nz * np.dtype(MRC_MODES[mode]).itemsize
        size = path.stat().st_size
        if size < expected:
            raise self._err(f"stack {path} is truncated: its header promises {nz} images of {ny}x{nx} "
                            f"({expected} bytes), the file has {size} bytes")
        return nz, (ny, nx), MRC_MODES[mode]

    def _check_optics_agree(self) -> None:
        used = np.unique(self._group)
        pixel = self.optics["rlnImagePixelSize"].to_numpy(np.float64)
        px = pixel[used]
        if px.max() - px.min() > PIXEL_SIZE_RTOL * px.max():
            groups = {int(self.optics["rlnOpticsGroup"].iloc[g]): float(pixel[g]) for g in used}
            raise self._err(f"optics groups disagree on the pixel size {groups} (A): one dataset needs one pixel size")
        self.pixel_size_A = float(px.mean())
        sizes = self.optics["rlnImageSize"].to_numpy(np.int64)
        wrong = [int(self.optics["rlnOpticsGroup"].iloc[g]) for g in used if sizes[g] > 0 and sizes[g] != self.image_shape[1]]
        if wrong:
            raise self._err(f"optics group(s) {wrong} give rlnImageSize {sorted({int(s) for s in sizes[used]})} "
                            f"but the stacks hold {self.image_shape[0]}x{self.image_shape[1]} images")
        self.optics.loc[sizes <= 0, "rlnImageSize"] = self.image_shape[1]

    # ---------------------------------------------------------------- stacks
    def _stack_data(self, code: int) -> np.ndarray:
        """The memory-mapped images ``(n, H, W)`` of stack ``code``, opened on first use in this process."""
        import mrcfile

        if self._pid != os.getpid():  # a fresh process: the parent's maps are not ours to use
            self._stacks = OrderedDict()
            self._pid = os.getpid()
        mrc = self._stacks.get(code)
        if mrc is None:
            path = self.stack_paths[code]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mrc = mrcfile.mmap(path, mode="r")
            except (ValueError, OSError) as exc:
                raise self._err(f"stack {path} cannot be read ({exc})") from None
            self._stacks[code] = mrc
            while len(self._stacks) > self.max_open_stacks:
                self._stacks.popitem(last=False)[1].close()
        else:
            self._stacks.move_to_end(code)
        data = mrc.data
        return data.reshape(1, *data.shape) if data.ndim == 2 else data

    def close(self) -> None:
        """Close the open stacks (they reopen on the next read)."""
        if self._pid == os.getpid():
            for mrc in self._stacks.values():
                mrc.close()
        self._stacks = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stacks"] = OrderedDict()
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return (f"ParticleDataset({str(self.path)!r}, n={self.n_images}, shape={self.image_shape}, "
                f"pixel={self.pixel_size_A:.4g} A, poses={self.has_poses}, ctf={self.has_ctf})")

    # ---------------------------------------------------------------- reading
    def _read_images(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.image_shape), dtype=np.float32)
        codes, slices = self._stack_code[start:stop], self._slice[start:stop]
        # runs of consecutive rows in one stack; a run of consecutive slices is one contiguous read
        cuts = np.flatnonzero(np.diff(codes)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(codes)], strict=True):
            data, idx = self._stack_data(int(codes[a])), slices[a:b]
            if idx[-1] - idx[0] == b - a - 1 and (b - a == 1 or np.all(np.diff(idx) == 1)):
                out[a:b] = data[idx[0]:idx[-1] + 1]
            else:
                out[a:b] = data[idx]
            _release_pages(data, int(idx.min()), int(idx.max()) + 1)
        return out

    def _read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        from xrai.rotations import relion_euler_to_matrix

        images = self._read_images(start, stop)
        self._check_finite(images, start, stop)
        group = self._group[start:stop]
        rows = {"images": images,
                "pixel_size_A": self.optics["rlnImagePixelSize"].to_numpy(np.float32)[group]}
        if self.has_poses:
            rot, tilt, psi = self._angles[start:stop].T
            rows["rotations"] = relion_euler_to_matrix(rot, tilt, psi).transpose(-1, -2).numpy().astype(np.float32)
        if self.has_shifts:
            rows["shifts_A"] = self._shifts_A[start:stop].astype(np.float32)
        if self.has_ctf:
            d = self._defocus[start:stop]
            rows |= {"defocus_u_A": d[:, 0], "defocus_v_A": d[:, 1], "defocus_angle_deg": d[:, 2]}
            for key, lab in zip(("voltage_kv", "cs_mm", "amplitude_contrast"), CTF_OPTICS_LABELS, strict=True):
                rows[key] = self.optics[lab].to_numpy(np.float32)[group]
        return rows

    def read(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Particles ``[start, stop)`` as torch tensors (float32 unless said).

        ``images`` (B, H, W), ``index`` int64 (B,), ``pixel_size_A`` (B,); with poses ``rotations``
        (B, 3, 3) (xrai poses ``A^T``); with origins ``shifts_A`` (B, 2); with CTF ``defocus_u_A``,
        ``defocus_v_A``, ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``, ``amplitude_contrast`` (B,).
        Raises XraiError on NaN / inf images.
        """
        start, stop = max(0, int(start)), min(self.n_images, int(stop))
        if stop <= start:
            raise ValueError(f"empty range [{start}, {stop}) of a dataset of {self.n_images} images")
        return self._to_torch(self._read_rows(start, stop) | {"index": np.arange(start, stop)})

    def true_rotations(self, index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """The STAR file's poses as xrai rotations ``R = A^T`` ``(N, 3, 3)`` float64 (all particles by default).

        Reads no image. Example: ``ParticleDataset("particles.star").true_rotations([0, 5])``.
        """
        from xrai.rotations import relion_euler_to_matrix

        if not self.has_poses:
            raise self._err(f"the particles have no poses (expected {list(POSE_LABELS)})")
        angles = self._angles
        if index is not None:
            index = np.asarray(index, dtype=np.int64)
            if len(index) and (index.min() < 0 or index.max() >= self.n_images):
                raise self._err(f"image index out of range [0, {self.n_images}) (poses written for another dataset?)")
            angles = angles[index]
        rot, tilt, psi = torch.from_numpy(np.ascontiguousarray(angles)).unbind(-1)
        return relion_euler_to_matrix(rot, tilt, psi).transpose(-1, -2).contiguous()

    def fingerprint(self) -> str:
        """sha256 of what identifies the contents: size, shape, pixel size, the STAR file's first and last
        MiB and byte count, and the first and last images. A re-simulated or edited set differs.

        >>> ParticleDataset("train.star").fingerprint()[:12]       # doctest: +SKIP
        '9b2e04c1d7aa'
        """
        import hashlib

        digest = hashlib.sha256(json.dumps({"n": self.n_images, "shape": list(self.image_shape),
                                            "pixel_size_A": self.pixel_size_A}).encode())
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:  # head and tail: a STAR file of millions of particles is large
            digest.update(fh.read(2**20))
            fh.seek(max(0, size - 2**20))
            digest.update(fh.read() + str(size).encode())
        for i in sorted({0, self.n_images - 1}):
            digest.update(np.ascontiguousarray(self._read_images(i, i + 1)).tobytes())
        return digest.hexdigest()

    def true_shifts(self, index: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """The STAR file's origins ``shifts_A`` ``(N, 2)`` float64 (zeros without origin columns); reads no image."""
        n = self.n_images
        shifts = self._shifts_A if self.has_shifts else np.zeros((n, 2))
        if index is None:
            return np.array(shifts, dtype=np.float64)
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise self._err(f"image index out of range [0, {n}) (poses written for another dataset?)")
        return np.asarray(shifts, dtype=np.float64)[index]


def _release_pages(data: np.ndarray, start: int, stop: int) -> None:
    """Drop images ``[start, stop)`` of a memory-mapped stack from this process's resident memory.

    Pages of a file mapping stay resident (counted in RSS) once touched, so a pass over a large
    stack would look like it holds the whole file; they stay in the page cache for the next read.
    """
    mapping = getattr(data, "_mmap", None)  # numpy.memmap's mmap.mmap of the whole file
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row = data.strides[0]
    # widened: a fault maps neighbouring pages too (fault-around, whole folios)
    lo = max(0, data.offset + start * row - FAULT_AROUND_BYTES)
    lo -= lo % mmap.PAGESIZE
    hi = min(data.offset + stop * row + FAULT_AROUND_BYTES, len(mapping))
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
