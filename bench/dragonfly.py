"""Dragonfly benchmark: the reference EMC (Dragonfly, C/MPI, Ayyer et al. 2016) on bench/photons.py's datasets.

Dragonfly (https://github.com/duaneloh/Dragonfly) is built here from ``--source`` (a path or git
URL) in ``--work``/dragonfly-build (only its ``emc`` program and the ``make_quaternion`` utility;
the other utilities are left out of the build; an existing build is reused). Debian packages it needs::

    apt-get install -y libgsl-dev libopenmpi-dev openmpi-bin libhdf5-dev cmake

For each photon level the datasets already made by bench/photons.py
(``--data-root``/photons_<level>/<n>/data/<protein>/{train_<n>.h5, test_<m>.h5, intensity.h5})
are converted to Dragonfly's inputs in ``--work``/photons_<level>/<n>/dragonfly-nd<stages>-b<schedule>[-true]/
(``nd2x50-4x10-b1.4x3-noscale`` for ``--num-div 2 4 --iterations 50 10 --beta-schedule '1.4 3'
--need-scaling 0``):

* ``photons.emc`` / ``test.emc``: the raw photon counts, Dragonfly's sparse binary format
  (header: num_data, num_pix, type 0, padded to 1024 bytes; then ones, multi, place_ones,
  place_multi, count_multi as int32), pixels in row-major (H, W) order;
* ``det.dat``: the ASCII detector: ``num_pix detd ewald_rad``, then per pixel ``qx qy qz corr mask``
  with q in voxels of xrai's reference grid (``q / dq``, so Dragonfly's voxel ``i`` sits at
  ``(i - S // 2) dq`` like xrai's), corr = polarization x solid angle, mask 0 (used) or 2 (masked:
  left out of the likelihood and the merge);
* ``quat<n>.dat``: Dragonfly's own orientation set for ``num_div`` n (``10 (5 n^3 + n)`` rotations:
  n = 2, 3, 4, 5 give 420, 1,380, 3,240, 6,300; median distance of a random pose to the nearest one
  16.1, 10.9, 8.3, 6.6 degrees), written by its ``make_quaternion``, so the orientation indices it
  outputs are known;
* ``train<k>.ini``: ``[emc]`` of stage k with ``need_scaling`` (``--need-scaling``, default 0: one
  fluence factor for all frames), ``beta = auto`` (Dragonfly's empirical start from the photons per
  frame, ``exp(-6.5 (K 1e-5)^0.15)``: 0.027 at 2,000 photons) and ``beta_schedule`` (default ``1.4 3``:
  x1.4 every 3 iterations, xrai's EMC's schedule) and ``fixed_seed = 1`` (Dragonfly's random start
  from a fixed seed, not the clock: a rerun repeats the run).

Why ``need_scaling = 0``: with 1 (a factor per frame, set in Dragonfly's M-step and held fixed in its
E-step; xrai's EMC instead fits the factor of every (image, orientation) pair) the random start
collapses on these datasets, whose patterns all hold the same photons (``min_total_intensity``), so a
frame's true factor is set by its orientation: at 2,000 photons (num_div 2 x 30 then 4 x 10) the
frames crowd onto a third of the orientations and the median pose error stays ~100 degrees (also with
``beta_schedule = 2 10``), where ``need_scaling = 0`` is down to 45 degrees after 30 iterations at
num_div 2 and still falling.

Stages (``--num-div 2 4 --iterations 50 10``, the default, like xrai's EMC's coarse-to-fine
``emc.levels``): each runs ``emc -t 1 <iterations>`` on the training frames (one rank, one OpenMP
thread) at its ``num_div``, from a random model (or ``--start true``: the true intensity), later stages
from the last stage's model and scale factors (``start_model_file``, ``scale_file``) with the annealing
carried on (``beta_factor``). Then one more iteration runs on the held-out test frames from the final
model (its E-step: the most likely orientation of each test frame under the fixed final model, with
one global scale; its M-step is discarded). Dragonfly's rotation matrix is the transpose of xrai's for
the same quaternion (it samples the model at ``M(q) q_pixel`` with ``M(q) = quaternion_to_matrix(q).T``,
xrai at ``R q_pixel``), so the poses are written as ``R = quaternion_to_matrix(q).T``
(``poses_train.h5``, ``poses_test.h5``), and the final intensity cropped to xrai's grid
(``intensity.h5``). Scoring is bench/photons.py's ``metrics`` (test poses, global alignment,
amplitude shell correlation), plus the training-pose error and, as a check of the convention, the
training-pose error read without the transpose (``median_deg_untransposed``: ~90 degrees when the
transpose is right). ``--start true --num-div 5 --iterations 1`` is the sanity check: from the
true intensity the poses must come out at the grid's own error.

Usage::

    python bench/dragonfly.py --work /work/runs/dragonfly --source /path/to/Dragonfly \\
        --data-root /work/runs/ph --photons 20000 2000 200 --num-div 2 4 --iterations 50 10
    python bench/dragonfly.py --work /work/runs/dragonfly --data-root /work/runs/ph --photons 2000 \\
        --num-div 5 --iterations 1 --start true

Finished runs (``timing.json``) are not rerun; the table (bench/photons.py's columns) is printed and
the rows are written to ``--work``/dragonfly_<the same name>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photons import mean_photons, metrics, table, write_rows  # noqa: E402

DEFAULT_SOURCE = "https://github.com/duaneloh/Dragonfly"
#: the CMake lines added in place of ``add_subdirectory(utils)``: only the quaternion utility
QUAT_TARGET = """add_executable(make_quaternion utils/src/make_quaternion.c ${OBJECTS})
target_link_libraries(make_quaternion GSL::gsl GSL::gslcblas m ${HDF5_C_LIBRARIES} ${MPI_LIBRARIES} ${OpenMP_C_LIBRARIES})
"""


def sh(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def build(source: str, work: Path) -> Path:
    """Dragonfly's ``emc`` and ``make_quaternion`` built in ``work/dragonfly-build``; the build folder.

    Only the build's sources are checked out (the repository's ``aux`` data are not needed), and
    ``add_subdirectory(utils)`` is replaced by the one utility used here.
    """
    root = work / "dragonfly-build"
    bin_dir = root / "build"
    if (bin_dir / "emc").exists() and (bin_dir / "make_quaternion").exists():
        return bin_dir
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        if src.exists():
            shutil.rmtree(src)
        sh(["git", "clone", "--no-checkout", "--quiet", source, str(src)])
        sh(["git", "checkout", "HEAD", "--", "CMakeLists.txt", "src", "utils/src/make_quaternion.c"], cwd=src)
    cmake = src / "CMakeLists.txt"
    text = cmake.read_text()
    if QUAT_TARGET not in text:
        text = re.sub(r"^add_subdirectory\(utils\)", "# add_subdirectory(utils)\n" + QUAT_TARGET, text, flags=re.M)
        cmake.write_text(text)
    bin_dir.mkdir(parents=True, exist_ok=True)
    sh(["cmake", str(src), "-DCMAKE_BUILD_TYPE=Release"], cwd=bin_dir)
    sh(["make", "emc", "make_quaternion"], cwd=bin_dir)
    return bin_dir


def write_photons(path: Path, dataset: Path) -> int:
    """The dataset's images as a sparse binary emc file (raw counts); the number of frames."""
    from xrai.data.hdf5 import DiffractionDataset

    ones, multi, place_ones, place_multi, count_multi = [], [], [], [], []
    with DiffractionDataset(dataset) as ds:
        n, n_pix = len(ds), ds.image_shape[0] * ds.image_shape[1]
        for start in range(0, n, 4096):
            imgs = ds.read(start, min(n, start + 4096))["images"].reshape(-1, n_pix).numpy()
            counts = np.rint(imgs).astype(np.int32)
            if np.abs(imgs - counts).max() > 1e-3:
                raise SystemExit(f"{dataset}: images are not photon counts")
            for row in counts:
                o = np.flatnonzero(row == 1)
                m = np.flatnonzero(row > 1)
                ones.append(len(o))
                multi.append(len(m))
                place_ones.append(o)
                place_multi.append(m)
                count_multi.append(row[m])
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (n, n_pix, 0)
    with open(path, "wb") as f:
        for a in (header, np.asarray(ones), np.asarray(multi), np.concatenate(place_ones),
                  np.concatenate(place_multi), np.concatenate(count_multi)):
            f.write(np.asarray(a, dtype=np.int32).tobytes())
    return n


