"""The X-RAI paper's recipe (``xrai-paper``) and its known-pose bound (``known-pose``).

``xrai-paper``: sections 2.1-2.2 and appendix A.1 of the paper: VGG encoder over a Gaussian
pyramid + FourierNet, symmetrized L2 loss (equation 4), Adam (amsgrad) at ``train.lr``.
``known-pose``: the same decoder with the encoder replaced by the true rotations.

Usage::

    from xrai.recon.paper import PaperRecipe
    model = PaperRecipe(cfg).build_model(imaging)
"""

from __future__ import annotations

import torch
from torch import nn

from xrai.recon.losses import SymmetrizedLoss, plain_l2
from xrai.recon.models import Autoencoder
from xrai.recon.recipe import Batch, Recipe


class PaperRecipe(Recipe):
    """The X-RAI paper's recipe: VGG encoder, FourierNet, symmetrized L2, Adam(amsgrad) at ``train.lr``."""

    name = "xrai-paper"


class KnownPoseRecipe(Recipe):
    """The same decoder and loop with the encoder replaced by the true rotations (plain L2: the pose is known)."""

    name = "known-pose"
    learns_poses = False

    def build_encoder(self, image_shape: tuple[int, int]) -> nn.Module | None:
        return None

    def loss(self, model: Autoencoder, batch: Batch, step: int) -> SymmetrizedLoss:
        weights, pixel_loss = self.pixel_terms(batch.amplitude.device)
        return plain_l2(lambda amp: model(amp, batch.rotations), batch.amplitude, weights, pixel_loss)

    @torch.no_grad()
    def infer(self, model: Autoencoder, batch: Batch) -> SymmetrizedLoss:
        return self.loss(model, batch, 0)
