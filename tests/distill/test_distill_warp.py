"""Approximate-mode warping of identity-view BEV maps into an augmented view."""

from __future__ import annotations

import numpy as np
import torch

from distillbev.pipeline.distill.warp import warp_bev
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVGrid

EXTENT = (-4.0, 4.0, -4.0, 4.0)
GRID = BEVGrid(*EXTENT, resolution=1.0)  # 8 x 8


def one_hot_at(x: float, y: float) -> torch.Tensor:
    maps = torch.zeros(1, 8, 8)
    ix, iy = int((x - GRID.x_min) // GRID.resolution), int((y - GRID.y_min) // GRID.resolution)
    maps[0, iy, ix] = 1.0
    return maps


def peak_xy(maps: torch.Tensor) -> np.ndarray:
    iy, ix = np.unravel_index(int(maps[0].argmax()), (8, 8))
    return np.array([GRID.x_min + (ix + 0.5) * GRID.resolution, GRID.y_min + (iy + 0.5) * GRID.resolution])


def test_flip_x_reverses_rows_and_moves_a_cell_to_its_mirror():
    maps = one_hot_at(1.5, 2.5)
    out = warp_bev(maps, BEVAugmentation(flip_x=True), EXTENT)
    np.testing.assert_allclose(peak_xy(out), [1.5, -2.5])
    out = warp_bev(maps, BEVAugmentation(flip_y=True), EXTENT)
    np.testing.assert_allclose(peak_xy(out), [-1.5, 2.5])


def test_rotation_by_90_degrees_moves_the_peak_where_the_matrix_sends_it():
    maps = one_hot_at(2.5, 0.5)
    aug = BEVAugmentation(rotation=np.pi / 2)
    out = warp_bev(maps, aug, EXTENT, mode="nearest")
    expected = aug.apply_points(np.array([[2.5, 0.5, 0.0]]))[0, :2]  # (-0.5, 2.5)
    np.testing.assert_allclose(peak_xy(out), expected, atol=1e-6)
    assert float(out.sum()) == 1.0


def test_identity_rotation_with_unit_scale_is_exact_and_keeps_shape():
    maps = torch.rand(2, 3, 8, 8)
    out = warp_bev(maps, BEVAugmentation(rotation=1e-9), EXTENT)
    assert out.shape == maps.shape
    torch.testing.assert_close(out, maps, atol=1e-5, rtol=0)
