"""cryoAI on cryo-EM particle sets: its forward model, the pi-branch bookkeeping, training, the checkpointed loop.

Sets: tests/cryoem_sets.py (4AKE at 32 px, 3.2 Å, CTF and origins); a noise-free one for the
forward model, the 0 dB ``adk_sets`` (conftest.py) for the loop. Models are shrunk (the paper's
widths are the defaults) so that every test takes seconds on one thread.
"""

from __future__ import annotations

import copy
import logging
import os
import signal

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from xrai.cryoem.imaging import CentralSliceImaging
from xrai.data.star import ParticleDataset
from xrai.errors import XraiError
from xrai.fourier import fourier_volume, sample_fourier
from xrai.recon.checkpoint import TrainingInterrupted
from xrai.recon.cryoai import CryoAIRecipe
from xrai.recon.cryoem_train import train_cryoem
from xrai.recon.losses import rotate_pi_centred
from xrai.rotations import RZ_PI

TINY = {"batch_size": 16, "channels": [4, 8, 8, 8, 8], "mlp": [16], "num_octaves": 2, "width": 16,
        "envelope_layers": 1, "modulant_layers": 1, "lr_encoder": 1e-3, "lr_decoder": 1e-3}


def _cfg(steps: int = 8, **cryoai) -> dict:
    return {"train": {"seed": 0, "num_threads": 1, "steps": steps, "log_every": 2, "checkpoint_every": 100,
                      "device": "cpu", "cryoai": TINY | cryoai},
            "evaluation": {"align_angular_step_deg": 30}}


@pytest.fixture(scope="module")
def clean_adk(tmp_path_factory, pdb_mirror) -> dict:
    """4AKE without noise: 64 train / 32 test images (the forward model must reproduce them)."""
    import cryoem_sets

    from xrai.cryoem.potential import potential_from_file

    vol = potential_from_file(pdb_mirror / "4ake.pdb", cryoem_sets.BOX, cryoem_sets.PIXEL_A, cryoem_sets.BFACTOR)
    return cryoem_sets.particle_sets(tmp_path_factory.mktemp("clean_adk"), vol, np.random.default_rng(5),
                                     snr_db=None, sizes=(64, 32))


class ReferenceDecoder(nn.Module):
    """The reference potential's transform read trilinearly: a decoder that knows the answer."""

    def __init__(self, volume_xyz: np.ndarray, pixel_size_A: float) -> None:
        super().__init__()
        self.spectrum, self.grid = fourier_volume(torch.from_numpy(np.asarray(volume_xyz)), pixel_size_A, pad=2)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return sample_fourier(self.spectrum, k, self.grid)


def _recipe_with_reference(sets: dict, ds: ParticleDataset) -> CryoAIRecipe:
    recipe = CryoAIRecipe(_cfg(), CentralSliceImaging.for_dataset(ds), seed=0)
    recipe.model.decoder = ReferenceDecoder(sets["volume_xyz"], ds.pixel_size_A)
    return recipe


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).double()


def test_forward_model_at_the_true_pose_and_origin_reproduces_the_images(clean_adk):
    with ParticleDataset(clean_adk["train"]) as ds:
        batch = ds.read(0, 32)
    recipe = _recipe_with_reference(clean_adk, ds)
    with torch.no_grad():
        at_truth = recipe.render(batch["rotations"], batch["shifts_A"], batch)
        err = _relative_error(at_truth, batch["images"])
        # measured median ~0.02 (the model's slice is on the unpadded L x L grid, the simulator's on 2L)
        assert float(err.median()) < 0.1
        # the same forward model with a wrong origin or a wrong pose does not fit: the assertion can fail
        off = _relative_error(recipe.render(batch["rotations"], batch["shifts_A"] + 3.2, batch), batch["images"])
        wrong = _relative_error(recipe.render(batch["rotations"].flip(0), batch["shifts_A"], batch), batch["images"])
        assert float(off.median()) > 0.5 and float(wrong.median()) > 0.5


