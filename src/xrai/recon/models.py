"""The networks of the amortized reconstruction: encoder (image -> pose) and FourierNet (k -> |F(k)|).

Architecture of the X-RAI paper (sections 2.1-2.2), with the details it leaves
open taken from cryoAI (Levy et al. 2022, sections 3.3-3.4), whose code X-RAI forked:

* :class:`GaussianPyramid`: a fixed (not trained) bank of 11x11 Gaussian low-pass
  filters with reflect padding; the input plus ``num_octaves`` blurred copies.
* :class:`VGGEncoder`: amplitude image ``sqrt(I)`` -> pyramid -> VGG16-like
  conv-conv/max-pool blocks with BatchNorm -> MLP -> 6 numbers -> rotation
  (Gram-Schmidt, :func:`xrai.rotations.sixd_to_matrix`).
* :class:`FourierNet`: two SIRENs, an envelope and a complex modulant;
  ``|F(k)| = exp(envelope(k)) * |modulant(k)|``, exactly centrosymmetric.
* :class:`Autoencoder`: rotates the detector's Ewald-sphere coordinates ``E`` by the
  pose, ``k = R @ E`` (equation 2 of the paper, not a central slice), and queries the
  FourierNet there to predict the amplitude image.

Usage::

    import torch
    from xrai.recon.models import Autoencoder, FourierNet, VGGEncoder
    E = torch.randn(32, 32, 3) * 0.05                       # pixel q (H, W, 3), Angstrom^-1
    enc = VGGEncoder((32, 32), channels=[8, 16], mlp=[32])
    dec = FourierNet(q_max=0.15, width=32)
    model = Autoencoder(dec, EwaldImaging(E), encoder=enc)  # from xrai.xray.imaging
    amp = torch.rand(4, 32, 32)                             # sqrt(I)
    pred, R = model(amp)                                    # (4, 32, 32), (4, 3, 3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xrai.imaging import ImagingModel
from xrai.rotations import sixd_to_matrix

logger = logging.getLogger(__name__)

#: cryoAI's pyramid: variance (pixels^2) of the finest filter and the factor between octaves.
PYRAMID_BASE_VARIANCE = 0.01
PYRAMID_OCTAVE_SCALING = 10.0


class GaussianPyramid(nn.Module):
    """Fixed Gaussian low-pass bank: channel 0 is the input, channel ``i`` a blur of variance ``0.01 * 10**i`` px^2.

    ``num_octaves=4`` gives 5 channels (cryoAI's setting; its finest filter, variance
    0.01 px^2, is the identity to float precision, so it is the input itself here).
    Kernels are ``kernel_size`` square, normalised to sum 1, applied with reflect padding.
    The kernels are a buffer, not a parameter: they are never trained.
    """

    def __init__(self, kernel_size: int = 11, num_octaves: int = 4) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.num_octaves = num_octaves
        r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        # a 2D Gaussian is the product of two 1D ones: filter rows then columns (22 instead of 121 MACs per pixel)
        k1 = torch.stack([torch.exp(-r**2 / (2 * PYRAMID_BASE_VARIANCE * PYRAMID_OCTAVE_SCALING**i))
                          for i in range(1, num_octaves + 1)]) if num_octaves else torch.zeros(0, kernel_size)
        k1 = k1 / k1.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        self.register_buffer("kernels_1d", k1.float(), persistent=False)

    @property
    def kernels(self) -> torch.Tensor:
        """The 2D kernels (num_octaves, 1, k, k), each normalised to sum 1."""
        return (self.kernels_1d[:, :, None] * self.kernels_1d[:, None, :])[:, None]

    @property
    def out_channels(self) -> int:
        return self.num_octaves + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, H, W) -> (B, 1 + num_octaves, H, W)."""
        if self.num_octaves == 0:
            return x
        p = self.kernel_size // 2
        # reflect padding needs p < H; clamp for tiny images (edge padding beyond that)
        mode = "reflect" if p < min(x.shape[-2:]) else "replicate"
        k1 = self.kernels_1d.to(x.dtype)
        n = k1.shape[0]
        padded = F.pad(x, (p, p, p, p), mode=mode)
        rows = F.conv2d(padded, k1[:, None, None, :])  # (B, n, H + 2p, W)
        blurred = F.conv2d(rows, k1[:, None, :, None], groups=n)  # (B, n, H, W)
        return torch.cat([x, blurred], dim=1)


def vgg_blocks_for(image_shape: Sequence[int], channels: Sequence[int]) -> int:
    """Number of conv-conv/max-pool blocks that fit an image: each halves it, at least 1 px must remain."""
    smallest = min(int(s) for s in image_shape)
    return max(1, min(len(channels), int(math.floor(math.log2(smallest)))))


