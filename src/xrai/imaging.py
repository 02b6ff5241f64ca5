"""The imaging-model interface: how a modality turns a 3D volume and a pose into an image.

Recipes (``xrai.recon``) reach a modality's physics only through an :class:`ImagingModel`:

* :meth:`ImagingModel.coordinates`: where in the molecule's frame a decoder is queried for
  poses ``R`` (the detector's pixel coordinates rotated: ``k = R @ q_pixel``);
* :meth:`ImagingModel.form_image`: how the predicted image is formed from the decoder's
  values at those coordinates (X-ray: an Ewald-sphere amplitude times the detector's
  known factors; cryo-EM: a central slice times the CTF times a shift phase).

Each modality subclasses it (``xrai.xray.imaging.EwaldImaging``); this module imports no
modality, so the dependency points from the physics to the interface, never back.

Usage::

    imaging = EwaldImaging.from_config(cfg, dataset.pixel_position_reciprocal)
    k = imaging.coordinates(R)                 # (B, H, W, 3)
    image = imaging.form_image(decoder(k))     # (B, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

from xrai.volume import ReciprocalGrid


class ImagingModel(nn.Module):
    """Base class of every modality's imaging model (an ``nn.Module``: its buffers move with the model).

    ``pixel_coordinates`` (H, W, 3) are the pixels' coordinates at the identity pose,
    in the decoder's unit (Angstrom^-1 for reciprocal-space volumes); ``q_max`` the largest
    |q| any pixel reaches (the exact value from the geometry where known, else the pixels').
    """

    def __init__(self, pixel_coordinates: torch.Tensor, q_max: float | None = None) -> None:
        super().__init__()
        if pixel_coordinates.ndim != 3 or pixel_coordinates.shape[-1] != 3:
            raise ValueError(f"pixel_coordinates must be (H, W, 3), got {tuple(pixel_coordinates.shape)}")
        self.register_buffer("pixel_coordinates", pixel_coordinates.detach().float().clone())
        self.q_max = float(pixel_coordinates.norm(dim=-1).max()) if q_max is None else float(q_max)

    def reconstruction_grid(self, size: int) -> ReciprocalGrid:
        """The ``size``^3 reciprocal grid that covers every pixel of every pose (``q_max`` at its edge)."""
        return ReciprocalGrid(int(size), self.q_max)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.pixel_coordinates.shape[:2])

    def coordinates(self, R: torch.Tensor) -> torch.Tensor:
        """``k = R @ q`` for every pixel: poses ``R`` (B, 3, 3) -> (B, H, W, 3)."""
        return torch.einsum("bij,hwj->bhwi", R.to(self.pixel_coordinates.dtype), self.pixel_coordinates)

    def form_image(self, values: torch.Tensor, batch: object | None = None) -> torch.Tensor:
        """The predicted image (B, H, W) from the decoder's values at :meth:`coordinates`.

        ``batch`` carries per-image imaging parameters where a modality has them.
        """
        raise NotImplementedError
