"""What one training method does: :class:`Recipe` (the base of every method) and :class:`Batch`.

A recipe builds its model over an :class:`xrai.imaging.ImagingModel` (its only view of the
modality's physics), its optimizer, and defines one training step and inference. The loop
(:mod:`xrai.recon.train`) is the same for every recipe; :mod:`xrai.recon.recipes` lists them.

Usage::

    from xrai.recon.recipes import get_recipe
    recipe = get_recipe("xrai-paper", cfg)
    model = recipe.build_model(imaging)
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from xrai.imaging import ImagingModel
from xrai.recon.losses import (
    PixelLoss,
    SymmetrizedLoss,
    pixel_l2,
    poisson_pixel_nll,
    symmetrized_l2,
)
from xrai.recon.models import Autoencoder, FourierNet, VGGEncoder
from xrai.rotations import quaternion_to_matrix

logger = logging.getLogger(__name__)

#: images read to set the decoder's output unit (mean amplitude) before the first step
SCALE_IMAGES = 1024


# --------------------------------------------------------------------------- batches


class Batch:
    """One batch on the training device: ``amplitude`` (B, H, W) = sqrt(I), ``counts`` (B, H, W) the images
    as recorded, true rotations (B, 3, 3), ``index``.

    Gaussian likelihood (noise-free data): ``I`` is the recorded image divided by the
    per-image ``scale`` the simulator applied to reach its minimum total intensity (when the
    file stores it), so that every image is a slice of one and the same intensity volume.
    Poisson likelihood (``poisson=True``): nothing is divided, ``I`` = the counts; the
    recipe estimates each image's fluence itself (:mod:`xrai.recon.likelihood`).
    """

    def __init__(self, raw: dict[str, torch.Tensor], device: torch.device, poisson: bool = False) -> None:
        self.counts = raw["images"].to(device, non_blocking=True)
        images = self.counts
        if "scale" in raw and not poisson:
            images = images / raw["scale"].to(device)[:, None, None]
        self.amplitude = images.clamp_min(0).sqrt()
        self.rotations = quaternion_to_matrix(raw["orientations"].to(device).double()).float()
        self.index = raw["index"]

    def __len__(self) -> int:
        return self.amplitude.shape[0]


# --------------------------------------------------------------------------- recipes


class Recipe:
    """How one method trains. Subclass, and add it to :data:`xrai.recon.recipes.RECIPES` to add a method.

    The loop calls, in order: :meth:`build_model`, :meth:`build_optimizer`, :meth:`prepare`
    (fresh start only; its effects must live in the model's buffers or :meth:`state_dict`,
    which the checkpoint saves), then :meth:`training_step` per step, :meth:`finish` once after the
    last step, :meth:`infer` for evaluation and the pose files, and :meth:`decoder` to sample the volume.
    """

    name = "base"
    #: False: the poses are the true ones (poses files say ``source = "ground_truth"``)
    learns_poses = True

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.tcfg = cfg["train"]
        #: ``poisson`` or ``gaussian`` (``train.likelihood`` resolved by :meth:`configure`)
        self.likelihood = "gaussian"
        #: (H, W) bool: pixels that enter losses, merges and scores; (H, W) expected background photons
        self.mask: torch.Tensor | None = None
        self.background: torch.Tensor | None = None

    def configure(self, dataset: Any) -> None:
        """Before :meth:`build_model`: the likelihood (``train.likelihood``, ``auto`` from the dataset),
        the dataset's pixel mask and background."""
        from xrai.recon.likelihood import resolve_likelihood

        self.likelihood = resolve_likelihood(str(self.tcfg.get("likelihood", "auto")), dataset)
        shape = tuple(dataset.image_shape)
        self.mask = getattr(dataset, "mask", torch.ones(shape, dtype=torch.bool)).bool()
        self.background = getattr(dataset, "background", torch.zeros(shape)).float()
        logger.info("%s: %s likelihood, %d of %d pixels unmasked, background %.3g photons per image",
                    self.name, self.likelihood, int(self.mask.sum()), self.mask.numel(),
                    float(self.background[self.mask].sum()))

    def batch(self, raw: dict[str, torch.Tensor], device: torch.device) -> Batch:
        """A :class:`Batch` for this recipe's likelihood."""
        return Batch(raw, device, poisson=self.likelihood == "poisson")

    # -- model
    def build_decoder(self, q_max: float) -> FourierNet:
        d = self.tcfg.get("decoder", {})
        return FourierNet(
            q_max, width=int(d.get("width", 256)), envelope_layers=int(d.get("envelope_layers", 3)),
            modulant_layers=int(d.get("modulant_layers", 2)), omega0_envelope=float(d.get("omega0_envelope", 30)),
            omega0_modulant=float(d.get("omega0_modulant", 40)))

    def build_encoder(self, image_shape: tuple[int, int]) -> nn.Module | None:
        e = self.tcfg.get("encoder", {})
        return VGGEncoder(
            image_shape, channels=e.get("channels", [64, 128, 256, 256, 256]), mlp=e.get("mlp", [512, 256]),
            num_octaves=int(e.get("num_octaves", 4)), kernel_size=int(e.get("kernel_size", 11)))

    def build_model(self, imaging: ImagingModel) -> Autoencoder:
        """The autoencoder for a dataset's imaging model (its pixels' coordinates and image formation)."""
        q_max = float(imaging.pixel_coordinates.norm(dim=-1).max())
        return Autoencoder(self.build_decoder(q_max), imaging, encoder=self.build_encoder(imaging.image_shape))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam with amsgrad at ``train.lr`` (the paper's optimizer)."""
        return torch.optim.Adam(model.parameters(), lr=float(self.tcfg["lr"]), amsgrad=True)

    @torch.no_grad()
    def prepare(self, model: Autoencoder, dataset: Any, device: torch.device) -> None:
        """Data-dependent set-up before step 0: the decoder's output unit = the data's mean amplitude."""
        raw = dataset.read(0, min(len(dataset), SCALE_IMAGES))
        amp = self.batch(raw, device).amplitude
        model.decoder.scale.fill_(float(amp.mean().clamp_min(1e-12)))
        logger.info("decoder output unit: mean amplitude %.4g (from %d images)", float(model.decoder.scale), len(amp))

    # -- per step
    def pixel_terms(self, device: torch.device) -> tuple[torch.Tensor | None, PixelLoss]:
        """``(weights, pixel_loss)`` of this recipe's losses: the mask as weights (None without one) and
        the squared error (Gaussian) or the Poisson NLL of the counts with the dataset's background."""
        weights = None
        if self.mask is not None and not bool(self.mask.all()):
            weights = self.mask.to(device).float()
        if self.likelihood != "poisson":
            return weights, pixel_l2
        bg = None if self.background is None else self.background.to(device)
        return weights, functools.partial(poisson_pixel_nll, background=bg)

    def loss(self, model: Autoencoder, batch: Batch, step: int) -> SymmetrizedLoss:
        """The training loss of a batch (equation 4: symmetrized L2, or Poisson NLL, through the whole autoencoder)."""
        weights, pixel_loss = self.pixel_terms(batch.amplitude.device)
        return symmetrized_l2(model, batch.amplitude, weights=weights, pixel_loss=pixel_loss)

    def training_step(self, model: Autoencoder, optimizer: torch.optim.Optimizer, batch: Batch, step: int) -> dict:
        """One gradient step; returns scalars for the log (at least ``loss``)."""
        optimizer.zero_grad(set_to_none=True)
        out = self.loss(model, batch, step)
        # normalised units: the loss is in (amplitude / scale)^2, independent of the photon count
        loss = out.loss / model.decoder.scale**2 if self.likelihood == "gaussian" else out.loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), float(self.tcfg.get("grad_clip", 1.0)))
        optimizer.step()
        return {"loss": float(loss.detach())}

    # -- inference
    @torch.no_grad()
    def infer(self, model: Autoencoder, batch: Batch) -> SymmetrizedLoss:
        """Poses (corrected by the winning branch) and per-image loss, in eval mode."""
        weights, pixel_loss = self.pixel_terms(batch.amplitude.device)
        return symmetrized_l2(model, batch.amplitude, weights=weights, pixel_loss=pixel_loss)

    def finish(self, model: nn.Module, dataset: Any, device: torch.device, batch_size: int) -> bool:
        """After the last step, before the outputs (e.g. passes over the whole training set); True if it
        changed the model. Not checkpointed: a resumed run at its final step runs it again."""
        return False

    def state_dict(self) -> dict:
        """Extra recipe state to checkpoint (none here)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