class VGGEncoder(nn.Module):
    """Amplitude image (B, H, W) -> rotation (B, 3, 3): pyramid, VGG16-like CNN with BatchNorm, MLP, 6D.

    Each entry of ``channels`` is one block ``conv3x3-BN-ReLU-conv3x3-BN-ReLU-maxpool2``
    (cryoAI: 64, 128, 256, 256, 256). The number of blocks scales with the detector:
    as many as fit while at least one pixel remains (5 at 32 px and above, 4 at 16 px),
    and the flattened feature size is ``channels[last] * (H / 2**blocks) * (W / 2**blocks)``.
    The MLP (``mlp`` hidden sizes, cryoAI: 512, 256, ReLU) ends in 6 numbers mapped to a
    proper rotation by Gram-Schmidt.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int] = (64, 128, 256, 256, 256),
        mlp: Sequence[int] = (512, 256),
        num_octaves: int = 4,
        kernel_size: int = 11,
    ) -> None:
        super().__init__()
        h, w = (int(s) for s in image_shape)
        self.pyramid = GaussianPyramid(kernel_size, num_octaves)
        n_blocks = vgg_blocks_for((h, w), channels)
        layers: list[nn.Module] = []
        c_in = self.pyramid.out_channels
        for c in channels[:n_blocks]:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.cnn = nn.Sequential(*layers)
        mlp_layers: list[nn.Module] = [nn.Flatten()]
        f_in = c_in * h * w
        for f in mlp:
            mlp_layers += [nn.Linear(f_in, f), nn.ReLU(inplace=True)]
            f_in = f
        mlp_layers.append(nn.Linear(f_in, 6))
        self.mlp = nn.Sequential(*mlp_layers)
        self.n_blocks = n_blocks
        logger.debug("VGGEncoder: %d blocks %s, %d features -> MLP %s -> 6",
                     n_blocks, list(channels[:n_blocks]), c_in * h * w, list(mlp))

    def forward(self, amplitude: torch.Tensor) -> torch.Tensor:
        """``amplitude`` (B, H, W) = sqrt(I), normalised -> rotations (B, 3, 3)."""
        x = self.pyramid(amplitude[:, None])
        return sixd_to_matrix(self.mlp(self.cnn(x)))


class SineLayer(nn.Module):
    """``sin(omega0 * (W x + b))`` with SIREN's initialisation (Sitzmann et al. 2020)."""

    def __init__(self, in_features: int, out_features: int, omega0: float, is_first: bool) -> None:
        super().__init__()
        self.omega0 = float(omega0)
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if is_first else math.sqrt(6.0 / in_features) / self.omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega0 * self.linear(x))


