"""cryoAI (Levy et al. 2022) on cryo-EM particle sets: amortized pose and shift, FourierNet volume, symmetrized loss.

As the paper (sections 3.2-3.5) describes:

* encoder: the image (standardised per image) through a Gaussian pyramid and a VGG16-like CNN
  (:class:`xrai.recon.models.VGGEncoder`: its pyramid, CNN and MLP give the rotation through
  the 6D representation, :func:`xrai.rotations.sixd_to_matrix`), and a second fully connected
  head of the same widths on the same features giving the 2D translation (RELION origin, in
  pixels times the pixel size; zero at initialisation);
* decoder: a FourierNet (:class:`xrai.recon.models.FourierNet` with ``hermitian=True``) queried
  at the rotated central slice ``imaging.coordinates(R)``; its complex value times the CTF
  times the phase of the *predicted* origin (``imaging.form_image``) is the predicted image
  (the true origins are never used);
* loss: the symmetrized L2 (equation 10; :func:`xrai.recon.losses.symmetrized_l2`): each image
  and its in-plane pi rotation about the phase origin (:func:`rotate_pi_centred`) go through
  the whole autoencoder, the better branch is kept. When the rotated image won with
  ``(R', t')``, the image's pose is ``R' @ RZ_PI`` and its origin ``-t'``.
* optimizer: Adam, separate learning rates for the encoder and the decoder.

Fourier space, not Hartley space: the paper's text queries FourierNet for complex Fourier
coefficients with ``V(-k) = conj(V(k))`` enforced by folding ``k_x < 0`` (its equations 7-9); its
released code used Hartley space. We follow the text because the project's imaging model
(:class:`xrai.cryoem.imaging.CentralSliceImaging`) forms and compares complex rfft spectra:
a shift phase mixes ``H(k)`` and ``H(-k)`` of a Hartley volume, so Hartley would need two
queries per pixel where Fourier needs one. The L2 is taken on the real-space images, which
at ``pad: 1`` (the paper's L x L slice) equals the Fourier-space L2 up to a constant (Parseval).

Defaults (``train.cryoai``, config.schema.yaml) are the paper's: batch 32 (its figure 5), a
4-octave pyramid, VGG channels 64-128-256-256-256 and MLP 512-256 (its supplement, as
``models.VGGEncoder``), FourierNet width 256 with 3 + 2 hidden layers (about the 300k
parameters of its ablation). The learning rates (1e-4 both) are not in the paper's text;
1e-4 is the X-RAI paper's, which forked cryoAI's code. On a CPU these are slow: configs shrink them.

Usage::

    from xrai.recon.cryoai import CryoAIRecipe
    recipe = CryoAIRecipe(cfg, CentralSliceImaging.for_dataset(ds), seed=0)
    optimizer = recipe.build_optimizer()
    recipe.prepare(ds)
    recipe.training_step(batch, optimizer, 0)          # batch: ParticleDataset keys
    R, origins_A, branch = recipe.infer(batch)
    volume_xyz = recipe.volume()
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xrai.config import settings_from_section
from xrai.fourier import real_volume
from xrai.imaging import ImagingModel
from xrai.recon.cryoem_gradient import CryoemGradientRecipe
from xrai.recon.losses import SymmetrizedLoss, plain_l2, rotate_pi_centred, symmetrized_l2
from xrai.recon.models import FourierNet, VGGEncoder
from xrai.rotations import sixd_to_matrix

logger = logging.getLogger(__name__)

#: images read by :meth:`CryoAIRecipe.prepare` to set the decoder's output unit and the loss unit
PREPARE_IMAGES = 1024
#: batch keys that are not per-image imaging parameters (the rest is repeated for the pi branch)
_NOT_IMAGING = ("images", "rotations", "shifts_A", "index")


@dataclass
class CryoAISettings:
    """``train.cryoai`` (config.schema.yaml); the defaults are the paper's."""

    batch_size: int = 32
    lr_encoder: float = 1e-4
    lr_decoder: float = 1e-4
    channels: tuple[int, ...] = (64, 128, 256, 256, 256)
    mlp: tuple[int, ...] = (512, 256)
    num_octaves: int = 4
    kernel_size: int = 11
    width: int = 256
    envelope_layers: int = 3
    modulant_layers: int = 2
    omega0_envelope: float = 30.0
    omega0_modulant: float = 40.0
    symmetrized: bool = True
    pad: int = 1

    @classmethod
    def from_section(cls, section: dict) -> CryoAISettings:
        return settings_from_section(cls, section)


