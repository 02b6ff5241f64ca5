"""Alignment of a reconstructed density to a reference: rotation, translation and hand.

Transform convention (volumes indexed ``[x, y, z]``, origin at voxel ``n // 2``, the
FFT-centred convention of ``docs/architecture.md``)::

    src     = moving                    if not inverted
            = moving(-x)                if inverted   (the enantiomer, through the origin)
    aligned(x) = src(R^T (x - shift))   (rotate about the origin, then translate; voxels)

Phasing from |F|^2 cannot tell the two hands apart, so both are always searched.
The search is a coarse quasi-uniform SO(3) grid (Hopf fibration, :mod:`xrai.so3grid`;
Fourier-cropped volumes) with the
translation found for every rotation by FFT cross-correlation, followed by local
refinement (L-BFGS on a rotation vector and a sub-voxel shift) of the best candidates
of each hand, first on the cropped and then on the full volumes. The score is the
Pearson correlation coefficient over the box.

Usage::

    from xrai.evaluation.align import align_volumes
    res = align_volumes(phased_density, reference_density, angular_step_deg=15)
    print(res.cc, res.inverted, res.rotation, res.shift)
    aligned = res.aligned            # numpy array, same shape as the reference
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xrai.rotations import angle_between, quaternion_to_matrix

logger = logging.getLogger(__name__)


@dataclass
class AlignResult:
    """The transform taking ``moving`` onto ``reference`` (see the module docstring) and its score."""

    rotation: np.ndarray  # (3, 3) proper rotation
    shift: np.ndarray  # (3,) voxels
    inverted: bool
    cc: float
    aligned: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready summary (without the aligned volume)."""
        return {
            "cc": float(self.cc),
            "rotation": np.asarray(self.rotation).tolist(),
            "shift": np.asarray(self.shift).tolist(),
            "inverted": bool(self.inverted),
        }


def invert_volume(vol: torch.Tensor) -> torch.Tensor:
    """``vol(-x)`` about the origin voxel ``n // 2`` (the enantiomer); last three dims are x, y, z."""
    out = torch.flip(vol, dims=(-3, -2, -1))
    # flip maps index i -> n - 1 - i, i.e. x -> -x - 1 for even n: roll by one more voxel
    rolls = tuple(1 - s % 2 for s in vol.shape[-3:])
    return torch.roll(out, shifts=rolls, dims=(-3, -2, -1))


def _voxel_coords(n: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    ax = torch.arange(n, dtype=dtype, device=device) - n // 2
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1)  # (n, n, n, 3)


def transform_volume(vol: torch.Tensor, rotation: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``vol(R^T (x - shift))`` for a batch of rotations ``(B, 3, 3)`` (or one ``(3, 3)``), trilinear.

    ``vol`` is ``(n, n, n)``; returns ``(B, n, n, n)`` (or ``(n, n, n)``). Outside reads 0.
    Differentiable with respect to ``rotation`` and ``shift``. The same rotation applied
    to a reciprocal-space volume on a ``ReciprocalGrid`` rotates its Fourier transform
    consistently (the origin is voxel ``n // 2`` in both).
    """
    single = rotation.dim() == 2
    R = rotation[None] if single else rotation
    B = R.shape[0]
    n = vol.shape[-1]
    dtype = vol.dtype
    R = R.to(dtype)
    s = torch.zeros(B, 3, dtype=dtype, device=vol.device) if shift is None else shift.reshape(B, 3).to(dtype)
    x = _voxel_coords(n, dtype, vol.device).reshape(1, -1, 3)
    # src = R^T (x - s): row-vector form (x - s) @ R
    src = (x - s[:, None, :]) @ R
    norm = (src + n // 2) * (2.0 / (n - 1)) - 1.0
    g = norm.flip(-1).reshape(B, n, n, n, 3)  # grid_sample wants (W, H, D) = (z, y, x)
    inp = vol.reshape(1, 1, n, n, n).expand(B, 1, n, n, n)
    out = F.grid_sample(inp, g, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
    return out[0] if single else out


def fourier_crop(vol: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample a real-space volume to ``size``³ by cropping its centred Fourier transform.

    The origin voxel ``n // 2`` maps onto ``size // 2``; the voxel size grows by ``n / size``.
    """
    n = vol.shape[-1]
    if size >= n:
        return vol
    Fv = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol)))
    lo = n // 2 - size // 2
    Fc = Fv[lo:lo + size, lo:lo + size, lo:lo + size]
    out = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(Fc))).real
    return out * (size / n) ** 3