class EvenSineLayer(nn.Module):
    """First SIREN layer made even in its input: ``cos(|omega0 * W x|)``, no bias.

    ``cos(omega0 * W x)`` is an even function of ``x`` (the cosine half of SIREN's
    first layer ``sin(omega0 (W x + b))``, which is all an even target needs), and
    every later layer is a function of it, so the whole network is even. Taking
    ``|.|`` first makes it hold bit for bit: ``W(-x) = -(W x)`` exactly in IEEE
    arithmetic and ``|-y| = |y|``, whatever the cosine implementation does.
    """

    def __init__(self, in_features: int, out_features: int, omega0: float) -> None:
        super().__init__()
        self.omega0 = float(omega0)
        self.linear = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            self.linear.weight.uniform_(-1.0 / in_features, 1.0 / in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos((self.omega0 * self.linear(x)).abs())


class EvenSiren(nn.Module):
    """A SIREN whose output is exactly even in its input: even first layer, then ``hidden_layers`` sine layers, then linear."""

    def __init__(self, in_features: int, width: int, hidden_layers: int, out_features: int, omega0: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [EvenSineLayer(in_features, width, omega0)]
        layers += [SineLayer(width, width, omega0, is_first=False) for _ in range(hidden_layers)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        bound = math.sqrt(6.0 / width) / omega0
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Siren(nn.Module):
    """A plain SIREN (no symmetry): ``hidden_layers + 1`` sine layers, then linear (the complex FourierNet's halves)."""

    def __init__(self, in_features: int, width: int, hidden_layers: int, out_features: int, omega0: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [SineLayer(in_features, width, omega0, is_first=True)]
        layers += [SineLayer(width, width, omega0, is_first=False) for _ in range(hidden_layers)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        bound = math.sqrt(6.0 / width) / omega0
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FourierNet(nn.Module):
    """Neural Fourier amplitude ``|F(k)| = scale * exp(envelope(k)) * |modulant(k)|`` (cryoAI section 3.4).

    * ``envelope``: SIREN (``envelope_layers`` hidden layers, ``omega0_envelope``), one
      output: the log of the smooth, fast-decaying envelope, so that a SIREN needs to
      represent only a signal that scales with the log of the amplitude (cryoAI's idea).
    * ``modulant``: SIREN (``modulant_layers``, ``omega0_modulant``), two outputs: a
      complex modulant ``m = m_re + i m_im``, as cryoAI's complex ``F = exp(env) * m``.
      The amplitude is its modulus. Why a modulus and not softplus: a diffraction
      amplitude is the modulus of a smooth (band-limited) complex function; the
      modulus of a smooth complex modulant reproduces its speckle minima (|F| -> 0
      where both parts vanish) while the network stays smooth, whereas softplus
      cannot reach 0 without a diverging pre-activation.
    * Exact centrosymmetry ``|F(k)| = |F(-k)|`` (Friedel's law for the amplitude):
      both SIRENs are even functions of ``k`` by construction (:class:`EvenSineLayer`),
      at no extra cost, so it holds bit for bit, not merely learned.
    * Inputs are ``k / q_max`` (``q_max``: the detector corner's |q|), so the SIREN sees
      coordinates in [-1, 1] whatever the geometry. ``scale`` (a buffer) sets the output
      unit, e.g. the data's mean amplitude, so that the networks work near 1.
    * ``hermitian=True`` (cryo-EM: the transform of a real potential, cryoAI equations 7-8):
      the output is complex, ``V(k) = scale * (exp(e_re) m_re + i exp(e_im) m_im)`` with two
      plain SIRENs of two outputs each (envelope ``e``, modulant ``m``), queried at ``k`` for
      ``k_x >= 0`` and ``V(k) = conj(V(-k))`` for ``k_x < 0``, so ``V(-k) = conj(V(k))`` holds exactly.
    """

    def __init__(
        self,
        q_max: float,
        width: int = 256,
        envelope_layers: int = 3,
        modulant_layers: int = 2,
        omega0_envelope: float = 30.0,
        omega0_modulant: float = 40.0,
        hermitian: bool = False,
    ) -> None:
        super().__init__()
        if not q_max > 0:
            raise ValueError(f"q_max must be > 0, got {q_max}")
        self.q_max = float(q_max)
        self.hermitian = bool(hermitian)
        if self.hermitian:  # odd phases: no even first layer; the half-space fold gives the symmetry
            self.envelope = Siren(3, width, envelope_layers, 2, omega0_envelope)
            self.modulant = Siren(3, width, modulant_layers, 2, omega0_modulant)
        else:
            self.envelope = EvenSiren(3, width, envelope_layers, 1, omega0_envelope)
            self.modulant = EvenSiren(3, width, modulant_layers, 2, omega0_modulant)
        with torch.no_grad():
            # start with |modulant| ~ 1: bias the real part, small random rest
            self.modulant.head.bias.copy_(torch.tensor([1.0, 0.0]))
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """Amplitude at reciprocal coordinates ``k`` (..., 3) in Angstrom^-1 -> (...), non-negative
        (complex with ``hermitian``)."""
        x = k / self.q_max
        if self.hermitian:
            flip = x[..., 0] < 0
            x = torch.where(flip[..., None], -x, x)
            env, m = torch.exp(self.envelope(x)), self.modulant(x)
            values = torch.complex(env[..., 0] * m[..., 0], env[..., 1] * m[..., 1])
            return self.scale * torch.where(flip, values.conj(), values)
        log_env = self.envelope(x)[..., 0]
        m = self.modulant(x)
        # |m| with a tiny floor under the square root: finite gradient where m = 0
        modulus = torch.sqrt(m[..., 0] ** 2 + m[..., 1] ** 2 + 1e-12)
        return self.scale * torch.exp(log_env) * modulus

    @torch.no_grad()
    def sample_grid(self, coordinates: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Evaluate on a grid of coordinates (..., 3) in chunks of ``chunk`` points (memory stays small)."""
        flat = coordinates.reshape(-1, 3)
        out = torch.cat([self(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)])
        return out.reshape(coordinates.shape[:-1])


class Autoencoder(nn.Module):
    """Encoder (or given poses) -> imaging model's coordinates -> FourierNet -> predicted image.

    ``imaging`` (:class:`xrai.imaging.ImagingModel`) says where the decoder is queried for
    a pose and how its values form the image (X-ray: ``|F|`` on the Ewald sphere times
    the detector's known factors). With ``encoder=None`` the poses must be given
    (known-pose mode).
    """

    def __init__(self, decoder: FourierNet, imaging: ImagingModel, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.imaging = imaging

    def render(self, R: torch.Tensor) -> torch.Tensor:
        """Predicted images (B, H, W) for poses ``R`` (B, 3, 3)."""
        return self.imaging.form_image(self.decoder(self.imaging.coordinates(R)))

    def forward(self, amplitude: torch.Tensor, R: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``amplitude`` (B, H, W) in the decoder's unit -> (prediction (B, H, W), rotations (B, 3, 3)).

        The encoder sees ``amplitude / decoder.scale`` (values near 1); ``R`` overrides it.
        """
        if R is None:
            if self.encoder is None:
                raise ValueError("this autoencoder has no encoder: pass the poses R")
            R = self.encoder(amplitude / self.decoder.scale)
        return self.render(R), R
