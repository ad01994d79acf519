"""CenterHead targets, loss and decoding against hand-computed values; encode -> decode round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillbev.pipeline.data.classes import DETECTION_CLASSES, TASK_GROUPS
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVGrid
from distillbev.pipeline.heads.center_head import CenterHead, CenterHeadConfig, gaussian_focal_loss
from distillbev.pipeline.heads.decode import circle_nms
from distillbev.pipeline.heads.targets import build_targets, gaussian_radius, gt_heatmap_max

GRID = BEVGrid(-12.8, 12.8, -12.8, 12.8, 0.8)  # 32 x 32 cells
CAR = [1.0, -2.0, 0.5, 4.0, 2.0, 1.5, 0.3, 1.0, -0.5]


def targets_of(boxes, labels):
    return build_targets([torch.tensor(boxes, dtype=torch.float32)], [torch.tensor(labels)], GRID, TASK_GROUPS,
                         DETECTION_CLASSES, gaussian_overlap=0.1, min_radius=2)


def test_gaussian_radius_by_hand():
    # 5 x 2.5 cells, overlap 0.1: r1 = 5.708, r2 = 10.854, r3 = (-1.5 + sqrt(2.25 + 18)) / 2 = 1.5
    assert gaussian_radius(5.0, 2.5, 0.1) == pytest.approx(1.5)


def test_box_gives_peak_at_expected_cell_and_exact_regression():
    targets = targets_of([CAR], [0])
    car = targets[0]
    # centre (1.0, -2.0): column (1.0 + 12.8) / 0.8 = 17.25 -> 17, row (-2.0 + 12.8) / 0.8 = 13.5 -> 13
    heatmap = car.heatmap[0, 0]
    assert heatmap[13, 17] == 1.0 and int(heatmap.eq(1).sum()) == 1
    sigma = 5 / 6  # radius max(2, int(1.5)) = 2 -> diameter 5 -> sigma 5/6
    assert heatmap[13, 18].item() == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), rel=1e-6)
    assert heatmap[15, 19].item() == pytest.approx(math.exp(-8 / (2 * sigma ** 2)), rel=1e-5)
    assert heatmap[13, 20] == 0 and heatmap[16, 17] == 0
    assert car.indices.tolist() == [[13 * 32 + 17]] and car.mask.tolist() == [[True]]
    expected = [0.25, 0.5, 0.5, math.log(4.0), math.log(2.0), math.log(1.5), math.sin(0.3), math.cos(0.3), 1.0, -0.5]
    np.testing.assert_allclose(car.boxes[0, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    for other in targets[1:]:
        assert other.heatmap.sum() == 0 and not other.mask.any()


def test_classes_go_to_their_task_slot_and_out_of_grid_boxes_are_skipped():
    construction = [5.0, 5.0, 0.0, 6.0, 3.0, 3.0, 0.0, 0.0, 0.0]
    outside = [20.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]
    targets = targets_of([construction, outside], [2, 0])  # construction_vehicle -> task 1, class slot 1
    assert targets[1].heatmap[0, 1].max() == 1.0 and targets[1].heatmap[0, 0].max() == 0.0
    assert targets[0].heatmap.sum() == 0 and not targets[0].mask.any()


def test_gt_heatmap_max_is_the_max_over_all_task_heatmaps():
    boxes = [CAR, [2.0, -1.0, 0.0, 0.8, 0.6, 1.7, 0.0, 0.0, 0.0], [-8.0, 6.0, 0.0, 10.0, 2.5, 3.0, 1.0, 0.0, 0.0]]
    labels = [0, 8, 3]
    targets = targets_of(boxes, labels)
    expected = torch.cat([t.heatmap for t in targets], dim=1).amax(dim=1)
    actual = gt_heatmap_max([torch.tensor(boxes)], [torch.tensor(labels)], GRID)
    assert actual.shape == (1, 32, 32)
    torch.testing.assert_close(actual, expected)
    assert int(actual.eq(1).sum()) == 3


def perfect_outputs(config: CenterHeadConfig, boxes, labels) -> list[dict[str, torch.Tensor]]:
    """Head outputs that decode exactly to the given boxes: logits +8 at the peaks, regression at the cells."""
    targets = build_targets([torch.tensor(boxes, dtype=torch.float32)], [torch.tensor(labels)], config.grid,
                            config.tasks, DETECTION_CLASSES)
    outputs = []
    ny, nx = config.grid.shape
    for target in targets:
        heatmap = torch.where(target.heatmap.eq(1), torch.tensor(8.0), torch.tensor(-8.0))
        code = torch.zeros(1, 10, ny * nx)
        for slot in range(target.mask.shape[1]):
            if target.mask[0, slot]:
                code[0, :, target.indices[0, slot]] = target.boxes[0, slot]
        code = code.reshape(1, 10, ny, nx)
        outputs.append({"reg": code[:, 0:2], "height": code[:, 2:3], "dim": code[:, 3:6], "rot": code[:, 6:8],
                        "vel": code[:, 8:10], "heatmap": heatmap})
    return outputs


BOXES = [CAR, [-6.0, 7.0, -0.3, 0.7, 0.6, 1.8, -2.5, 0.4, 0.2], [8.0, 8.0, 1.0, 11.0, 2.9, 3.5, 3.0, -4.0, 1.0],
         [-9.0, -9.0, 0.2, 0.4, 0.4, 1.0, 0.0, 0.0, 0.0]]
LABELS = [0, 8, 3, 9]


def assert_same_boxes(detections, boxes, labels):
    order = np.argsort(detections.labels)
    expected_order = np.argsort(labels)
    np.testing.assert_array_equal(detections.labels[order], np.asarray(labels)[expected_order])
    np.testing.assert_allclose(detections.boxes[order], np.asarray(boxes, dtype=np.float32)[expected_order],
                               atol=1e-4, rtol=1e-5)
    assert np.all(detections.scores > 0.99)


def test_encode_decode_round_trip():
    config = CenterHeadConfig(grid=GRID)
    head = CenterHead(config, in_channels=8)
    detections = head.decode(perfect_outputs(config, BOXES, LABELS), ["token"])
    assert len(detections) == 1 and detections[0].sample_token == "token"
    assert_same_boxes(detections[0], BOXES, LABELS)


def test_decode_undoes_the_bev_augmentation():
    config = CenterHeadConfig(grid=GRID)
    head = CenterHead(config, in_channels=8)
    augmentation = BEVAugmentation(rotation=0.3, scale=1.04, flip_x=True, flip_y=False)
    augmented = augmentation.apply_boxes(np.asarray(BOXES))
    bev_aug = torch.from_numpy(augmentation.matrix()).float()[None]
    detections = head.decode(perfect_outputs(config, augmented.tolist(), LABELS), ["t"], bev_aug)
    expected = np.asarray(BOXES)
    expected[:, 6] = (expected[:, 6] + np.pi) % (2 * np.pi) - np.pi
    assert_same_boxes(detections[0], expected.tolist(), LABELS)


def test_circle_nms_by_hand():
    centers = np.array([[0.0, 0.0], [0.5, 0.0], [3.0, 0.0], [0.0, 0.9]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # (0, 0.9) wins; (0, 0) is 0.81 m^2 away (suppressed), (0.5, 0) 1.06 m^2 from it (kept), then (3, 0)
    assert circle_nms(centers, scores, 1.0, post_max_size=10).tolist() == [3, 1, 2]
    assert circle_nms(centers, scores, 1.0, post_max_size=2).tolist() == [3, 1]


def test_focal_loss_by_hand():
    probabilities = torch.tensor([0.9, 0.2])
    target = torch.tensor([1.0, 0.5])
    expected = -math.log(0.9) * 0.1 ** 2 - math.log(0.8) * 0.2 ** 2 * 0.5 ** 4
    assert gaussian_focal_loss(probabilities, target).item() == pytest.approx(expected, rel=1e-5)


def test_loss_box_term_by_hand_and_zero_for_perfect_regression():
    config = CenterHeadConfig(grid=GRID)
    head = CenterHead(config, in_channels=8)
    outputs = perfect_outputs(config, [CAR], [0])
    losses = head.loss(outputs, [torch.tensor([CAR])], [torch.tensor([0])])
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-6)
    zero = [{k: torch.zeros_like(v) if k != "heatmap" else v for k, v in task.items()} for task in outputs]
    losses = head.loss(zero, [torch.tensor([CAR])], [torch.tensor([0])])
    code = [0.25, 0.5, 0.5, math.log(4.0), math.log(2.0), math.log(1.5), math.sin(0.3), math.cos(0.3), 1.0, 0.5]
    weights = config.code_weights
    expected = 0.25 * sum(abs(c) * w for c, w in zip(code, weights)) / (1 + 1e-4)
    assert losses["loss_box"].item() == pytest.approx(expected, rel=1e-5)
    assert set(losses) == {"loss_heatmap", "loss_box"}  # every entry is a term: the total is their sum
