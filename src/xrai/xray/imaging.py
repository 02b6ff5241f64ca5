"""The X-ray imaging model: Ewald-sphere coordinates and the detector's known per-pixel factors.

Usage::

    from xrai.xray.imaging import EwaldImaging
    imaging = EwaldImaging.from_config(cfg, dataset.pixel_position_reciprocal)
    amplitude_image = imaging.form_image(decoder(imaging.coordinates(R)))
"""

from __future__ import annotations

import torch

from xrai.errors import XraiError
from xrai.imaging import ImagingModel
from xrai.xray.geometry import Beam, Detector


def detector_pixel_factor(cfg: dict, ewald: torch.Tensor) -> torch.Tensor:
    """``sqrt(polarization * solid_angle / mean)`` per pixel (H, W) for the config's detector and beam.

    The simulated photons are ``|F|^2`` times these known detector factors; a predicted
    amplitude is multiplied by their square root. The dataset's pixel coordinates must be
    the config's geometry.
    """
    det, beam = Detector.from_config(cfg), Beam.from_config(cfg)
    q = det.pixel_position_reciprocal(beam)
    if tuple(q.shape) != tuple(ewald.shape) or not torch.allclose(q.float(), ewald.float(), rtol=1e-4, atol=1e-6):
        raise XraiError("the dataset's pixel_position_reciprocal does not match the config's 'detector' and 'beam' "
                        f"(shape {tuple(ewald.shape)} vs {tuple(q.shape)}); train with the config that simulated it")
    c = det.polarization(beam) * det.solid_angle()
    return (c / c.mean()).sqrt().float()


class EwaldImaging(ImagingModel):
    """An SPI pattern: the amplitude ``|F|`` on the Ewald sphere times ``sqrt(polarization x solid angle)``.

    ``pixel_coordinates`` are the detector's ``q`` (H, W, 3) in Angstrom^-1 (exact Ewald
    sphere, lab frame); ``pixel_factor`` (H, W) the square root of the detector's known
    intensity factors relative to their mean (ones if not given), so that a decoder holds
    one 3D amplitude while each pixel records ``|F|^2 x polarization x solid angle``.
    """

    def __init__(self, ewald: torch.Tensor, pixel_factor: torch.Tensor | None = None,
                 q_max: float | None = None) -> None:
        super().__init__(ewald, q_max)
        factor = torch.ones(ewald.shape[:2]) if pixel_factor is None else pixel_factor.detach().float().clone()
        if factor.shape != ewald.shape[:2]:
            raise ValueError(f"pixel_factor has shape {tuple(factor.shape)}, expected {tuple(ewald.shape[:2])}")
        self.register_buffer("pixel_factor", factor)

    @classmethod
    def from_config(cls, cfg: dict, ewald: torch.Tensor) -> EwaldImaging:
        """The imaging model of a dataset with pixel coordinates ``ewald``, checked against the config's geometry."""
        q_max = Detector.from_config(cfg).q_max(Beam.from_config(cfg))
        return cls(ewald, detector_pixel_factor(cfg, ewald), q_max=q_max)

    def form_image(self, values: torch.Tensor, batch: object | None = None) -> torch.Tensor:
        """Amplitudes ``|F|`` at :meth:`coordinates` (B, H, W) -> the recorded amplitude image."""
        return values * self.pixel_factor