def _mlp(f_in: int, hidden: Sequence[int], f_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for f in hidden:
        layers += [nn.Linear(f_in, f), nn.ReLU(inplace=True)]
        f_in = f
    layers.append(nn.Linear(f_in, f_out))
    return nn.Sequential(*layers)


class CryoAIModel(nn.Module):
    """Encoder (rotation and translation heads on shared VGG features) and the Hermitian FourierNet.

    Buffers: ``decoder.scale`` (the output unit) and ``loss_unit`` (mean image power), set by
    :meth:`CryoAIRecipe.prepare`.
    """

    def __init__(self, image_shape: tuple[int, int], s: CryoAISettings, q_max: float, pixel_size_A: float) -> None:
        super().__init__()
        self.encoder = VGGEncoder(image_shape, channels=s.channels, mlp=s.mlp, num_octaves=s.num_octaves,
                                  kernel_size=s.kernel_size)
        features = self.encoder.mlp[1].in_features  # mlp = Flatten, Linear(features, ...), ...
        self.shift_head = nn.Sequential(nn.Flatten(), *_mlp(features, s.mlp, 2))
        nn.init.zeros_(self.shift_head[-1].weight)
        nn.init.zeros_(self.shift_head[-1].bias)
        self.decoder = FourierNet(q_max, width=s.width, envelope_layers=s.envelope_layers,
                                  modulant_layers=s.modulant_layers, omega0_envelope=s.omega0_envelope,
                                  omega0_modulant=s.omega0_modulant, hermitian=True)
        self.pixel_size_A = float(pixel_size_A)
        self.register_buffer("loss_unit", torch.tensor(1.0))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, N, N) -> xrai poses (B, 3, 3) and RELION origins (B, 2) in Å."""
        x = images - images.mean(dim=(-2, -1), keepdim=True)
        x = x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # the data's scale is arbitrary
        feat = self.encoder.cnn(self.encoder.pyramid(x[:, None]))
        return sixd_to_matrix(self.encoder.mlp(feat)), self.shift_head(feat) * self.pixel_size_A


class CryoAIRecipe(CryoemGradientRecipe):
    """cryoAI (this module's docstring): amortized rotation and shift, FourierNet, symmetrized L2."""

    name = "cryoai"
    estimates_shifts = True
    default_batch_size = CryoAISettings.batch_size

    def __init__(self, cfg: dict, imaging: ImagingModel, seed: int) -> None:
        super().__init__(cfg, imaging, seed)
        self.s = CryoAISettings.from_section(self.settings)
        self.model = CryoAIModel(imaging.image_shape, self.s, imaging.q_max, imaging.pixel_size_A)

    def build_optimizer(self) -> torch.optim.Optimizer:
        m = self.model
        return torch.optim.Adam([
            {"params": [*m.encoder.parameters(), *m.shift_head.parameters()], "lr": self.s.lr_encoder},
            {"params": list(m.decoder.parameters()), "lr": self.s.lr_decoder}])

    @torch.no_grad()
    def prepare(self, dataset: Any) -> None:
        """The decoder's output unit: the low-resolution spectrum's RMS over the CTF's (so the SIRENs work near 1);
        the loss unit: the images' mean power (the logged loss is then ~1 for a zero prediction)."""
        batch = dataset.read(0, min(len(dataset), PREPARE_IMAGES))
        images = batch["images"].float().to(self.imaging.pixel_coordinates.device)
        spectrum = self.imaging.spectrum(images)
        q = self.imaging.pixel_coordinates.norm(dim=-1)
        low = (q > 0) & (q <= 0.125 / self.imaging.pixel_size_A)  # a quarter of Nyquist: signal over noise
        ctf = self.imaging.ctf(batch)
        ctf2 = 1.0 if ctf is None else float((ctf[:, low] ** 2).mean().clamp_min(1e-3))
        self.model.decoder.scale.fill_(float(((spectrum[:, low].abs() ** 2).mean() / ctf2).sqrt().clamp_min(1e-12)))
        self.model.loss_unit.fill_(float((images**2).mean().clamp_min(1e-30)))
        logger.info("cryoai: decoder unit %.4g, loss unit %.4g (from %d images)", float(self.model.decoder.scale),
                    float(self.model.loss_unit), len(images))

    # -- the forward model
    def render(self, R: torch.Tensor, shifts_A: torch.Tensor, batch: dict) -> torch.Tensor:
        """Predicted images (B, N, N): FourierNet on the rotated slice x CTF of ``batch`` x phase of ``shifts_A``."""
        values = self.model.decoder(self.imaging.coordinates(R))
        factors = {k: v for k, v in batch.items() if k not in _NOT_IMAGING} | {"shifts_A": shifts_A}
        return self.imaging.to_images(self.imaging.form_image(values, factors))

    def loss(self, batch: dict) -> tuple[SymmetrizedLoss, torch.Tensor]:
        """The symmetrized (or plain) L2 of a batch through the whole autoencoder, and the winning origins (B, 2)."""
        images = batch["images"].float()
        b = len(images)
        encoded: dict[str, torch.Tensor] = {}

        def autoencoder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            R, t = self.model.encode(x)
            encoded["t"] = t
            reps = len(x) // b  # the pi branch has the same CTF: it is centrosymmetric
            imaging = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in batch.items()
                       if k not in _NOT_IMAGING and isinstance(v, torch.Tensor)}
            return self.render(R, t, imaging), R

        if not self.s.symmetrized:
            return plain_l2(autoencoder, images), encoded["t"]
        out = symmetrized_l2(autoencoder, images, rotate=rotate_pi_centred)
        t = encoded["t"]
        return out, torch.where(out.branch.bool()[:, None], -t[b:], t[:b])

    def training_step(self, batch: dict, optimizer: torch.optim.Optimizer, step: int) -> dict:
        optimizer.zero_grad(set_to_none=True)
        out, _ = self.loss(batch)
        loss = out.loss / self.model.loss_unit
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), "pi_fraction": float(out.branch.float().mean())}

    @torch.no_grad()
    def infer(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pose, origin and branch of each image: the symmetrized loss's winner, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            out, t = self.loss(batch)
        finally:
            self.model.train(was_training)
        return out.rotations.float(), t.float(), out.branch

    @torch.no_grad()
    def volume(self) -> torch.Tensor:
        """The FourierNet on the centred ``N^3`` grid (zero beyond Nyquist, never observed), inverse transformed."""
        n, px = self.imaging.size, self.imaging.pixel_size_A
        axis = (torch.arange(n, dtype=torch.float32) - n // 2) / (n * px)
        k = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
        k = k.to(self.imaging.pixel_coordinates.device)
        values = self.model.decoder.sample_grid(k)
        values = torch.where(k.norm(dim=-1) <= 0.5 / px, values, torch.zeros_like(values))
        return real_volume(values.cpu().to(torch.complex128), n).float()
