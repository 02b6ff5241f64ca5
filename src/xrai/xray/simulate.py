"""Simulate an XFEL single-particle diffraction dataset to HDF5 (``xrai simulate``).

The physics follows skopi (see :mod:`xrai.xray.scattering` and :mod:`xrai.xray.geometry`):

1. the atoms of the structure (``xrai.structure.read_atoms``) are centred on their
   electron-density centroid (:func:`xrai.xray.scattering.molecule_centre`; the reference
   density of :mod:`xrai.xray.density` is centred the same way);
2. ``|F|^2`` is computed once on a ``simulation.mesh_size``^3 mesh covering the detector's |q|;
3. each image is a trilinear slice of the mesh at ``k = R @ q_pixel`` for a uniformly random
   orientation, times ``fluence * r_e^2 * polarization * solid angle`` (photons);
4. each image is scaled by ``simulation.photon_scaling`` (by default so that its total is at
   least ``simulation.min_total_intensity``, the X-RAI paper's appendix A.1: 20,000 photons;
   or the beam's true fluence; or a fixed mean per pattern) times an optional per-pulse
   fluence jitter, the factor stored in ``scale`` (:mod:`xrai.xray.photons`);
5. an optional background (photons per pixel) is added, Poisson noise drawn
   (``simulation.poisson_noise``), and masked pixels (beam stop, gaps, bad pixels) set to 0.

Orientations and noise are reproducible from the split's seed alone (``simulation.seed``
for every training set, ``simulation.test_seed`` for the test set), independent of the
batch size and of sharding: image ``i`` always gets the same orientation, so a smaller
training set is a prefix of a larger one, and the test set never overlaps them.

Output (one file, or a master file of HDF5 virtual datasets over shards of
``simulation.shard_size`` images in ``<name>_shards/``, reading as one dataset):
``images`` (N, H, W) float32/float16 chunked in whole batches, ``orientations`` (N, 4)
wxyz, ``scale`` (N,), ``pixel_position_reciprocal`` (H, W, 3) Angstrom^-1,
``polarization`` and ``solid_angle`` (H, W), optional ``mask`` and ``background`` (H, W), and
attrs (geometry, beam, scaling, seed, version, resolved config). With ``simulation.storage:
sparse`` the images are stored as photon pixel lists instead (:class:`xrai.data.hdf5.DatasetWriter`). Files are written to a temporary name and renamed when
complete; finished shards are reused when a killed job is restarted.

Usage::

    xrai simulate --config config/test.yaml --structure results/structures/2CEX_A.cif \\
        --split train --n-images 2048 --out results/datasets/2CEX_A/train_2048.h5
    xrai simulate --config config.yaml --plan        # disk needed per dataset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from xrai import __version__
from xrai.config import split_seed
from xrai.data.hdf5 import DatasetWriter, write_sharded_master
from xrai.errors import XraiError
from xrai.io import atomic_path, check_disk_space, human_bytes, provenance
from xrai.random_streams import image_seeds, orientations_for, torch_seed
from xrai.utils import pick_device, resource_usage, set_cpu_threads
from xrai.xray.geometry import Beam, Detector
from xrai.xray.photons import (
    PhotonSettings,
    dataset_factor_and_photons,
    jitter_factors,
    resolve_storage,
)
from xrai.xray.scattering import PatternSimulator, centred_positions, molecule_centre

logger = logging.getLogger(__name__)


def _add_poisson_noise(images: torch.Tensor, seed: int, split: str, start: int) -> torch.Tensor:
    seeds = image_seeds(seed, split, 2, start, start + len(images))
    out = torch.empty_like(images)
    gen = torch.Generator()
    for i, s in enumerate(seeds):  # one stream per image: independent of the batch size
        gen.manual_seed(torch_seed(s))
        out[i] = torch.poisson(images[i], generator=gen)
    return out


# --------------------------------------------------------------------------- disk plan
def dataset_bytes(cfg: dict, n_images: int, photons_per_image: float | None = None) -> int:
    """Bytes of one dataset of ``n_images`` (uncompressed: an upper bound with compression).

    Sparse storage (``simulation.storage``) holds at most 4 bytes per photon plus two
    offsets per image; it needs the expected photons per image (signal and background),
    given as ``photons_per_image`` or known from ``photon_scaling.mode: mean_photons``;
    without them the dense size is the bound.
    """
    sim = cfg["simulation"]
    n = int(cfg["detector"]["n_pixels"])
    itemsize = 2 if sim.get("dtype", "float32") == "float16" else 4
    per_image = n * n * itemsize + 4 * 8 + 4  # image, orientation (float64), scale
    storage = sim.get("storage", "dense")
    if storage != "dense" and sim.get("poisson_noise", False):
        scaling = sim.get("photon_scaling", {})
        if photons_per_image is None and scaling.get("mode") == "mean_photons":
            from xrai.xray.photons import background_photons

            bg = background_photons(sim, Detector.from_config(cfg))
            photons_per_image = float(scaling.get("mean_photons", 2000)) + (float(bg.sum()) if bg is not None else 0.0)
        if photons_per_image is not None:
            sparse = 4 * min(float(photons_per_image), n * n) + 2 * 8 + 4 * 8 + 4
            per_image = int(min(per_image, sparse) if storage == "auto" else sparse)
    per_file = n * n * (3 * 4 + 4 + 8 + 1 + 4) + 64 * 1024  # pixel q, polarization, solid angle, mask, background, metadata
    n_files = 1 + (-(-n_images // int(sim["shard_size"])) if n_images > sim["shard_size"] else 0)
    return int(n_images) * per_image + n_files * per_file


def planned_bytes(cfg: dict) -> dict[str, int]:
    """Bytes of every dataset of one protein: ``{'train_50000': ..., 'test_10000': ...}``."""
    sim = cfg["simulation"]
    plan = {f"train_{n}": dataset_bytes(cfg, int(n)) for n in sim["train_sizes"]}
    plan[f"test_{sim['test_size']}"] = dataset_bytes(cfg, int(sim["test_size"]))
    return plan


def disk_plan_table(cfg: dict) -> str:
    """A Markdown table of the bytes per dataset and the total over the config's proteins."""
    from xrai.config import protein_config, protein_entries

    def kind(section: dict) -> str:
        storage = section.get("storage", "dense")
        return section.get("dtype", "float32") if storage == "dense" else f"{storage} storage; dense bound unless mean_photons"

    proteins = list(protein_entries(cfg))
    configs = {p: protein_config(cfg, p) for p in proteins}
    sections = {p: c["simulation"] for p, c in configs.items()}
    plans = {p: planned_bytes(c) for p, c in configs.items()}
    n = cfg["detector"]["n_pixels"]
    plan = plans[proteins[0]]
    if all(p == plan for p in plans.values()) and len({kind(s) for s in sections.values()}) == 1:
        lines = [f"| dataset ({n}x{n} px, {kind(sections[proteins[0]])}) | bytes | size |", "|---|---:|---:|"]
        lines += [f"| {name}.h5 | {b} | {human_bytes(b)} |" for name, b in plan.items()]
        total = sum(plan.values())
        lines.append(f"| per protein | {total} | {human_bytes(total)} |")
    else:  # per-protein photon statistics (e.g. sparse storage for some): every protein's datasets, each its storage
        lines = [f"| dataset ({n}x{n} px) | bytes | size |", "|---|---:|---:|"]
        lines += [f"| {p}/{name}.h5 ({kind(sections[p])}) | {b} | {human_bytes(b)} |"
                  for p, pl in plans.items() for name, b in pl.items()]
    grand = sum(sum(pl.values()) for pl in plans.values())
    lines.append(f"| all {len(proteins)} proteins ({', '.join(proteins)}) | {grand} | {human_bytes(grand)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- simulation
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_atoms(structure: Path) -> tuple[np.ndarray, list[str]]:
    from xrai.structure import read_atoms

    positions, elements = read_atoms(structure)
    if len(positions) == 0:
        raise XraiError(f"{structure}: no atoms")
    return positions, elements


def simulate_dataset(
    cfg: dict,
    structure_cif: str | Path,
    split: str,
    n_images: int,
    out_h5: str | Path,
) -> dict:
    """Simulate ``n_images`` images of ``structure_cif`` for ``split`` into ``out_h5``; return a summary dict.

    See the module docstring for the physics, seeds and file layout. Raises XraiError
    for a bad split / size, a missing or unreadable structure, or too little disk space.
    """
    if n_images < 1:
        raise XraiError(f"--n-images must be >= 1, got {n_images}")
    sim_cfg = cfg["simulation"]
    seed = split_seed(cfg, split)
    structure = Path(structure_cif)
    out = Path(out_h5)
    det, beam = Detector.from_config(cfg), Beam.from_config(cfg)
    dtype = sim_cfg.get("dtype", "float32")
    batch = int(sim_cfg.get("batch_size", 256))
    shard_size = int(sim_cfg.get("shard_size", 1_000_000))
    photons = PhotonSettings.from_config(cfg, det)
    device = pick_device(sim_cfg.get("device", "auto"))
    if device.type == "cpu":
        set_cpu_threads(0)

    positions, elements = _read_atoms(structure)
    centre = molecule_centre(positions, elements)
    pos = centred_positions(positions, elements)
    sha = _file_sha256(structure)

    # shards: contiguous ranges of images, each its own file
    if n_images > shard_size:
        shard_dir = out.parent / f"{out.stem}_shards"
        ranges = [(s, min(s + shard_size, n_images)) for s in range(0, n_images, shard_size)]
        files = [shard_dir / f"shard{k:03d}.h5" for k in range(len(ranges))]
    else:
        ranges, files = [(0, n_images)], [out]

    attrs = {
        "format": "xrai diffraction dataset v1",
        "split": split,
        "n_images": int(n_images),
        "seed": seed,
        "detector": det.to_dict(),
        "beam": beam.to_dict(),
        "mesh_size": int(sim_cfg["mesh_size"]),
        "scaling": {"min_total_intensity": photons.min_total_intensity, "poisson_noise": photons.poisson_noise,
                    "unit": "photons",
                    "intensity": "|F|^2 * fluence * r_e^2 * polarization * solid_angle * scale + background"},
        "structure": str(structure),
        "structure_sha256": sha,
        "n_atoms": len(elements),
        "centre_A": centre.tolist(),
        "centring": "electron-density centroid (sum Z_j r_j / sum Z_j) moved to the origin",
        "orientation_convention": "unit quaternion (w, x, y, z), w >= 0; image samples k = R @ q_pixel",
        "image_layout": "[row=y, col=x], skopi SimpleSquareDetector panel layout",
        "xrai_version": __version__,
        "config": cfg,
        "provenance": provenance(None, seed),
    }
    key_src = {k: attrs[k] for k in ("split", "seed", "detector", "beam", "mesh_size", "scaling", "structure_sha256", "xrai_version")}
    key_src["dtype"], key_src["compression"] = dtype, sim_cfg.get("compression", "none")
    key_src["photons"] = {k: sim_cfg.get(k) for k in ("photon_scaling", "fluence_jitter", "beam_stop", "bad_pixels",
                                                     "background", "storage")}

    def shard_key(rng: tuple[int, int]) -> str:
        return hashlib.sha256(json.dumps({**key_src, "range": rng}, sort_keys=True).encode()).hexdigest()

    todo = [(rng, f) for rng, f in zip(ranges, files, strict=True) if not (len(files) > 1 and _shard_done(f, shard_key(rng)))]
    if len(todo) < len(files):
        logger.info("%s: reusing %d finished shards", out, len(files) - len(todo))
    n_todo = sum(b - a for (a, b), _ in todo)
    if photons.storage == "dense":  # fail before the mesh; sparse sizes need the calibrated photons
        check_disk_space(out.parent, int(dataset_bytes(cfg, n_images) * n_todo / n_images),
                         f"simulating {n_images} images into {out}")

    t0 = time.perf_counter()
    simulator = PatternSimulator.from_atoms(pos, elements, det, beam, int(sim_cfg["mesh_size"]), device=device)
    t_mesh = time.perf_counter() - t0
    logger.info("%s: |F|^2 of %d atoms on a %d^3 mesh in %.1f s on %s", structure.name, len(elements),
                sim_cfg["mesh_size"], t_mesh, device)
    factor, expected = dataset_factor_and_photons(photons, simulator)
    storage = resolve_storage(photons, expected, det.n_pixels**2)
    photon_attrs = {**photons.to_attrs(factor, expected), "storage": storage}
    logger.info("%s: %s scaling, %.4g expected signal photons per pattern, %s storage", out.name, photons.mode,
                expected, storage)
    attrs["scaling"] = {**attrs["scaling"], **photon_attrs}
    attrs.update(photon_scaling_mode=photons.mode, fluence_jitter=photons.fluence_jitter,
                 poisson_noise=photons.poisson_noise, storage=storage,
                 mask_config={k: sim_cfg.get(k, {}) for k in ("beam_stop", "bad_pixels")},
                 background_config=sim_cfg.get("background", {}))
    if storage != "dense":
        needed = dataset_bytes(cfg, n_images, photons_per_image=expected + photon_attrs["background_photons_per_pattern"])
        check_disk_space(out.parent, int(needed * n_todo / n_images), f"simulating {n_images} images into {out}")

    t1 = time.perf_counter()
    done = 0
    for (a, b), f in todo:
        with atomic_path(f) as tmp, DatasetWriter(
            tmp, b - a, det.shape,
            pixel_position_reciprocal=simulator.q_pixel.cpu(),
            polarization=det.polarization(beam), solid_angle=det.solid_angle(),
            dtype=dtype, chunk_rows=batch, compression=sim_cfg.get("compression", "none"),
            mask=photons.mask, background=photons.background, storage=storage,
        ) as writer:
            for s in range(a, b, batch):
                e = min(s + batch, b)
                images, scale = _simulate_batch(simulator, seed, split, s, e, photons, factor)
                if dtype == "float16" and float(images.max()) > 65504:
                    raise XraiError(
                        f"simulation.dtype float16 cannot hold pixel values up to {float(images.max()):.0f}; "
                        "use float32 or fewer photons (simulation.min_total_intensity / photon_scaling)")
                writer.write(s - a, images, orientations_for(seed, split, s, e), scale)
                done += e - s
                _log_progress(out, done, done - (e - s), n_todo, t1)
            writer.set_attrs(**attrs, shard_range=[a, b], shard_key=shard_key((a, b)))
    if len(files) > 1:
        write_sharded_master(out, files, attrs={**attrs, "chunk_rows": batch})
    seconds = time.perf_counter() - t1
    summary = {
        "out": str(out), "n_images": n_images, "simulated": done, "mesh_seconds": t_mesh, "seconds": seconds,
        "images_per_s": done / seconds if seconds > 0 else float("inf"), "shards": len(files) if len(files) > 1 else 0,
        **resource_usage(device),
    }
    logger.info("%s: %d images in %.1f s (%.0f images/s), peak RSS %.0f MB", out, done, seconds,
                summary["images_per_s"], summary["peak_rss_mb"])
    return summary


def _simulate_batch(simulator: PatternSimulator, seed: int, split: str, start: int, stop: int,
                    photons: PhotonSettings, dataset_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    quats = orientations_for(seed, split, start, stop)
    images = simulator.patterns(quats)
    scale = photons.signal_scale(images, dataset_factor)
    if photons.fluence_jitter > 0:
        jitter = jitter_factors(image_seeds(seed, split, 3, start, stop), photons.fluence_jitter)
        scale = scale * jitter.to(scale.device)
    images = images.mul_(scale[:, None, None].float()).cpu()
    scale = scale.cpu()
    if photons.background is not None:
        images += photons.background.float()
    if photons.poisson_noise:
        images = _add_poisson_noise(images, seed, split, start)
    if photons.mask is not None:
        images[:, ~photons.mask] = 0.0
    return images, scale


def _log_progress(out: Path, done: int, previous: int, total: int, t0: float) -> None:
    step = max(1, total // 10)  # about ten lines per dataset
    if done == total or done // step > previous // step:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        logger.info("%s: %d / %d images (%.0f images/s, %.0f s left)", out.name, done, total, rate, (total - done) / rate)


def _shard_done(path: Path, key: str) -> bool:
    import h5py

    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("shard_key") == key
    except OSError:
        return False


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xrai simulate`` (``--config`` is added by xrai.cli)."""
    parser.add_argument("--structure", metavar="CIF", help="atoms to simulate (mmCIF/PDB from xrai fetch)")
    parser.add_argument("--protein", metavar="NAME",
                        help="the config's protein whose 'simulation' overrides apply (e.g. its photon count)")
    parser.add_argument("--split", choices=["train", "test"], help="train uses simulation.seed, test simulation.test_seed")
    parser.add_argument("--n-images", type=int, metavar="N", help="number of images")
    parser.add_argument("--out", metavar="H5", help="output HDF5 dataset")
    parser.add_argument("--plan", action="store_true", help="only print the disk plan (bytes per dataset) of the config")


def run(args: argparse.Namespace) -> None:
    """``xrai simulate``: one dataset, or ``--plan``."""
    from xrai.config import load_config, protein_config

    cfg = load_config(args.config)
    if args.plan:
        print(disk_plan_table(cfg))
        return
    missing = [opt for opt, v in (("--structure", args.structure), ("--split", args.split),
                                  ("--n-images", args.n_images), ("--out", args.out)) if v is None]
    if missing:
        raise XraiError(f"missing option(s) {', '.join(missing)} (or use --plan)")
    cfg = protein_config(cfg, args.protein)
    summary = simulate_dataset(cfg, args.structure, args.split, args.n_images, args.out)
    logger.info("summary: %s", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}))

