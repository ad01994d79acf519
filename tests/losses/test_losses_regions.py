"""Foreground / background / false-positive masks and adaptive scales on hand-made grids."""

from __future__ import annotations

import math

import torch

from distillbev.pipeline.losses.regions import (align_to_grid, background_scale, build_region_masks,
                                                cell_corner_points, first_containing_box, false_positive_mask)


def box(x, y, length, width, yaw=0.0, z=0.0, height=1.0):
    return [x, y, z, length, width, height, yaw]


def cells(mask: torch.Tensor) -> set[tuple[int, int]]:
    """Lit cells of a (Y, X) mask as (x index, y index)."""
    return {(int(ix), int(iy)) for iy, ix in torch.nonzero(mask).tolist()}


def test_corner_points_layout_and_values():
    points = cell_corner_points((2, 3), (0.0, 3.0, -2.0, 2.0))  # res 1 m in x, 2 m in y
    assert points.shape == (2, 3, 2)
    assert points[0, 0].tolist() == [0.0, -2.0]
    assert points[0, 2].tolist() == [2.0, -2.0]  # row 0 varies in x
    assert points[1, 0].tolist() == [0.0, 0.0]  # row 1 is the next y, no half-cell offset


def test_rotated_45_degree_box_cells_by_hand():
    # Corner points are the integers 0..5. Centre (2.5, 2.5), l=4 along (1,1)/sqrt2, w=2: a point is inside when
    # |dx+dy| < 2*sqrt2 and |dy-dx| < sqrt2, i.e. x+y-5 in {-2..2} and y-x in {-1,0,1}.
    index = first_containing_box(torch.tensor([box(2.5, 2.5, 4.0, 2.0, yaw=math.pi / 4)]), (6, 6),
                                 (0.0, 6.0, 0.0, 6.0))
    expected = {(2, 2), (3, 3), (1, 2), (2, 3), (3, 4), (2, 1), (3, 2), (4, 3)}
    assert cells(index >= 0) == expected


def test_box_offset_in_plus_y_lights_a_row_not_a_column():
    extent = (-4.0, 4.0, -4.0, 4.0)
    row_box = torch.tensor([box(0.0, 2.2, 8.5, 0.6)])  # long in x, thin in y, at y = 2.2
    mask = first_containing_box(row_box, (8, 8), extent) >= 0
    assert mask[6].all() and int(mask.sum()) == 8  # y = 2 is row (2 - -4) / 1 = 6
    column_box = torch.tensor([box(2.2, 0.0, 0.6, 8.5)])
    mask = first_containing_box(column_box, (8, 8), extent) >= 0
    assert mask[:, 6].all() and int(mask.sum()) == 8


def test_corner_convention_not_cell_centre():
    extent = (0.0, 4.0, 0.0, 4.0)
    on_corner = first_containing_box(torch.tensor([box(1.0, 1.0, 0.4, 0.4)]), (4, 4), extent)
    assert cells(on_corner >= 0) == {(1, 1)}
    on_centre = first_containing_box(torch.tensor([box(1.5, 1.5, 0.4, 0.4)]), (4, 4), extent)
    assert not bool((on_centre >= 0).any())


def test_boundary_points_are_outside_and_z_is_ignored():
    extent = (0.0, 4.0, 0.0, 4.0)
    # Axis-aligned 2x2 box centred on corner (2, 2): corners at x or y = 1 or 3 lie on its edges -> outside.
    mask = first_containing_box(torch.tensor([box(2.0, 2.0, 2.0, 2.0, z=50.0, height=0.1)]), (4, 4), extent) >= 0
    assert cells(mask) == {(2, 2)}


def test_resolution_comes_from_shape_and_extent():
    # (Y, X) = (2, 4) over 4 m x 4 m: 1 m columns, 2 m rows; corner (1, 2) is cell [iy=1, ix=1].
    mask = first_containing_box(torch.tensor([box(1.0, 2.0, 0.5, 0.5)]), (2, 4), (0.0, 4.0, 0.0, 4.0)) >= 0
    assert cells(mask) == {(1, 1)}


def test_empty_boxes_give_all_background():
    masks = build_region_masks([torch.zeros(0, 9)], (3, 3), (0.0, 3.0, 0.0, 3.0), device="cpu")
    assert not bool(masks.foreground.any()) and bool(masks.background.all())
    assert torch.allclose(masks.background_scale, torch.tensor([1 / 9]))
    assert torch.allclose(masks.scale, torch.full((1, 3, 3), 1 / 9))


def test_adaptive_scale_value_and_background_count():
    # 4x4 grid of 2 m cells (area 4 m^2), corners {0, 2, 4, 6}. Box centre (3, 3), 4 x 3 m: |x-3| < 2, |y-3| < 1.5
    # -> corners x in {2, 4}, y in {2, 4}: 4 cells. s_fg = sqrt(4 / 12), N_bg = 12, s_bg = 1/12.
    masks = build_region_masks([torch.tensor([box(3.0, 3.0, 4.0, 3.0)])], (4, 4), (0.0, 8.0, 0.0, 8.0),
                               device="cpu")
    assert cells(masks.foreground[0]) == {(1, 1), (2, 1), (1, 2), (2, 2)}
    assert int(masks.background.sum()) == 12
    assert torch.allclose(masks.background_scale, torch.tensor([1 / 12]))
    s_fg = math.sqrt(4 / 12)
    assert torch.allclose(masks.foreground_scale[0][masks.foreground[0]], torch.full((4,), s_fg))
    assert torch.allclose(masks.scale[0][masks.foreground[0]], torch.full((4,), s_fg))  # max(s_fg, s_bg) = s_fg
    assert torch.allclose(masks.scale[0][masks.background[0]], torch.full((12,), 1 / 12))


