"""xrai.volume: the trilinear sampler every slice goes through (simulation, EMC, the merged volume)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xrai.volume import ReciprocalGrid, sample_volume, trilinear


def _reference(volume: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One plain grid_sample call (a single batch entry)."""
    out = F.grid_sample(volume[None], g.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out.reshape(volume.shape[0], *g.shape[:-1])


def test_threaded_split_is_bit_identical_to_one_call():
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(2, 21, 21, 21, generator=gen)
    g = torch.rand(5, 3001, 3, generator=gen) * 2.4 - 1.2  # some points outside: zeros there
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = trilinear(volume, g)
            assert out.shape == (2, 5, 3001)
            assert torch.equal(out, _reference(volume, g)), threads
    finally:
        torch.set_num_threads(before)


def test_gradients_match_one_call():
    gen = torch.Generator().manual_seed(1)
    volume = torch.rand(1, 9, 9, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(20000, 3, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    w = torch.rand(20000, generator=gen, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gv, gg = torch.autograd.grad((trilinear(volume, g)[0] * w).sum(), (volume, g))
    finally:
        torch.set_num_threads(before)
    rv, rg = torch.autograd.grad((_reference(volume, g)[0] * w).sum(), (volume, g))
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gg, rg)


def test_sample_volume_reads_voxel_values_at_voxel_centres():
    grid = ReciprocalGrid(11, 0.5)
    volume = torch.arange(11**3, dtype=torch.float64).reshape(11, 11, 11)
    k = grid.coordinates()[[0, 3, 10], [2, 5, 7], [9, 1, 4]]
    torch.testing.assert_close(sample_volume(volume, k, grid), volume[[0, 3, 10], [2, 5, 7], [9, 1, 4]])