def test_pi_rotated_image_has_the_complementary_pose_and_negated_origin(clean_adk):
    with ParticleDataset(clean_adk["train"]) as ds:
        batch = ds.read(0, 16)
    imaging = CentralSliceImaging.for_dataset(ds)
    x = batch["images"]
    # a rotation about the phase origin conjugates the spectrum exactly (rot90 alone does not for even N)
    torch.testing.assert_close(imaging.spectrum(rotate_pi_centred(x)), imaging.spectrum(x).conj(), atol=1e-3, rtol=0)
    recipe = _recipe_with_reference(clean_adk, ds)
    R, t = batch["rotations"], batch["shifts_A"]
    with torch.no_grad():
        rendered = recipe.render(R @ RZ_PI.float(), -t, batch)
    assert float(_relative_error(rendered, rotate_pi_centred(x)).median()) < 0.1

    # the symmetrized loss's bookkeeping: an encoder right on one branch only, the other branch at a wrong pose
    g = torch.Generator().manual_seed(0)
    R_wrong = torch.linalg.qr(torch.randn(len(x), 3, 3, generator=g))[0]
    R_wrong = R_wrong * torch.linalg.det(R_wrong).sign()[:, None, None]
    t_wrong = torch.randn(len(x), 2, generator=g) * 3
    for right_branch in (0, 1):
        def encode(images, right_branch=right_branch):
            right = (R, t) if right_branch == 0 else (R @ RZ_PI.float(), -t)
            halves = [right, (R_wrong, t_wrong)] if right_branch == 0 else [(R_wrong, t_wrong), right]
            return torch.cat([halves[0][0], halves[1][0]]), torch.cat([halves[0][1], halves[1][1]])

        recipe.model.encode = encode
        R_out, t_out, branch = recipe.infer(batch)
        assert branch.tolist() == [right_branch] * len(x)
        torch.testing.assert_close(R_out, R, atol=1e-5, rtol=0)
        torch.testing.assert_close(t_out, t, atol=1e-5, rtol=0)


def test_a_few_steps_lower_the_loss(adk_sets):
    torch.manual_seed(0)
    with ParticleDataset(adk_sets["train"]) as ds:
        recipe = CryoAIRecipe(_cfg(), CentralSliceImaging.for_dataset(ds), seed=0)
        optimizer = recipe.build_optimizer()
        recipe.prepare(ds)
        fixed = ds.read(0, 32)
        batches = list(ds.iter_batches(16, shuffle=True, seed=0))[:15]

    def loss() -> float:
        with torch.no_grad():
            return float(recipe.loss(fixed)[0].loss / recipe.model.loss_unit)

    before = loss()
    for step, b in enumerate(batches):
        info = recipe.training_step(b, optimizer, step)
        assert np.isfinite(info["loss"])
    after = loss()
    assert after < 0.8 * before, (before, after)  # measured: ~6 -> ~1.1


def _run(adk_sets, out, cfg, **kw):
    return train_cryoem(copy.deepcopy(cfg), "cryoai", 0, adk_sets["train"], adk_sets["test"], out, **kw)


def test_loop_writes_outputs_and_resumes_to_the_same_result(adk_sets, tmp_path, caplog):
    from xrai.evaluation.cryoem import evaluate_cryoem
    from xrai.io import read_mrc

    cfg = _cfg(steps=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(adk_sets, straight, cfg)
    for name in ("volume.mrc", "poses_train.h5", "poses_test.h5", "metrics.csv", "timing.json", "config.yaml",
                 "provenance.json", "checkpoint.pt"):
        assert (straight / name).is_file(), name
    assert not (straight / "half_fsc.json").exists()
    volume, voxel = read_mrc(straight / "volume.mrc")
    assert volume.shape == (32, 32, 32) and np.isfinite(volume).all() and volume.std() > 0
    assert voxel == pytest.approx(3.2)

    def kill_at_5(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        _run(adk_sets, resumed, cfg, step_callback=kill_at_5)
    assert info.value.code == 128 + signal.SIGTERM
    assert not (resumed / "volume.mrc").exists()  # outputs come only at the end
    _run(adk_sets, resumed, cfg)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=0, rtol=0, msg=key)
    assert [r["loss"] for r in a["metrics"]] == [r["loss"] for r in b["metrics"]]
    for name in ("poses_train.h5", "poses_test.h5"):
        with h5py.File(straight / name) as fa, h5py.File(resumed / name) as fb:
            assert fa.attrs["source"] == "encoder"
            for key in ("rotations", "shifts_A", "branch", "index"):
                np.testing.assert_array_equal(fa[key][...], fb[key][...], err_msg=f"{name}:{key}")
    np.testing.assert_array_equal(read_mrc(straight / "volume.mrc")[0], read_mrc(resumed / "volume.mrc")[0])
    metrics = evaluate_cryoem(run_dir=straight, reference=adk_sets["reference"], train_data=adk_sets["train"],
                              test_data=adk_sets["test"], method="cryoai", cfg=cfg)
    assert 0 <= metrics["pose_error_test"]["median_deg"] <= 180 and "shift_error" in metrics["pose_error_test"]

    # another config: one line says why, and the run starts from step 0 (it ends with its own info)
    other = _cfg(steps=8, lr_decoder=2e-3)
    with caplog.at_level(logging.WARNING, logger="xrai.recon.checkpoint"):
        _run(adk_sets, resumed, other)
    lines = [r.getMessage() for r in caplog.records if "starting afresh" in r.getMessage()]
    assert len(lines) == 1 and "cryoai.lr_decoder 0.001 -> 0.002" in lines[0]
    c = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert c["info"]["config"]["cryoai"]["lr_decoder"] == 2e-3
    assert [r["loss"] for r in c["metrics"]] != [r["loss"] for r in b["metrics"]]  # trained again, not kept

    (resumed / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(XraiError, match="not a readable xrai checkpoint"):
        _run(adk_sets, resumed, cfg)
