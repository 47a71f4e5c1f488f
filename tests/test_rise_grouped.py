"""RISE saliency by linearity (ops.perturb._rise_saliency_grouped: grids summed per shift, then
upsampled once per shift and reference) against the reference rise_saliency, the spec."""

from __future__ import annotations

import pytest
import torch

import whymatch.ops as ops
from whymatch.ops import perturb as P
from whymatch.ops import reference as ref


def _inputs(n, s, size, k, *, binary=True, centred=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    grids = torch.rand(n, s, s, generator=g)
    if binary:
        grids = (grids < 0.5).float()
    h, w = size
    cell_h, cell_w, _, _ = ref.rise_grid_geometry((h, w), s) if h and w else (1, 1, 0, 0)
    shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=g), torch.randint(0, cell_w, (n,), generator=g)], 1)
    scores = torch.randn(n, k, generator=g) * 3 + (0 if centred else 5)
    if centred and n:
        scores = scores - scores.mean(0)
    return grids.to(dtype), shifts, scores.to(dtype)


def _close(got, want):
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, scale))


@pytest.mark.parametrize("n,s,size,k", [(1, 1, (1, 1), 1), (7, 3, (5, 9), 2), (300, 4, (17, 23), 3),
                                         (500, 7, (31, 29), 1), (64, 8, (40, 40), 5), (200, 2, (3, 50), 4)])
@pytest.mark.parametrize("binary,centred", [(True, False), (False, True)])
def test_grouped_matches_the_reference(n, s, size, k, binary, centred):
    grids, shifts, scores = _inputs(n, s, size, k, binary=binary, centred=centred, seed=n + s)
    want = ref.rise_saliency(grids, shifts, scores, size)
    got = P._rise_saliency_grouped(grids, shifts, scores, size)
    assert got.shape == want.shape and got.dtype == torch.float32
    _close(got, want)


@pytest.mark.parametrize("n,size,k", [(0, (8, 8), 2), (5, (0, 8), 2), (5, (8, 0), 2), (5, (8, 8), 0), (0, (0, 0), 0)])
def test_grouped_zero_sizes(n, size, k):
    grids, shifts, scores = _inputs(n, 3, size, k)
    got = P._rise_saliency_grouped(grids, shifts, scores, size)
    assert got.shape == (k, *size) and not got.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_public_rise_saliency_takes_the_grouped_path_for_many_masks(dtype):
    n, s, size, k = 2000, 7, (56, 56), 3
    assert P._grouped_is_cheaper(n, k, s, size)
    assert not P._grouped_is_cheaper(4, k, s, size)
    grids, shifts, scores = _inputs(n, s, size, k, centred=True, dtype=dtype)
    want = ref.rise_saliency(grids.float(), shifts, scores.float(), size)
    got = ops.rise_saliency(grids, shifts, scores, size)
    _close(got, want)
    per_mask = torch.ops.whymatch.rise_saliency(grids.float(), shifts, scores.float(), *size)
    _close(got, per_mask)


def test_grouped_path_is_linear_in_the_scores():
    grids, shifts, scores = _inputs(1500, 7, (48, 48), 2, seed=3)
    a = ops.rise_saliency(grids, shifts, scores, (48, 48))
    b = ops.rise_saliency(grids, shifts, scores - 5.0, (48, 48))
    ones = ops.rise_saliency(grids, shifts, torch.full_like(scores, 5.0), (48, 48))
    _close(a - b, ones)


def test_grouped_path_checks_the_shifts():
    grids, shifts, scores = _inputs(2000, 7, (56, 56), 1)
    shifts[3, 1] = 8  # cell = 8 for 56 / 7: valid shifts are 0..7
    with pytest.raises(ValueError, match=r"shifts\[3\] must lie in \[0, 8\) x \[0, 8\)"):
        ops.rise_saliency(grids, shifts, scores, (56, 56))