def rotation_grid(step_deg: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Quasi-uniform rotations covering SO(3) at ``step_deg`` spacing or finer, ``(M, 3, 3)``.

    The Hopf-fibration grid of :mod:`xrai.so3grid` at the coarsest level whose nominal
    spacing (``60 / 2**level`` degrees) is at most ``step_deg`` (15 deg: 4,608 rotations).
    """
    from xrai.so3grid import so3_grid

    level = max(0, math.ceil(math.log2(60.0 / step_deg) - 1e-9))
    return quaternion_to_matrix(so3_grid(level)).to(dtype)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the last three dims (batched in ``a``)."""
    a = a - a.mean(dim=(-3, -2, -1), keepdim=True)
    b = b - b.mean()
    num = (a * b).sum(dim=(-3, -2, -1))
    den = torch.sqrt((a * a).sum(dim=(-3, -2, -1)) * (b * b).sum())
    return num / den.clamp_min(1e-30)


def _translation_search(rotated: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best circular shift (voxels) and its Pearson correlation for each rotated volume ``(B, n, n, n)``."""
    n = reference.shape[-1]
    r = rotated - rotated.mean(dim=(-3, -2, -1), keepdim=True)
    ref = reference - reference.mean()
    norms = torch.sqrt((r * r).sum(dim=(-3, -2, -1)) * (ref * ref).sum()).clamp_min(1e-30)
    # c(t) = sum_x ref(x) r(x - t)
    cc = torch.fft.irfftn(torch.fft.rfftn(ref)[None] * torch.fft.rfftn(r, dim=(-3, -2, -1)).conj(),
                          s=(n, n, n), dim=(-3, -2, -1))
    flat = cc.reshape(cc.shape[0], -1)
    best, idx = flat.max(dim=1)
    t = torch.stack([idx // (n * n), (idx // n) % n, idx % n], -1).to(reference.dtype)
    t = torch.where(t >= n - n // 2, t - n, t)  # wrap to [-n/2, n/2)
    return t, best / norms


def _refine(src: torch.Tensor, ref: torch.Tensor, R0: torch.Tensor, s0: torch.Tensor,
            iterations: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Local L-BFGS refinement of ``R = exp(w) R0`` and ``shift = s0 + ds`` maximising the correlation."""
    import roma

    params = torch.zeros(6, dtype=src.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def rot_shift() -> tuple[torch.Tensor, torch.Tensor]:
        return roma.rotvec_to_rotmat(params[:3]) @ R0, s0 + params[3:]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        R, s = rot_shift()
        loss = -_pearson(transform_volume(src, R, s), ref)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        R, s = rot_shift()
        cc = float(_pearson(transform_volume(src, R, s), ref))
    return R.detach(), s.detach(), cc


def align_volumes(
    moving: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    angular_step_deg: float = 15.0,
    refine: bool = True,
    *,
    coarse_size: int = 16,
    n_refine: int = 3,
    batch_size: int = 512,
) -> AlignResult:
    """Align ``moving`` onto ``reference`` (cubic, same shape) over rotation, translation and hand.

    Returns an :class:`AlignResult`; ``aligned`` is ``moving`` under the found transform
    (see the module docstring). ``n_refine`` distinct candidates of each hand are refined.
    """
    mov = torch.as_tensor(np.asarray(moving) if not isinstance(moving, torch.Tensor) else moving).float()
    ref = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference).float()
    if mov.shape != ref.shape or mov.dim() != 3 or len(set(mov.shape)) != 1:
        raise ValueError(f"align_volumes needs two equal cubic volumes, got {tuple(mov.shape)} and {tuple(ref.shape)}")
    n = ref.shape[0]
    nc = min(n, coarse_size)
    scale = n / nc
    ref_c = fourier_crop(ref, nc)
    grid = rotation_grid(angular_step_deg, dtype=torch.float32)

    candidates = []  # (cc, inverted, R, shift_full)
    for inverted in (False, True):
        src = invert_volume(mov) if inverted else mov
        src_c = fourier_crop(src, nc)
        ccs, shifts = [], []
        with torch.no_grad():
            for b in range(0, grid.shape[0], batch_size):
                rot = transform_volume(src_c, grid[b:b + batch_size])
                t, c = _translation_search(rot, ref_c)
                ccs.append(c)
                shifts.append(t)
        ccs, shifts = torch.cat(ccs), torch.cat(shifts)
        picked: list[int] = []
        for k in torch.argsort(ccs, descending=True).tolist():
            # distinct candidates only: not within two grid steps of one already picked
            if all(math.degrees(float(angle_between(grid[k].double(), grid[j].double()))) > 2 * angular_step_deg
                   for j in picked):
                picked.append(k)
            if len(picked) == (n_refine if refine else 1):
                break
        hand = []
        for k in picked:
            R, s, c = grid[k].double(), shifts[k].double(), float(ccs[k])
            if refine:  # cheap refinement of every candidate on the cropped volumes
                R, s, c = _refine(src_c.double(), ref_c.double(), R, s, iterations=30)
            hand.append((c, R, s * scale))
        # the best candidate of this hand, refined (or scored) on the full volumes
        c, R, s = max(hand, key=lambda x: x[0])
        if refine:
            R, s, c = _refine(src.double(), ref.double(), R, s, iterations=40)
        else:
            with torch.no_grad():
                c = float(_pearson(transform_volume(src.double(), R, s), ref.double()))
        candidates.append((c, inverted, R, s))
        logger.debug("hand inverted=%s: cc %.4f", inverted, c)

    cc, inverted, R, s = max(candidates, key=lambda x: x[0])
    src = invert_volume(mov) if inverted else mov
    with torch.no_grad():
        aligned = transform_volume(src.double(), R, s)
    logger.info("alignment: cc %.4f, inverted %s, shift %s voxels", cc, inverted, np.round(s.numpy(), 2).tolist())
    return AlignResult(rotation=R.numpy(), shift=s.numpy(), inverted=bool(inverted), cc=float(cc),
                       aligned=aligned.float().numpy())