def test_scale_takes_background_value_when_larger():
    # 2x2 grid of 2 m cells; a 3.9 x 11.9 m box covers only the y=0 corners: s_fg = sqrt(4 / 46.41) = 0.294,
    # N_bg = 2 so s_bg = 0.5 > s_fg and S = 0.5 on the foreground cells.
    masks = build_region_masks([torch.tensor([box(1.0, -5.0, 3.9, 11.9)])], (2, 2), (0.0, 4.0, 0.0, 4.0),
                               device="cpu")
    assert masks.foreground[0].tolist() == [[True, True], [False, False]]
    assert torch.allclose(masks.foreground_scale[0, 0], torch.full((2,), math.sqrt(4 / (3.9 * 11.9))))
    assert torch.allclose(masks.scale[0], torch.full((2, 2), 0.5))


def test_overlapping_boxes_use_the_first_box_scale():
    first = box(1.0, 1.0, 0.5, 0.5)  # area 0.25 -> s_fg = sqrt(1 / 0.25) = 2
    second = box(1.0, 1.0, 1.5, 1.5)  # area 2.25 -> s_fg = 2/3; both contain only corner (1, 1)
    masks = build_region_masks([torch.tensor([first, second])], (3, 3), (0.0, 3.0, 0.0, 3.0), device="cpu")
    assert float(masks.foreground_scale[0, 1, 1]) == 2.0
    masks = build_region_masks([torch.tensor([second, first])], (3, 3), (0.0, 3.0, 0.0, 3.0), device="cpu")
    assert abs(float(masks.foreground_scale[0, 1, 1]) - 2 / 3) < 1e-6


def fp_case():
    """2x3 grid of 1 m cells; one box on corner (2, 1) -> cell [1, 2]; heatmaps on the same grid."""
    teacher = torch.full((1, 10, 2, 3), 0.05)
    gt = torch.zeros(1, 2, 3)
    teacher[0, 3, 0, 0], gt[0, 0, 0] = 0.5, 0.05  # teacher fires, no GT heat: FP
    teacher[0, 7, 0, 1], gt[0, 0, 1] = 0.5, 0.2  # GT heat 0.2: not FP
    teacher[0, 2, 1, 2], gt[0, 1, 2] = 0.5, 0.05  # inside the box: not FP
    teacher[0, 0, 0, 2] = 0.1  # exactly the teacher threshold: not FP (strict >)
    teacher[0, 0, 1, 0], gt[0, 1, 0] = 0.5, 0.1  # GT heat exactly 0.1: not FP (strict <)
    boxes = [torch.tensor([box(2.0, 1.0, 0.5, 0.5)])]
    return boxes, teacher, gt


def test_false_positive_rule_and_background_removal():
    boxes, teacher, gt = fp_case()
    masks = build_region_masks(boxes, (2, 3), (0.0, 3.0, 0.0, 2.0), device="cpu", teacher_heatmap=teacher,
                               gt_heatmap_max=gt, fp_threshold=0.1, gt_threshold=0.1)
    assert masks.false_positive[0].tolist() == [[True, False, False], [False, False, False]]
    assert masks.foreground[0].tolist() == [[False, False, False], [False, False, True]]
    assert masks.background[0].tolist() == [[False, True, True], [True, True, False]]
    assert torch.allclose(masks.background_scale, torch.tensor([1 / 4]))  # N_bg = 6 - 1 fg - 1 fp
    assert torch.allclose(masks.false_positive_scale, torch.tensor([1.0]))
    without_fp = build_region_masks(boxes, (2, 3), (0.0, 3.0, 0.0, 2.0), device="cpu")
    assert without_fp.false_positive is None and int(without_fp.background.sum()) == 5
    assert torch.allclose(without_fp.background_scale, torch.tensor([1 / 5]))


def test_background_scale_zero_when_no_background_left():
    foreground = torch.tensor([[[True, False], [False, False]]])
    false_positive = torch.tensor([[[False, True], [True, True]]])
    assert background_scale(foreground, false_positive).tolist() == [0.0]
    assert torch.allclose(background_scale(foreground, None), torch.tensor([1 / 3]))


def test_align_to_grid_max_pool_and_repeat():
    fine = torch.zeros(1, 4, 4, dtype=torch.bool)
    fine[0, 1, 3] = True
    assert align_to_grid(fine, (2, 2))[0].tolist() == [[False, True], [False, False]]
    coarse = torch.tensor([[[False, True], [False, False]]])
    up = align_to_grid(coarse, (4, 4))[0]
    assert up[:2, 2:].all() and int(up.sum()) == 4


def test_false_positive_on_finer_heatmap_is_pooled_then_foreground_removed():
    teacher = torch.zeros(1, 10, 4, 4)
    gt = torch.zeros(1, 4, 4)
    teacher[0, 1, 0, 3] = 0.9  # heatmap cell -> layer cell [0, 1]
    teacher[0, 1, 3, 0] = 0.9  # heatmap cell -> layer cell [1, 0], which is foreground
    foreground = torch.tensor([[[False, False], [True, False]]])
    fp = false_positive_mask(teacher, gt, foreground, 0.1, 0.1)
    assert fp[0].tolist() == [[False, True], [False, False]]
