"""Cryo-EM reconstruction with known answers: the Wiener known-pose bound, the fast default, the evaluation.

The particle sets (fixtures ``particle_sets``, ``adk_sets`` of tests/conftest.py, made by
tests/cryoem_sets.py): a blob volume or 4AKE projected by the simulator's Fourier-slice
projector, filtered by CTF and shifts, given white noise at 0 dB, written as RELION 3.1 sets
with the independent writer of tests/relion_reference.py. The true poses must reconstruct it;
random poses must not; the fast default must find poses far below chance error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryoem_sets import BOX, PIXEL_A

from xrai.cryoem.imaging import CTF_KEYS, CentralSliceImaging
from xrai.data.star import ParticleDataset
from xrai.evaluation.cryoem import evaluate_cryoem, fit_frame_translation, pose_metrics
from xrai.evaluation.metrics import fsc
from xrai.recon.cryoem_train import known_pose_volume, train_cryoem


def _fsc_to_quarter_nyquist(volume_xyz: np.ndarray, reference_xyz: np.ndarray) -> float:
    return float(min(fsc(volume_xyz, reference_xyz, PIXEL_A)["fsc"][1:BOX // 8 + 1]))


def test_known_pose_wiener_reconstructs_and_random_poses_do_not(particle_sets):
    torch.manual_seed(0)
    with ParticleDataset(particle_sets["train"]) as ds:
        imaging = CentralSliceImaging.for_dataset(ds, pad=2)
        volume, merge = known_pose_volume(ds, imaging)
        assert _fsc_to_quarter_nyquist(volume.numpy(), particle_sets["volume_xyz"]) >= 0.8
        ssnr = merge.ssnr()
        assert float(ssnr[2]) > 10 * float(ssnr[-1])  # the Wiener filter damps the noisy shells
        R = torch.linalg.qr(torch.randn(len(ds), 3, 3, dtype=torch.float64))[0]
        R = R * torch.linalg.det(R).sign()[:, None, None]
        random_volume, _ = known_pose_volume(ds, CentralSliceImaging.for_dataset(ds, pad=1),
                                             poses=(R.numpy(), ds.true_shifts()))
        assert _fsc_to_quarter_nyquist(random_volume.numpy(), particle_sets["volume_xyz"]) < 0.5


def test_frame_translation_and_shift_error_are_recovered():
    rng = np.random.default_rng(0)
    n = 200
    R = np.stack([np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(n)])
    R *= np.linalg.det(R)[:, None, None]
    c = np.array([1.5, -2.0, 0.7])
    true = rng.normal(0, 3, (n, 2))
    d = np.einsum("nji,j->ni", R, c)[:, :2]
    np.testing.assert_allclose(fit_frame_translation(d, R, np.ones(n)), c, atol=1e-9)
    phi = rng.uniform(0, 2 * np.pi, n)
    wrong = 0.5 * np.stack([np.cos(phi), np.sin(phi)], 1)  # every origin 0.5 Å off, on top of the frame translation
    poses = {"rotations": torch.from_numpy(R), "shifts_A": true + d + wrong, "index": np.arange(n)}
    m = pose_metrics(poses, torch.from_numpy(R), true, pixel_size_A=0.5)
    assert m["median_deg"] < 1e-5 and m["pi_flip_fraction"] == 0.0
    assert m["shift_error"]["median_A"] == pytest.approx(0.5, abs=0.1)
    assert m["shift_error"]["mse_px2"] == pytest.approx(1.0, abs=0.4)


def test_fast_default_finds_poses_far_below_chance(adk_sets, tmp_path):
    """CI scale: 1,536 images of 32 px with CTF, shifts and noise at 0 dB, 120 steps."""
    torch.manual_seed(0)
    cfg = {"train": {"seed": 0, "num_threads": 1,
                     "xrai_cryoem": {"steps": 120, "batch_size": 64, "shift_points": 3,
                                     "max_shift_A": 4.0, "memory_images": [512, 1536], "init_images": 256,
                                     "q_start_A": 20.0, "ramp_fraction": 0.7, "final_pad": 1,
                                     "encoder": False}},
           "evaluation": {"align_angular_step_deg": 30}}
    run = train_cryoem(cfg, "xrai", 0, adk_sets["train"], adk_sets["test"], tmp_path / "run0")
    metrics = evaluate_cryoem(run_dir=run, reference=adk_sets["reference"], train_data=adk_sets["train"],
                              test_data=adk_sets["test"], method="xrai", cfg=cfg)
    test = metrics["pose_error_test"]
    assert test["median_deg"] < 8.0  # chance: ~ 90 degrees (measured: 3.2)
    assert metrics["pose_error_train"]["median_deg"] < 8.0
    assert test["shift_error"]["median_A"] < 1.5
    assert metrics["resolution"]["0.5"]["A"] < 4 * 2 * PIXEL_A
    # the same metric on random poses is at chance: the assertions above can fail
    with ParticleDataset(adk_sets["test"]) as ds:
        R = torch.linalg.qr(torch.randn(len(ds), 3, 3, dtype=torch.float64))[0]
        R = R * torch.linalg.det(R).sign()[:, None, None]
        shifts = ds.true_shifts()
        chance = pose_metrics({"rotations": R, "shifts_A": shifts, "index": np.arange(len(ds))},
                              ds.true_rotations(), shifts, ds.pixel_size_A)
    assert chance["median_deg"] > 40.0


def test_shell_whitening_gives_every_shell_the_same_power(adk_sets):
    """Known answer: after the weight, the mean power of every non-empty Fourier shell is the same."""
    from xrai.recon.cryoem import CryoemSearchRecipe

    with ParticleDataset(adk_sets["train"]) as ds:
        recipe = CryoemSearchRecipe({"train": {"xrai_cryoem": {"init_images": 128, "encoder": False}}},
                                    CentralSliceImaging.for_dataset(ds, pad=1))
        recipe.initialise(ds)
        data = recipe._observations(ds.read(0, 128))
    power = data["spectrum"].abs().pow(2).mean(0)
    shells = torch.round(recipe.q / recipe.q[recipe.q > 0].min()).long().flatten()
    means = torch.stack([power[shells == s].mean() for s in range(1, int(shells.max()) + 1) if (shells == s).any()])
    raw = recipe.imaging.spectrum(ds.read(0, 128)["images"]).abs().pow(2).mean(0).flatten()
    raw_means = torch.stack([raw[shells == s].mean() for s in range(1, int(shells.max()) + 1) if (shells == s).any()])
    assert float(means.max() / means.min()) < 1.01
    assert float(raw_means.max() / raw_means.min()) > 10  # without it the low shells dominate
    with pytest.raises(ValueError, match="score_weighting"):
        with ParticleDataset(adk_sets["train"]) as ds:
            CryoemSearchRecipe({"train": {"xrai_cryoem": {"score_weighting": "bogus"}}},
                               CentralSliceImaging.for_dataset(ds, pad=1)).initialise(ds)


def test_training_noise_reaches_the_requested_snr_and_only_in_training(adk_sets):
    """``train_snr_db``: the training batches get white noise at that SNR (cryoPoseNet's definition, measured
    with the simulator's ``snr_db``); without it, and at inference, the images are used as recorded."""
    from xrai.cryoem.noise import snr_db
    from xrai.recon.cryoem import CryoemSearchRecipe

    with ParticleDataset(adk_sets["train"]) as ds:
        imaging = CentralSliceImaging.for_dataset(ds, pad=1)
        recipes = {db: CryoemSearchRecipe({"train": {"xrai_cryoem": {"encoder": False, "init_images": 128,
                                                                      "train_snr_db": db}}}, imaging)
                   for db in (None, 5.0)}
        for r in recipes.values():
            r.initialise(ds)
        batch = ds.read(0, 256)
    assert recipes[None].train_noise_sd is None
    assert recipes[None].with_training_noise(batch)["images"] is batch["images"]
    noisy = recipes[5.0].with_training_noise(batch)["images"]
    assert abs(snr_db(batch["images"], noisy - batch["images"]) - 5.0) < 0.3
    info = recipes[5.0].training_step(batch, 0)
    assert np.isfinite(info["q_limit_A"])
    R, t = recipes[5.0].infer(batch)
    assert R.shape == (256, 3, 3) and t.shape == (256, 2)


def test_multi_start_inference_keeps_the_best_refined_grid_candidate(adk_sets):
    """``infer_candidates``: the grid's best K pairs come sorted (the first is the single search's winner);
    refining each and keeping the best fit never places more images far off than refining the winner alone."""
    from xrai.recon.cryoem import CryoemSearchRecipe, fit_losses, shift_phases
    from xrai.rotations import angle_between

    with ParticleDataset(adk_sets["train"]) as ds, ParticleDataset(adk_sets["test"]) as test:
        imaging = CentralSliceImaging.for_dataset(ds, pad=1)
        recipe = CryoemSearchRecipe({"train": {"xrai_cryoem": {"encoder": False}}}, imaging)
        recipe.score_weight = recipe._shell_whitening(ds.read(0, 256))
        recipe.use_merge(known_pose_volume(ds, imaging)[1])
        batch = test.read(0, 96)
    q_limit = recipe.alignment_limit(recipe.s.steps)
    obs, ctf, k = recipe._subset(recipe._observations(batch), recipe._pixels(1 / 6.0, 512, torch.Generator().manual_seed(0)))
    R1, t1 = recipe.grid_search(obs, ctf, k, chunk=500)
    R4, t4 = recipe.grid_search(obs, ctf, k, chunk=500, top=4)
    assert R1.shape == (96, 1, 3, 3) and R4.shape == (96, 4, 3, 3) and t4.shape == (96, 4, 2)
    torch.testing.assert_close(R4[:, 0], R1[:, 0])
    torch.testing.assert_close(t4[:, 0], t1[:, 0])
    loss = fit_losses(obs[:, None] * shift_phases(k[:, :2], t4).conj(), ctf[:, None], recipe._slices(R4, k))
    assert bool((loss.diff(dim=1) >= -1e-4 * loss[:, :1]).all())  # best first

    truth = batch["rotations"].double()
    errors = {}
    for candidates in (1, 4):
        R, _ = recipe.align(batch, q_limit, generator=torch.Generator().manual_seed(1), candidates=candidates,
                            rot_steps=recipe.s.infer_refine_deg, shift_steps=recipe.s.infer_refine_shift_A)
        errors[candidates] = torch.rad2deg(angle_between(R.double(), truth))
    assert float(errors[4].median()) < 3.0
    assert int((errors[4] > 10).sum()) <= int((errors[1] > 10).sum())
    print(f"images > 10 deg off: {int((errors[1] > 10).sum())} (1 candidate), {int((errors[4] > 10).sum())} (4)")
    # a set without CTF (the weight, shared by every image, is not repeated per candidate)
    no_ctf = {key: v for key, v in batch.items() if key not in CTF_KEYS}
    R, t = recipe.align(no_ctf, q_limit, generator=torch.Generator().manual_seed(1), candidates=4, rot_steps=(2.0,))
    assert R.shape == (96, 3, 3) and t.shape == (96, 2) and bool(torch.isfinite(R).all())


def test_final_inference_scores_infer_pixels_and_training_refine_pixels(adk_sets, monkeypatch):
    """The final poses' refinement and candidate choice score ``infer_pixels`` random Fourier pixels each
    (a larger sample than the training steps' ``refine_pixels``: fewer noisy moves into a wrong minimum);
    the training steps keep ``refine_pixels``, and the grid search ``search_pixels``."""
    from xrai.recon.cryoem import CryoemSearchRecipe

    settings = {"encoder": False, "search_pixels": 64, "refine_pixels": 96, "infer_pixels": 160,
                "infer_candidates_until_deg": 0.0}
    with ParticleDataset(adk_sets["train"]) as ds:
        recipe = CryoemSearchRecipe({"train": {"xrai_cryoem": settings}}, CentralSliceImaging.for_dataset(ds, pad=1))
        recipe.initialise(ds)
        batch = ds.read(0, 32)
    counts: list[int] = []
    sample = recipe._pixels
    monkeypatch.setattr(recipe, "_pixels", lambda q, count, gen: counts.append(count) or sample(q, count, gen))
    recipe.training_step(batch, 0)
    assert set(counts) == {64, 96}
    counts.clear()
    R, t = recipe.infer(batch)
    assert set(counts) == {64, 160} and counts.count(160) == len(recipe.s.infer_refine_deg) + 2
    assert R.shape == (32, 3, 3) and bool(torch.isfinite(t).all())


def test_fast_default_resumes_after_sigterm_to_the_same_result(adk_sets, tmp_path, caplog):
    """A SIGTERM half-way (as at a Slurm time limit) writes the checkpoint and exits 128 + 15; the rerun
    resumes and ends bit for bit where an uninterrupted run ends (CPU); a changed inference setting resumes
    from the finished steps; another config starts afresh."""
    import copy
    import logging
    import os
    import signal

    import h5py

    from xrai.io import read_mrc
    from xrai.recon.checkpoint import TrainingInterrupted

    settings = {"steps": 8, "batch_size": 64, "shift_points": 3, "max_shift_A": 4.0, "init_images": 128,
                "final_pad": 1, "train_snr_db": 5.0, "infer_candidates": 1, "infer_refine_deg": [2.0],
                "infer_refine_shift_A": [0.5]}
    cfg = {"train": {"seed": 0, "num_threads": 1, "checkpoint_every": 3, "xrai_cryoem": settings}}

    def run(out, config, **kw):
        return train_cryoem(copy.deepcopy(config), "xrai", 0, adk_sets["train"], adk_sets["test"], out, **kw)

    def kill_at_5(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    straight, resumed = run(tmp_path / "straight", cfg), tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted) as info:
        run(resumed, cfg, step_callback=kill_at_5)
    assert info.value.code == 128 + signal.SIGTERM
    assert not (resumed / "volume.mrc").exists()
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["step"] == 5
    with caplog.at_level(logging.INFO, logger="xrai.recon.cryoem_train"):
        run(resumed, cfg)
    assert any("resumed from" in r.getMessage() and "at step 5" in r.getMessage() for r in caplog.records)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for key in ("num", "den"):
        torch.testing.assert_close(a["recipe"]["merge"][key], b["recipe"]["merge"][key], atol=0, rtol=0)
    for key in a["recipe"]["encoder"]:
        torch.testing.assert_close(a["recipe"]["encoder"][key], b["recipe"]["encoder"][key], atol=0, rtol=0)
    for name in ("poses_train.h5", "poses_test.h5"):
        with h5py.File(straight / name) as fa, h5py.File(resumed / name) as fb:
            for key in ("rotations", "shifts_A", "index"):
                np.testing.assert_array_equal(fa[key][...], fb[key][...], err_msg=f"{name}:{key}")
    np.testing.assert_array_equal(read_mrc(straight / "volume.mrc")[0], read_mrc(resumed / "volume.mrc")[0])

    from dataclasses import fields

    from xrai.recon.cryoem import CryoemSearchSettings

    assert set(CryoemSearchSettings.POST_TRAINING) <= {f.name for f in fields(CryoemSearchSettings)}
    inference_only = copy.deepcopy(cfg)  # a change of an inference setting reruns only the inference
    inference_only["train"]["xrai_cryoem"]["infer_refine_repeats"] = 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(straight, inference_only)
    messages = [r.getMessage() for r in caplog.records]
    assert any("resumed from" in m and "at step 8" in m for m in messages)
    assert not any("starting afresh" in m for m in messages)

    other = copy.deepcopy(cfg)
    other["train"]["xrai_cryoem"]["search_pixels"] = 256
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xrai.recon.checkpoint"):
        run(resumed, other)
    lines = [r.getMessage() for r in caplog.records if "starting afresh" in r.getMessage()]
    assert len(lines) == 1 and "xrai_cryoem.search_pixels" in lines[0]
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["info"]["config"]["xrai_cryoem"]["search_pixels"] == 256


def test_pose_inference_over_a_set_reports_progress_and_keeps_the_order(adk_sets, caplog):
    import logging

    from xrai.recon.cryoem_outputs import INFER_BATCH, infer_all

    with ParticleDataset(adk_sets["train"]) as ds, caplog.at_level(logging.INFO, logger="xrai.recon.cryoem_outputs"):
        R, t, idx, branch = infer_all(ds, lambda b: (torch.eye(3).expand(len(b["index"]), 3, 3), b["shifts_A"]),
                                      log_every_s=0.0)
        assert np.array_equal(idx, np.arange(len(ds))) and R.shape == (len(ds), 3, 3)
        np.testing.assert_allclose(t, ds.true_shifts(), rtol=1e-6)
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert len(lines) == -(-len(idx) // INFER_BATCH) - 1 and f"{INFER_BATCH} / {len(idx)} images" in lines[0]


def test_multi_start_until_a_step_refines_only_the_winner_finely(adk_sets, monkeypatch):
    """``infer_candidates_until_deg``: the candidates take the rotation steps of at least that size on
    ``refine_pixels``, the winner is chosen on ``infer_pixels`` and alone takes the finer steps on them."""
    from xrai.recon.cryoem import CryoemSearchRecipe

    settings = {"encoder": False, "search_pixels": 64, "refine_pixels": 96, "infer_pixels": 160,
                "infer_candidates": 3, "infer_candidates_until_deg": 1.0, "infer_refine_deg": [2.0, 1.0, 0.5, 0.25]}
    with ParticleDataset(adk_sets["train"]) as ds:
        recipe = CryoemSearchRecipe({"train": {"xrai_cryoem": settings}}, CentralSliceImaging.for_dataset(ds, pad=1))
        recipe.initialise(ds)
        batch = ds.read(0, 32)
    calls: list[tuple[int, int]] = []
    refine = recipe.refine
    monkeypatch.setattr(recipe, "refine", lambda data, q, R, t, rot, shift, gen, pixels=None, repeats=None: calls.append(
        (len(R), len(rot), pixels)) or refine(data, q, R, t, rot, shift, gen, pixels, repeats))
    R, t = recipe.infer(batch)
    assert calls == [(96, 2, None), (32, 2, 160)]  # 3 candidates x 32 images to 1 deg; the winners to 0.25 deg
    assert R.shape == (32, 3, 3) and bool(torch.isfinite(t).all())


def test_pattern_search_needs_a_move_per_axis_and_the_final_poses_make_them(adk_sets, monkeypatch):
    """One pattern-search move turns about one axis: from a pose off by 1.125° (a sum of the steps) about x, y and z, one move per
    step stays ~1° off, three reach the exact optimum (spectra made from the recipe's own slices, so the
    misfit's minimum is the true pose). The final poses make ``infer_refine_repeats`` moves per step, the
    training steps ``refine_repeats``."""
    import math

    import xrai.recon.cryoem as cryoem
    from xrai.recon.cryoem import CryoemSearchRecipe
    from xrai.rotations import angle_between, axis_angle_to_matrix

    settings = {"encoder": False, "infer_candidates": 1, "infer_refine_deg": [2.0, 1.0], "infer_refine_repeats": 3}
    with ParticleDataset(adk_sets["train"]) as ds:
        recipe = CryoemSearchRecipe({"train": {"xrai_cryoem": settings}}, CentralSliceImaging.for_dataset(ds, pad=1))
        recipe.initialise(ds)
        batch = ds.read(0, 32)
    truth = batch["rotations"].float()
    data = recipe._observations(batch)
    data["spectrum"] = recipe._slices(truth, data["k"]) * data["ctf"]  # the model itself, at the true poses
    off = torch.eye(3, dtype=torch.float64)
    for axis in torch.eye(3, dtype=torch.float64):
        off = off @ axis_angle_to_matrix(axis[None], torch.tensor([math.radians(1.125)], dtype=torch.float64))[0]
    errors = {}
    for repeats in (1, 3):
        R, _ = recipe.refine(data, recipe.q_nyquist, truth @ off.float(), torch.zeros(32, 2), (1.0, 0.5, 0.25, 0.125),
                             (), torch.Generator().manual_seed(1), 256, repeats)
        errors[repeats] = torch.rad2deg(angle_between(R.double(), truth.double()))
    assert float(errors[1].median()) > 0.5
    assert float(errors[3].max()) < 0.05, errors[3]

    moves: list[float] = []
    pattern_moves = cryoem.pattern_moves
    monkeypatch.setattr(cryoem, "pattern_moves", lambda step: moves.append(step) or pattern_moves(step))
    recipe.training_step(batch, 0)
    assert moves == list(recipe.s.refine_deg)  # refine_repeats 1
    moves.clear()
    recipe.infer(batch)
    assert moves == [2.0] * 3 + [1.0] * 3