def write_detector(path: Path, dataset: Path, dq: float) -> float:
    """Dragonfly's ASCII detector for the dataset's pixels, q in voxels of ``dq``; the largest |q| (voxels)."""
    import h5py

    from xrai.data.hdf5 import DiffractionDataset

    with DiffractionDataset(dataset) as ds:
        q = ds.pixel_position_reciprocal.double().reshape(-1, 3).numpy() / dq
        mask = ds.mask.reshape(-1).numpy()
        wavelength = float(ds.attrs["beam"]["wavelength_A"])
        det = ds.attrs["detector"]
    with h5py.File(dataset, "r") as f:
        corr = (f["polarization"][...].astype(np.float64) * f["solid_angle"][...]).reshape(-1)
    detd = det["distance_m"] / (det["side_m"] / det["n_pixels"])  # pixels (2D recon only)
    lines = [f"{len(q)} {detd:.6f} {1.0 / wavelength / dq:.6f}"]
    lines += [f"{x:.8f} {y:.8f} {z:.8f} {c:.10e} {0 if m else 2}" for (x, y, z), c, m in zip(q, corr, mask, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return float(np.linalg.norm(q[mask], axis=1).max())


def write_config(path: Path, photons: str, quat: str, size: int, folder: str, beta_schedule: str,
                 start_model: Path | None = None, beta: str = "auto", beta_factor: float = 1.0,
                 scale_file: Path | None = None, need_scaling: int = 1) -> None:
    """Dragonfly's ``[emc]`` section; ``start_model_file`` / ``scale_file``: an earlier ``output_NNN.h5``."""
    lines = ["[emc]", f"in_photons_file = {photons}", "in_detector_file = det.dat", f"in_quat_file = {quat}",
             f"size = {size}", f"output_folder = {folder}", f"log_file = {folder}/EMC.log",
             f"need_scaling = {need_scaling}", f"beta = {beta}", f"beta_schedule = {beta_schedule}",
             f"beta_factor = {beta_factor:.8g}", "fixed_seed = 1"]
    if start_model is not None:
        lines.append(f"start_model_file = {start_model}")
    if scale_file is not None and need_scaling:
        lines.append(f"scale_file = {scale_file}")
    path.write_text("\n".join(lines) + "\n")


def run_emc(bin_dir: Path, cfg: Path, iterations: int, env: dict) -> dict:
    """One ``emc -t 1`` process (one MPI rank, as a singleton); wall and CPU seconds (the child's rusage)."""
    cmd = [str(bin_dir / "emc"), "-c", cfg.name, "-t", "1", str(iterations)]
    print("+", " ".join(cmd), f"(in {cfg.parent})", flush=True)
    t0 = time.time()
    with open(cfg.parent / f"{cfg.stem}.stderr", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cfg.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"dragonfly emc failed (status {status}); see {cfg.parent / (cfg.stem + '.stderr')}")
    return {"wall_s": time.time() - t0, "cpu_s": usage.ru_utime + usage.ru_stime}


def read_quaternions(path: Path) -> np.ndarray:
    """``(M, 4)`` quaternions (w, x, y, z) of a Dragonfly quaternion file (weights dropped)."""
    return np.loadtxt(path, skiprows=1).reshape(-1, 5)[:, :4]


def dragonfly_rotations(quats: np.ndarray, index: np.ndarray, transpose: bool = True):
    """xrai rotation matrices of Dragonfly orientation indices: ``quaternion_to_matrix(q).T`` (Dragonfly's convention)."""
    import torch

    from xrai.rotations import quaternion_to_matrix

    R = quaternion_to_matrix(torch.from_numpy(quats[index]).double())
    return R.transpose(-1, -2) if transpose else R


def crop(intens: np.ndarray, size: int, xrai_size: int) -> np.ndarray:
    """Dragonfly's ``(S, S, S)`` volume (origin ``S // 2``) on xrai's grid (origin ``xrai_size // 2``)."""
    lo = size // 2 - xrai_size // 2
    return intens[lo:lo + xrai_size, lo:lo + xrai_size, lo:lo + xrai_size]


def pad(volume: np.ndarray, size: int) -> np.ndarray:
    """xrai's volume on Dragonfly's ``(S, S, S)`` grid (the inverse of :func:`crop`, zeros outside)."""
    out = np.zeros((size,) * 3)
    lo = size // 2 - volume.shape[0] // 2
    out[lo:lo + volume.shape[0], lo:lo + volume.shape[0], lo:lo + volume.shape[0]] = volume
    return out


def tag(args: argparse.Namespace) -> str:
    """The run's name: stages, annealing, scaling, start (``nd2x50-4x10-b1.4x3-noscale[-true]``)."""
    stages = "-".join(f"{nd}x{it}" for nd, it in zip(args.num_div, args.iterations, strict=True))
    return (f"nd{stages}-b{'x'.join(args.beta_schedule.split())}{'' if args.need_scaling else '-noscale'}"
            f"{'-true' if args.start == 'true' else ''}")


def run_level(args: argparse.Namespace, bin_dir: Path, level: str, n_train: int, env: dict) -> dict | None:
    """Dragonfly on one level's datasets (train, then the test E-step); the table row."""
    import h5py
    import torch

    from xrai.evaluation.evaluate import pose_error_summary, true_rotations
    from xrai.evaluation.metrics import pose_errors_deg
    from xrai.recon.emc import write_rotations
    from xrai.volume import read_volume_h5, write_volume_h5

    data = args.data_root / f"photons_{level}" / str(n_train) / "data" / args.protein
    paths = {"train": data / f"train_{n_train}.h5", "test": data / f"test_{args.test_size}.h5",
             "intensity": data / "intensity.h5"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        print(f"level {level}: missing {missing} (make them with bench/photons.py); skipped", flush=True)
        return None
    out = args.work / f"photons_{level}" / str(n_train) / f"dragonfly-{tag(args)}"
    out.mkdir(parents=True, exist_ok=True)
    true_int, grid = read_volume_h5(str(paths["intensity"]), "intensity")
    done = out / "timing.json"
    if not done.exists():
        qmax = write_detector(out / "det.dat", paths["train"], grid.dq)
        size = 2 * math.ceil(qmax) + 3  # Dragonfly's own choice (it holds xrai's grid: checked below)
        if size // 2 < grid.size // 2:
            raise SystemExit(f"Dragonfly's grid ({size}) is smaller than xrai's ({grid.size})")
        for nd in set(args.num_div):
            quat_cfg = out / f"quat{nd}.ini"
            quat_cfg.write_text(f"[make_quaternion]\nnum_div = {nd}\nout_quat_file = quat{nd}.dat\n")
            sh([str(bin_dir / "make_quaternion"), str(quat_cfg)])
        write_photons(out / "photons.emc", paths["train"])
        write_photons(out / "test.emc", paths["test"])
        start = scale = None
        if args.start == "true":
            start = out / "true_intensity.h5"
            with h5py.File(start, "w") as f:
                f.create_dataset("intens", data=pad(true_int.double().numpy(), size)[None])
        jump, period = args.beta_schedule.split()
        timing = {"wall_s": 0.0, "cpu_s": 0.0}
        done_iterations = 0
        for stage, (nd, iterations) in enumerate(zip(args.num_div, args.iterations, strict=True)):
            folder = f"train{stage}"
            shutil.rmtree(out / folder, ignore_errors=True)
            (out / folder).mkdir()
            # the annealing goes on where the last stage left it (Dragonfly counts iterations from 1 per run)
            factor = float(jump) ** (done_iterations // int(period))
            write_config(out / f"{folder}.ini", "photons.emc", f"quat{nd}.dat", size, folder, args.beta_schedule,
                         start, beta_factor=factor, scale_file=scale, need_scaling=args.need_scaling)
            t = run_emc(bin_dir, out / f"{folder}.ini", iterations, env)
            timing = {k: timing[k] + t[k] for k in timing}
            start = scale = out / folder / f"output_{iterations:03d}.h5"
            done_iterations += iterations
        final, nd = start, args.num_div[-1]
        shutil.rmtree(out / "test", ignore_errors=True)
        (out / "test").mkdir()
        write_config(out / "test.ini", "test.emc", f"quat{nd}.dat", size, "test", "1 1000", final, beta="1",
                     need_scaling=args.need_scaling)
        test_timing = run_emc(bin_dir, out / "test.ini", 1, env)
        timing.update(size=size, test_wall_s=test_timing["wall_s"], test_cpu_s=test_timing["cpu_s"])
        quats = read_quaternions(out / f"quat{nd}.dat")
        with h5py.File(final, "r") as f:
            rmax_train, intens = f["orientations"][...], f["intens"][0]
        with h5py.File(out / "test" / "output_001.h5", "r") as f:
            rmax_test = f["orientations"][...]
        write_rotations(out / "poses_train.h5", dragonfly_rotations(quats, rmax_train), {}, source="dragonfly")
        write_rotations(out / "poses_test.h5", dragonfly_rotations(quats, rmax_test), {}, source="dragonfly")
        vol = torch.from_numpy(crop(intens, size, grid.size).copy())
        write_volume_h5(str(out / "intensity.h5"), grid, {"method": "dragonfly", "num_div": args.num_div,
                                                          "iterations": args.iterations},
                        intensity=vol, amplitude=vol.clamp_min(0).sqrt())
        # the convention check: the same orientations read without the transpose
        R_true = true_rotations(paths["train"], torch.arange(len(rmax_train)))
        wrong, _ = pose_errors_deg(dragonfly_rotations(quats, rmax_train, transpose=False), R_true)
        timing["median_deg_untransposed"] = float(wrong.median())
        done.write_text(json.dumps(timing))
    timing = json.loads(done.read_text())
    train = pose_error_summary(out / "poses_train.h5", paths["train"])
    row = {"level": level, "photons": mean_photons(paths["train"]), "n_train": n_train,
           "method": "dragonfly" if args.start == "random" else "dragonfly (true start)",
           "num_div": args.num_div, "n_orientations": len(read_quaternions(out / f"quat{args.num_div[-1]}.dat")),
           "iterations": args.iterations, "need_scaling": args.need_scaling, "beta_schedule": args.beta_schedule,
           # wall / CPU: the training stages and the test E-step (Dragonfly's processes; not the file conversions)
           "wall_s": timing["wall_s"] + timing["test_wall_s"], "cpu_s": timing["cpu_s"] + timing["test_cpu_s"],
           "train_wall_s": timing["wall_s"], "train_cpu_s": timing["cpu_s"],
           "train_median_deg": train["median_deg"], "train_frac_within_5": train["frac_within_5"],
           "median_deg_untransposed": timing["median_deg_untransposed"],
           **metrics(out, paths, "dragonfly")}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="Dragonfly's git repository (path or URL)")
    ap.add_argument("--data-root", type=Path, required=True, help="bench/photons.py's --work (the datasets)")
    ap.add_argument("--photons", nargs="+", default=["20000", "2000", "200"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[16384], help="training-set sizes")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--protein", default="2CEX_A")
    ap.add_argument("--num-div", nargs="+", type=int, default=[2, 4],
                    help="Dragonfly's orientation sampling per stage: 10 (5 n^3 + n) rotations")
    ap.add_argument("--iterations", nargs="+", type=int, default=[50, 10], help="iterations per stage")
    ap.add_argument("--beta-schedule", default="1.4 3", help="Dragonfly's beta_schedule: factor, every (iterations)")
    ap.add_argument("--need-scaling", type=int, choices=(0, 1), default=0,
                    help="Dragonfly's need_scaling: a fluence factor per frame (1) or one for all (0)")
    ap.add_argument("--start", choices=("random", "true"), default="random", help="random model or the true intensity")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    if len(args.num_div) != len(args.iterations):
        ap.error("--num-div and --iterations need one entry per stage")

    args.work.mkdir(parents=True, exist_ok=True)
    bin_dir = build(args.source, args.work)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = [row for level in args.photons for n in args.sizes
            if (row := run_level(args, bin_dir, level, n, env)) is not None]
    write_rows(rows, args.work / f"dragonfly_{tag(args)}.json", table(rows), args.markdown)


if __name__ == "__main__":
    main()
