"""Simulate a TEM-style cryo-EM particle set to RELION 3.1 STAR + ``.mrcs`` (``xrai simulate-cryoem``).

Following cryoPoseNet (data section) and cryoAI (image formation model), image ``i`` is

1. the projection along z of the rotated potential (:mod:`xrai.cryoem.potential`, V·Å: voxel
   sums × pixel size) by Fourier slice, for a uniformly random orientation (the same stream as
   the X-ray simulator: ``xrai.random_streams.orientations_for``, so image ``i`` of a split has
   the same rotation in both modalities); RELION angles ``(rot, tilt, psi)`` of ``A = R^T``,
   the image is made from ``A`` rebuilt from the angles written to the STAR file;
2. shifted by ``t ~ N(0, cryoem.shift_sigma_A²)`` per axis (particle at centre + t,
   ``rlnOriginX/YAngst = -t``) and multiplied by the CTF (``cryoem.ctf``; defocus per image
   from ``cryoem.defocus``, astigmatism from ``cryoem.astigmatism``), in Fourier space with
   ``cryoem.pad_factor`` padding (:mod:`xrai.cryoem.ctf`);
3. optional shot noise (``cryoem.dose_e_per_A2``) and white Gaussian noise at
   ``cryoem.snr_db`` (:mod:`xrai.cryoem.noise`). The noise ``sigma`` is one number per config:
   ``var(signal)`` is the mean pixel variance of the noise-free images 0..511 of the training
   stream, so train and test sets and every size share it.

Seeds: ``simulation.seed`` (train) or ``simulation.test_seed`` (test); every image's shift,
defocus and noise come from its own generator, so a smaller set is a prefix of a larger one
and the batch size and sharding change nothing.

Output beside ``OUT.star``: ``OUT_stacks/OUT_0000.mrcs`` ... (``simulation.shard_size``
images each; a stack whose header label carries the same key as this run is kept when a killed
job is restarted), ``OUT_stacks/config.yaml`` + ``provenance.json`` (resolved config, version)
and ``simulation.json`` (noise sigma, measured SNR, timings); the STAR file is written last.

Usage::

    xrai simulate-cryoem --config config/cryoem-test.yaml --protein 4AKE \\
        --structure results/structures/4AKE.cif --split train --n-images 2048 \\
        --out results/datasets/4AKE/train_2048.star
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
from xrai.cryoem.ctf import CtfParams, fourier_filter
from xrai.cryoem.noise import add_gaussian_noise, add_shot_noise, image_rng, noise_sigma
from xrai.cryoem.potential import potential_from_file
from xrai.cryoem.projection import FourierProjector
from xrai.cryoem.relion import MrcsStackWriter, image_names, stack_label, write_star
from xrai.errors import XraiError
from xrai.io import check_disk_space, write_json, write_run_metadata
from xrai.random_streams import orientations_for
from xrai.rotations import matrix_to_relion_euler, quaternion_to_matrix, relion_euler_to_matrix
from xrai.utils import pick_device, resource_usage, set_cpu_threads

logger = logging.getLogger(__name__)

#: noise-free training images whose mean pixel variance calibrates the Gaussian noise
SNR_CALIBRATION_IMAGES = 512
_SPLIT_TAG = {"train": 0, "test": 0x7E57}
_PARAMS_STREAM, _GAUSS_STREAM, _SHOT_STREAM = 11, 12, 13
_STAR_CHUNK = 65536


def image_parameters(em: dict, seed: int, split: str, start: int, stop: int, pixel_size: float) -> dict:
    """Per-image pose, shift and CTF of images ``[start, stop)``: a dict of float64 numpy arrays.

    Keys: ``rot, tilt, psi`` (degrees), ``origin_x_A, origin_y_A`` (RELION's rlnOrigin, = -shift),
    ``defocus_u_A, defocus_v_A, defocus_angle_deg``.
    """
    A = quaternion_to_matrix(orientations_for(seed, split, start, stop)).transpose(-1, -2)
    rot, tilt, psi = (x.numpy() for x in matrix_to_relion_euler(A))
    draws = np.empty((stop - start, 5))
    for k, i in enumerate(range(start, stop)):
        g = image_rng(seed, _SPLIT_TAG[split], _PARAMS_STREAM, i)
        draws[k] = g.standard_normal(2).tolist() + g.random(3).tolist()
    shift = draws[:, :2] * float(em["shift_sigma_A"])
    dz = em["defocus"]
    if dz["distribution"] == "uniform":
        mean_um = dz["min_um"] + (dz["max_um"] - dz["min_um"]) * draws[:, 2]
    else:
        from scipy.special import ndtri  # the lognormal's quantile from the same uniform draw

        mean_um = dz["median_um"] * np.exp(dz["log_sigma"] * ndtri(np.clip(draws[:, 2], 1e-12, 1 - 1e-12)))
    astig_um = float(em["astigmatism"]["max_um"]) * draws[:, 3]
    return {
        "rot": rot, "tilt": tilt, "psi": psi, "origin_x_A": -shift[:, 0], "origin_y_A": -shift[:, 1],
        "defocus_u_A": (mean_um + astig_um) * 1e4, "defocus_v_A": (mean_um - astig_um) * 1e4,
        "defocus_angle_deg": 180.0 * draws[:, 4] if em["astigmatism"]["max_um"] > 0 else np.zeros(stop - start),
    }


def noise_free_images(projector: FourierProjector, em: dict, params: dict, pixel_size: float) -> torch.Tensor:
    """Projection (V·Å), shift and CTF of the images described by ``params`` (:func:`image_parameters`)."""
    A = relion_euler_to_matrix(*(torch.from_numpy(params[k]) for k in ("rot", "tilt", "psi")))
    images = projector.project(A) * pixel_size
    shifts = -torch.from_numpy(np.stack([params["origin_x_A"], params["origin_y_A"]], axis=1)) / pixel_size
    ctf = None
    if em["ctf"]:
        ctf = CtfParams(torch.from_numpy(params["defocus_u_A"]), torch.from_numpy(params["defocus_v_A"]),
                        torch.from_numpy(params["defocus_angle_deg"]), float(em["voltage_kv"]), float(em["cs_mm"]),
                        float(em["amplitude_contrast"]))
    has_shift = bool(em["shift_sigma_A"] > 0)
    return fourier_filter(images, pixel_size, ctf, shifts if has_shift else None, float(em["pad_factor"]))


def calibrate_noise_sigma(projector: FourierProjector, em: dict, cfg: dict, pixel_size: float, batch: int) -> float:
    """The Gaussian noise sd for ``cryoem.snr_db``, from the training stream's first noise-free images."""
    seed, total, count = int(cfg["simulation"]["seed"]), 0.0, 0
    for s in range(0, SNR_CALIBRATION_IMAGES, batch):
        e = min(s + batch, SNR_CALIBRATION_IMAGES)
        images = noise_free_images(projector, em, image_parameters(em, seed, "train", s, e, pixel_size), pixel_size)
        total += float(images.double().var(dim=(-2, -1)).sum())
        count += e - s
    return noise_sigma(total / count, float(em["snr_db"]))


def dataset_bytes(em: dict, n_images: int, dtype: str) -> int:
    """Bytes of the ``.mrcs`` stacks of ``n_images`` (the STAR file adds about 200 bytes per image)."""
    return int(n_images) * (int(em["box_size"]) ** 2 * (2 if dtype == "float16" else 4) + 200)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def simulate_cryoem_dataset(cfg: dict, structure: str | Path, split: str, n_images: int, out_star: str | Path,
                            protein: str | None = None) -> dict:
    """Simulate ``n_images`` particles of ``structure`` for ``split`` into ``out_star`` + stacks; return a summary.

    ``protein`` selects that protein's ``cryoem`` overrides (``xrai.config.cryoem_config``).
    """
    from xrai.config import cryoem_config

    if n_images < 1:
        raise XraiError(f"--n-images must be >= 1, got {n_images}")
    em = cryoem_config(cfg, protein)
    sim = cfg["simulation"]
    seed = split_seed(cfg, split)
    structure, out = Path(structure), Path(out_star)
    if out.suffix != ".star":
        raise XraiError(f"--out {out}: expected a .star file name")
    box, px, dtype = int(em["box_size"]), float(em["pixel_size_A"]), sim.get("dtype", "float32")
    batch, shard = int(sim.get("batch_size", 256)), int(sim.get("shard_size", 1_000_000))
    device = pick_device(sim.get("device", "auto"))
    if device.type == "cpu":
        set_cpu_threads(0)

    stack_dir = out.parent / f"{out.stem}_stacks"
    ranges = [(s, min(s + shard, n_images)) for s in range(0, n_images, shard)]
    stacks = [stack_dir / f"{out.stem}_{k:04d}.mrcs" for k in range(len(ranges))]
    key_src = {"split": split, "seed": seed, "cryoem": em, "dtype": dtype, "structure_sha256": _file_sha256(structure),
               "calibration_seed": int(sim["seed"]), "xrai_version": __version__}

    def shard_key(rng: tuple[int, int]) -> str:
        return "xrai " + hashlib.sha256(json.dumps({**key_src, "range": rng}, sort_keys=True).encode()).hexdigest()

    todo = [(rng, f) for rng, f in zip(ranges, stacks, strict=True) if stack_label(f) != shard_key(rng)]
    if len(todo) < len(stacks):
        logger.info("%s: reusing %d finished stacks", out, len(stacks) - len(todo))
    n_todo = sum(b - a for (a, b), _ in todo)
    check_disk_space(out.parent, dataset_bytes(em, n_todo, dtype), f"simulating {n_images} particles into {out}")

    t0 = time.perf_counter()
    volume = potential_from_file(structure, box, px, float(em["bfactor"]))
    projector = FourierProjector(torch.from_numpy(volume).to(device), float(em["pad_factor"]))
    sigma = None
    if em["snr_db"] is not None:
        sigma = calibrate_noise_sigma(projector, em, cfg, px, batch)
    t_setup = time.perf_counter() - t0
    logger.info("%s: potential %d^3 at %.3f A/px, noise sd %s, set up in %.1f s on %s", structure.name, box, px,
                "none" if sigma is None else f"{sigma:.4g} V.A", t_setup, device)

    t1, done, signal_var, noise_var = time.perf_counter(), 0, 0.0, 0.0
    tag = _SPLIT_TAG[split]
    for (a, b), path in todo:
        with MrcsStackWriter(path, b - a, box, px, dtype, label=shard_key((a, b))) as writer:
            for s in range(a, b, batch):
                e = min(s + batch, b)
                clean = noise_free_images(projector, em, image_parameters(em, seed, split, s, e, px), px)
                images = clean
                if em["dose_e_per_A2"] is not None:
                    rngs = [image_rng(seed, tag, _SHOT_STREAM, i) for i in range(s, e)]
                    images = add_shot_noise(images, float(em["dose_e_per_A2"]), px, float(em["voltage_kv"]), rngs)
                if sigma is not None:
                    images = add_gaussian_noise(images, sigma, [image_rng(seed, tag, _GAUSS_STREAM, i) for i in range(s, e)])
                signal_var += float(clean.double().var(dim=(-2, -1)).sum())
                noise_var += float((images - clean).double().var(dim=(-2, -1)).sum())
                writer.write(s - a, images.cpu().numpy())
                done += e - s
                _log_progress(out, done, done - (e - s), n_todo, t1)
    seconds = time.perf_counter() - t1

    chunks = [image_parameters(em, seed, split, s, min(s + _STAR_CHUNK, n_images), px)
              for s in range(0, n_images, _STAR_CHUNK)]  # in chunks: no (N, 3, 3) matrices for the whole set
    params = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    particles = _particle_table(params, ranges, [f"{stack_dir.name}/{f.name}" for f in stacks], em["ctf"])
    optics = {"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, "rlnVoltage": float(em["voltage_kv"]),
              "rlnSphericalAberration": float(em["cs_mm"]), "rlnAmplitudeContrast": float(em["amplitude_contrast"]),
              "rlnImagePixelSize": px, "rlnImageSize": box, "rlnImageDimensionality": 2}
    summary = {
        "out": str(out), "n_images": n_images, "simulated": done, "stacks": len(stacks), "setup_seconds": t_setup,
        "seconds": seconds, "images_per_s": done / seconds if seconds > 0 else float("inf"),
        "noise_sigma_VA": sigma, "snr_db_requested": em["snr_db"],
        "snr_db_measured": (10 * np.log10(signal_var / noise_var) if noise_var > 0 else None),
        "image_units": "projected potential, V*A (protein white); RELION conventions (see xrai.cryoem)",
        **resource_usage(device),
    }
    write_run_metadata(stack_dir, cfg, seed)
    write_json(stack_dir / "simulation.json", {**summary, "cryoem": em, "split": split, "seed": seed,
                                               "structure": str(structure), "xrai_version": __version__})
    write_star(out, optics, particles)  # last: a STAR file means a complete set
    logger.info("%s: %d particles in %.1f s (%.0f images/s), peak RSS %.0f MB", out, done, seconds,
                summary["images_per_s"], summary["peak_rss_mb"])
    return summary


def _particle_table(params: dict, ranges: list[tuple[int, int]], stacks: list[str], ctf: bool):
    import pandas as pd

    names = [name for (a, b), st in zip(ranges, stacks, strict=True) for name in image_names(st, b - a)]
    table = {"rlnImageName": names, "rlnAngleRot": params["rot"], "rlnAngleTilt": params["tilt"],
             "rlnAnglePsi": params["psi"], "rlnOriginXAngst": params["origin_x_A"],
             "rlnOriginYAngst": params["origin_y_A"]}
    if ctf:  # no CTF columns for CTF-free data: a reader must not apply one
        table |= {"rlnDefocusU": params["defocus_u_A"], "rlnDefocusV": params["defocus_v_A"],
                  "rlnDefocusAngle": params["defocus_angle_deg"]}
    table["rlnOpticsGroup"] = np.ones(len(names), dtype=np.int64)
    return pd.DataFrame(table)


def _log_progress(out: Path, done: int, previous: int, total: int, t0: float) -> None:
    step = max(1, total // 10)
    if done == total or done // step > previous // step:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        logger.info("%s: %d / %d particles (%.0f images/s, %.0f s left)", out.name, done, total, rate, (total - done) / rate)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xrai simulate-cryoem`` (``--config`` is added by xrai.cli)."""
    parser.add_argument("--structure", metavar="CIF", required=True, help="atoms (mmCIF/PDB from xrai fetch)")
    parser.add_argument("--protein", help="protein name in the config (selects its cryoem overrides)")
    parser.add_argument("--split", choices=["train", "test"], required=True,
                        help="train uses simulation.seed, test simulation.test_seed")
    parser.add_argument("--n-images", type=int, metavar="N", required=True, help="number of particles")
    parser.add_argument("--out", metavar="STAR", required=True, help="output STAR file (stacks beside it)")


def run(args: argparse.Namespace) -> None:
    """``xrai simulate-cryoem``: one particle set."""
    from xrai.config import load_config

    cfg = load_config(args.config)
    summary = simulate_cryoem_dataset(cfg, args.structure, args.split, args.n_images, args.out, args.protein)
    logger.info("summary: %s", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}))
