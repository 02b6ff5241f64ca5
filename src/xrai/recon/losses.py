"""Reconstruction losses: the symmetrized L2 loss of cryoAI / X-RAI (equation 4) and the plain L2.

Equation 4 of the X-RAI paper::

    L_sym = sum_i min{ ||I_i - G(I_i)||^2 , ||R_pi(I_i) - G(R_pi(I_i))||^2 }

where ``G`` is the whole autoencoder (encoder and decoder) and ``R_pi`` rotates an
image in-plane by pi. The branch that wins tells how to read the predicted pose:
if the pi-rotated image won with pose ``R'``, the original image's pose is
``R' @ RZ_PI`` (docs/architecture.md).

Usage::

    import torch
    from xrai.recon.losses import symmetrized_l2
    images = torch.rand(8, 32, 32)
    def autoencoder(x):                    # (B, H, W) -> (prediction, rotations)
        return x * 0.9, torch.eye(3).expand(x.shape[0], 3, 3)
    out = symmetrized_l2(autoencoder, images)
    out.loss.backward() if out.loss.requires_grad else None
    out.branch                             # (8,) int8: 0 = as given, 1 = pi-rotated won
    out.rotations                          # (8, 3, 3) poses of the original images
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xrai.rotations import RZ_PI

logger = logging.getLogger(__name__)

#: an autoencoder: images (B, H, W) -> prediction (B, H, W), or (prediction, rotations (B, 3, 3))
PredictFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
#: a per-image loss: (prediction (B, H, W), target (B, H, W), weights or None) -> (B,)
PixelLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class SymmetrizedLoss:
    """Result of :func:`symmetrized_l2`.

    ``loss``: scalar (mean over images of the per-image minimum); ``per_image`` (B,);
    ``branch`` (B,) int8, 1 where the pi-rotated image won; ``rotations`` (B, 3, 3) the
    poses of the *original* images (corrected by ``RZ_PI`` where branch 1 won), or None
    if ``pred_fn`` returns no rotations; ``prediction`` (B, H, W) the winning prediction
    in the frame of the original image.
    """

    loss: torch.Tensor
    per_image: torch.Tensor
    branch: torch.Tensor
    rotations: torch.Tensor | None
    prediction: torch.Tensor


def rotate_pi(images: torch.Tensor) -> torch.Tensor:
    """In-plane rotation by pi of images (..., H, W)."""
    return torch.rot90(images, 2, dims=(-2, -1))


def rotate_pi_centred(images: torch.Tensor) -> torch.Tensor:
    """In-plane rotation by pi about pixel ``(H // 2, W // 2)`` (cryo-EM's phase origin), periodically.

    ``rot90`` twice turns about ``((H - 1) / 2, (W - 1) / 2)``; for an even size a roll by one
    pixel moves that centre onto ``N // 2``. The rfft of the result is the conjugate of the
    original's, and an image of pose ``R`` and origin ``t`` becomes one of ``R @ RZ_PI`` and ``-t``.
    """
    h, w = images.shape[-2:]
    return torch.roll(rotate_pi(images), shifts=(1 - h % 2, 1 - w % 2), dims=(-2, -1))


def _split(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def pixel_l2(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pixels of ``weights * (prediction - target)**2`` per image: (B, H, W) -> (B,)."""
    sq = (prediction - target) ** 2
    if weights is not None:
        sq = sq * weights
    return sq.flatten(1).mean(dim=1)


def poisson_pixel_nll(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                      background: torch.Tensor | None = None) -> torch.Tensor:
    """Poisson negative log-likelihood per image (B,) of the counts ``target**2`` given amplitudes ``prediction``.

    ``target`` is the amplitude ``sqrt(counts)`` of raw photon counts; the rate is
    ``phi * prediction**2 + background`` with ``phi`` the image's maximum-likelihood fluence
    (fitted without gradient, :func:`xrai.recon.likelihood.estimate_fluence`). ``weights``
    (e.g. the pixel mask) weight each pixel's term; the mean is over the weighted pixels.
    """
    from xrai.recon.likelihood import estimate_fluence

    counts = (target**2).flatten(1)
    mu = (prediction**2).flatten(1)
    w = torch.ones_like(mu[:1]) if weights is None else torch.broadcast_to(weights, prediction.shape).flatten(1)
    bg = torch.zeros_like(mu[:1]) if background is None else torch.broadcast_to(background, prediction.shape[1:])
    bg = bg.reshape(1, -1)
    with torch.no_grad():
        phi = estimate_fluence(counts * w, mu * w, bg * w)
    lam = (phi[:, None] * mu + bg).clamp_min(1e-6)
    return ((lam - counts * torch.log(lam)) * w).sum(1) / w.sum(1).clamp_min(1e-12)


def plain_l2(pred_fn: PredictFn, images: torch.Tensor, weights: torch.Tensor | None = None,
             pixel_loss: PixelLoss = pixel_l2) -> SymmetrizedLoss:
    """The ordinary L2 loss (or ``pixel_loss``) with the same result type (branch 0 everywhere), e.g. for known poses."""
    prediction, rotations = _split(pred_fn(images))
    per_image = pixel_loss(prediction, images, weights)
    branch = torch.zeros(images.shape[0], dtype=torch.int8, device=images.device)
    return SymmetrizedLoss(per_image.mean(), per_image, branch, rotations, prediction)


def symmetrized_l2(pred_fn: PredictFn, images: torch.Tensor, weights: torch.Tensor | None = None,
                   pixel_loss: PixelLoss = pixel_l2,
                   rotate: Callable[[torch.Tensor], torch.Tensor] = rotate_pi) -> SymmetrizedLoss:
    """Equation 4: per image, the smaller L2 loss of the image and of its pi rotation, each through ``pred_fn``.

    Both branches go through ``pred_fn`` (the whole autoencoder) in one batch of
    ``2 B`` images. ``weights`` (broadcastable to (B, H, W), detector frame) weight the
    squared error of both branches alike; the pi-rotated branch sees them rotated with
    the image. The gradient flows through the winning branch only (the min), as in cryoAI.
    ``pixel_loss`` replaces the L2 (e.g. :func:`poisson_pixel_nll` for photon counts); ``rotate``
    the in-plane pi rotation (:func:`rotate_pi_centred` for images whose origin is pixel ``N // 2``).
    """
    b = images.shape[0]
    both = torch.cat([images, rotate(images)], dim=0)
    prediction, rotations = _split(pred_fn(both))
    if weights is not None and weights.dim() >= 2 and weights.shape[-2:] == images.shape[-2:]:
        w2 = torch.broadcast_to(weights, images.shape)
        weights = torch.cat([w2, rotate(w2)], dim=0)
    per_branch = pixel_loss(prediction, both, weights).reshape(2, b)
    per_image, winner = per_branch.min(dim=0)
    branch = winner.to(torch.int8)
    won_pi = winner.bool()
    # the winning prediction, seen in the frame of the original image
    pred0, pred1 = prediction[:b], prediction[b:]
    pred = torch.where(won_pi[:, None, None], rotate(pred1), pred0)  # pi rotations are involutions
    corrected = None
    if rotations is not None:
        r0, r1 = rotations[:b], rotations[b:]
        r1_orig = r1 @ RZ_PI.to(device=r1.device, dtype=r1.dtype)
        corrected = torch.where(won_pi[:, None, None], r1_orig, r0)
    return SymmetrizedLoss(per_image.mean(), per_image, branch, corrected, pred)
