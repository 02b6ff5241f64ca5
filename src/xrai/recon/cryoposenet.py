"""cryoPoseNet (Nashed et al. 2021): a CNN pose encoder and an explicit voxel volume, trained end to end.

The paper's method (``/work/shared/papers/cryoposenet.txt``, section 3), on RELION particle sets:

* **encoder** (:class:`CryoPoseNetEncoder`): ``conv3x3 -> conv3x3 -> maxpool2`` repeated three
  times with 32, 64, 128 filters, then an MLP of two layers of 512 units and the paper's
  ``s2s2`` output: two 3-vectors orthonormalised, the third their cross product
  (:func:`xrai.rotations.sixd_to_matrix`). ReLU activations (the paper names none).
* **decoder**: an explicit real-space voxel volume ``x`` (N³, ``[x, y, z]``, origin at N // 2),
  initialised uniformly at random, projected at the predicted pose, multiplied by the known
  CTF and shifted by the known origin (cryoPoseNet estimates no shifts: ``estimates_shifts``
  is False and :meth:`CryoPoseNetRecipe.infer` returns the given ones).
  Two differentiable projectors of the same image (:func:`project`):

  - ``fourier`` (the paper's decoder, default): the 3D transform of ``x`` once per batch
    (:func:`xrai.fourier.fourier_volume`), central slices read trilinearly at each pose
    (:func:`xrai.fourier.sample_fourier`), CTF × shift phase
    (:meth:`xrai.cryoem.imaging.CentralSliceImaging.form_image`), inverse 2D transform;
  - ``real_space`` (the paper's simulator): ``V(R r)`` resampled trilinearly on the rotated
    grid and summed along z (:meth:`~xrai.cryoem.imaging.CentralSliceImaging.real_space_projection`), then CTF
    and shift in Fourier space.

* **loss** (equation 11): the squared L2 distance between each image and its prediction in
  real space, summed over pixels, averaged over the batch (no symmetrisation: the paper has none).
* **optimiser**: one Adam (lr 5e-4) over the encoder and the volume, batch 32, 10,000 steps.

Units: the volume's parameter is dimensionless; :meth:`CryoPoseNetRecipe.prepare` sets the
buffer ``volume_scale`` so that voxels uniform in [0, 1) project to the images' rms (the start
is uniform in [0, ``init_amplitude``): its projections are ``init_amplitude`` of the data), and
``image_scale`` (the images' rms) standardises the encoder's input, so the paper's learning
rate applies whatever the units of the data.

Usage::

    from xrai.cryoem.imaging import CentralSliceImaging
    recipe = CryoPoseNetRecipe(cfg, CentralSliceImaging.for_dataset(train_ds), seed=0)
    recipe.prepare(train_ds)
    optimizer = recipe.build_optimizer()
    for step, batch in enumerate(train_ds.iter_batches(recipe.batch_size, shuffle=True, drop_last=True)):
        info = recipe.training_step(batch, optimizer, step)       # {"loss": ...}
    R, origins_A, branch = recipe.infer(batch)
    volume_xyz = recipe.volume()

    # or the whole run, checkpointed, with its outputs (xrai train --method cryoposenet on a .star set):
    from xrai.recon.cryoem_train import train_cryoem
    train_cryoem(cfg, "cryoposenet", 0, "train.star", "test.star", "out/run0")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xrai.config import settings_from_section
from xrai.errors import XraiError
from xrai.fourier import fourier_volume, sample_fourier
from xrai.imaging import ImagingModel
from xrai.recon.cryoem_gradient import CryoemGradientRecipe
from xrai.rotations import sixd_to_matrix

logger = logging.getLogger(__name__)

PROJECTORS = ("fourier", "real_space")


# --------------------------------------------------------------------------- settings


@dataclass
class CryoPoseNetSettings:
    """Knobs of cryoPoseNet (config ``train.cryoposenet``); the defaults are the paper's (section 3).

    ``steps`` (default ``train.steps``; the paper: 10,000), ``batch_size`` (the paper's 32) and ``pad``
    (the imaging model's Fourier padding, default 2) are the loop's
    (:class:`xrai.recon.cryoem_gradient.CryoemGradientRecipe`).
    """

    lr: float = 5e-4
    channels: tuple[int, ...] = (32, 64, 128)
    mlp: tuple[int, ...] = (512, 512)
    projector: str = "fourier"
    fourier_pad: int = 2
    init_amplitude: float = 0.1
    prepare_images: int = 256

    @classmethod
    def from_config(cls, cfg: dict) -> CryoPoseNetSettings:
        """``train.cryoposenet`` over the defaults (keys of the loop's aside)."""
        section = dict((cfg.get("train") or {}).get("cryoposenet") or {})
        out = settings_from_section(cls, section)
        if out.projector not in PROJECTORS:
            raise XraiError(f"config key 'train.cryoposenet.projector': expected one of {PROJECTORS}, got {out.projector!r}")
        if len(out.channels) < 1 or out.fourier_pad < 1:
            raise XraiError("config key 'train.cryoposenet': need at least one conv block and fourier_pad >= 1")
        return out


# --------------------------------------------------------------------------- the model


class CryoPoseNetEncoder(nn.Module):
    """Image (B, N, N) -> rotation (B, 3, 3): (conv3x3-ReLU-conv3x3-ReLU-maxpool2) × len(channels), MLP, s2s2."""

    def __init__(self, image_size: int, channels: Sequence[int] = (32, 64, 128), mlp: Sequence[int] = (512, 512)) -> None:
        super().__init__()
        n = int(image_size)
        if n < 2 ** len(channels):
            raise XraiError(f"cryoPoseNet's encoder halves the image {len(channels)} times; {n} px is too small")
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in, n = c, n // 2
        self.cnn = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        f_in = c_in * n * n
        for f in mlp:
            head += [nn.Linear(f_in, f), nn.ReLU(inplace=True)]
            f_in = f
        head.append(nn.Linear(f_in, 6))  # s2s2: two 3-vectors
        self.mlp = nn.Sequential(*head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised images (B, N, N) -> xrai poses (B, 3, 3)."""
        return sixd_to_matrix(self.mlp(self.cnn(images[:, None])))


class CryoPoseNetModel(nn.Module):
    """Every learnable piece and buffer of cryoPoseNet: the encoder, the voxel volume and the two data scales."""

    def __init__(self, image_size: int, channels: Sequence[int], mlp: Sequence[int], init_amplitude: float = 0.1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.encoder = CryoPoseNetEncoder(image_size, channels, mlp)
        n = int(image_size)
        # the paper's start: uniform random voxels (Algorithm 1), in [0, init_amplitude)
        self.voxels = nn.Parameter(float(init_amplitude) * torch.rand(n, n, n, generator=generator))
        self.register_buffer("volume_scale", torch.tensor(1.0))
        self.register_buffer("image_scale", torch.tensor(1.0))

    def potential(self) -> torch.Tensor:
        """The volume ``[x, y, z]`` in the images' units (differentiable)."""
        return self.voxels * self.volume_scale

    def poses(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder poses (B, 3, 3) of raw images (B, N, N)."""
        return self.encoder(images.float() / self.image_scale)


def project(volume_xyz: torch.Tensor, R: torch.Tensor, imaging: ImagingModel, batch: dict | None = None,
            projector: str = "fourier", fourier_pad: int = 2) -> torch.Tensor:
    """Images (B, N, N) of the real-space volume ``[x, y, z]`` at xrai poses ``R`` (B, 3, 3), with the batch's
    CTF and shifts when it has them (:meth:`CentralSliceImaging.form_image`). Differentiable in both.

    ``projector``: ``fourier`` (the paper's decoder: trilinear central slices of the transform
    of the volume zero-padded ``fourier_pad`` times) or ``real_space`` (``V(R r)`` resampled
    trilinearly and summed along z, the paper's simulator).
    """
    if projector == "fourier":
        spectrum, grid = fourier_volume(volume_xyz, imaging.pixel_size_A, pad=fourier_pad)
        values = sample_fourier(spectrum, imaging.coordinates(R.float()), grid)
    elif projector == "real_space":
        values = imaging.spectrum(imaging.real_space_projection(volume_xyz, R))
    else:
        raise XraiError(f"config key 'train.cryoposenet.projector': expected one of {PROJECTORS}, got {projector!r}")
    return imaging.to_images(imaging.form_image(values, batch))


# --------------------------------------------------------------------------- the recipe


class CryoPoseNetRecipe(CryoemGradientRecipe):
    """cryoPoseNet on a cryo-EM particle set (this module's docstring): poses from the encoder, true shifts."""

    name: str = "cryoposenet"
    estimates_shifts: bool = False
    default_batch_size: int = 32  # the paper's

    def __init__(self, cfg: dict, imaging: ImagingModel, seed: int) -> None:
        super().__init__(cfg, imaging, seed)
        self.s = CryoPoseNetSettings.from_config(cfg)
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # the encoder's default initialisation
        self.model: CryoPoseNetModel = CryoPoseNetModel(imaging.size, self.s.channels, self.s.mlp,
                                                        self.s.init_amplitude, generator=gen)
        logger.info("cryoPoseNet: %d px, %s projector, encoder %d parameters, volume %d voxels", imaging.size,
                    self.s.projector, sum(p.numel() for p in self.model.encoder.parameters()), self.model.voxels.numel())

    @classmethod
    def imaging_pad(cls, cfg: dict) -> int:
        """``train.cryoposenet.pad``, default 2: the CTF on the 2x padded grid, as the simulator (and the paper's) filter."""
        return int(((cfg.get("train") or {}).get(cls.section_name()) or {}).get("pad", 2))

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The paper's optimiser: one Adam over the encoder weights and the voxels."""
        return torch.optim.Adam(self.model.parameters(), lr=self.s.lr)

    def render(self, R: torch.Tensor, batch: dict | None) -> torch.Tensor:
        """Predicted images (B, N, N) of the current volume at poses ``R``, with the batch's CTF and true shifts."""
        return project(self.model.potential(), R, self.imaging, batch, self.s.projector, self.s.fourier_pad)

    @torch.no_grad()
    def prepare(self, dataset: Any) -> None:
        """The data's scales: ``image_scale`` (images' rms) and ``volume_scale`` (voxels uniform in [0, 1) project to it)."""
        n = min(len(dataset), self.s.prepare_images)
        if n < 1:
            raise XraiError(f"{getattr(dataset, 'path', dataset)}: no particle images to train cryoPoseNet on")
        batch = dataset.read(0, n)
        images = batch["images"].float()
        rms = float(images.pow(2).mean().sqrt())
        if not rms > 0:
            raise XraiError(f"{getattr(dataset, 'path', dataset)}: the particle images are all zero")
        gen = torch.Generator().manual_seed(self.seed + 1)
        device = self.model.voxels.device
        R = sixd_to_matrix(torch.randn(min(n, 32), 6, generator=gen)).to(device)
        sub = {k: v[:len(R)].to(device) if k != "index" else v[:len(R)] for k, v in batch.items()}
        self.model.volume_scale.fill_(1.0 / self.s.init_amplitude)  # the start, seen as voxels in [0, 1)
        pred_rms = float(self.render(R, sub).pow(2).mean().sqrt())
        self.model.image_scale.fill_(rms)
        self.model.volume_scale.fill_(rms / max(pred_rms, 1e-30))
        logger.info("cryoPoseNet scales: images rms %.4g, volume x %.4g", rms, float(self.model.volume_scale))

    def loss(self, batch: dict) -> torch.Tensor:
        """Equation 11: ``||y - H_E(y) x||²`` per image (summed over pixels), averaged over the batch."""
        images = batch["images"].float()
        pred = self.render(self.model.poses(images), batch)
        return (pred - images).pow(2).sum(dim=(-2, -1)).mean()

    def training_step(self, batch: dict, optimizer: torch.optim.Optimizer, step: int) -> dict:
        """One Adam step of the encoder and the volume on ``batch``."""
        self.model.train()
        with torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(batch)
            loss.backward()
            optimizer.step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def infer(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder poses (B, 3, 3), the batch's true origins (B, 2) in Å (given, not estimated), branch 0 (no flip)."""
        self.model.eval()
        R = self.model.poses(batch["images"])
        b = len(R)
        shifts = batch["shifts_A"].float() if "shifts_A" in batch else torch.zeros(b, 2, device=R.device)
        return R, shifts, torch.zeros(b, dtype=torch.int8, device=R.device)

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        """The voxel volume ``[x, y, z]`` (N³, origin at N // 2) in the images' units."""
        return self.model.potential().detach().clone()
