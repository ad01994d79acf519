"""Frame round trips (global <-> ego <-> LiDAR <-> camera), BEV grid cells and augmentation matrices by hand."""

from __future__ import annotations

import numpy as np
import pytest
from pyquaternion import Quaternion

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.loading import ImageAugmentation, sample_image_augmentation
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVGrid
from distillbev.pipeline.heads.targets import box_cell
from distillbev.pipeline.geometry.transforms import (invert_transform, make_transform, points_in_boxes,
                                                     project_to_image, quaternion_to_matrix, quaternion_yaw,
                                                     transform_points, yaw_to_quaternion)

# The tiny dataroot's rig: ego at (100, 200, 0) facing global +y; LiDAR rotated -90 deg; ideal CAM_FRONT.
EGO_TO_GLOBAL = make_transform(yaw_to_quaternion(np.pi / 2), [100.0, 200.0, 0.0])
LIDAR_TO_EGO = make_transform(yaw_to_quaternion(-np.pi / 2), [0.943713, 0.0, 1.84023])
CAMERA_TO_EGO = make_transform([0.5, -0.5, 0.5, -0.5], [1.7, 0.0, 1.5])
REAL_LIDAR_ROTATION = [0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817]


def test_point_global_ego_lidar_camera_by_hand():
    point_global = np.array([[95.0, 210.0, 1.5]])
    ego = transform_points(invert_transform(EGO_TO_GLOBAL), point_global)
    np.testing.assert_allclose(ego, [[10.0, 5.0, 1.5]], atol=1e-9)  # 10 m ahead, 5 m to the left
    lidar = transform_points(invert_transform(LIDAR_TO_EGO), ego)
    np.testing.assert_allclose(lidar, [[-5.0, 10.0 - 0.943713, 1.5 - 1.84023]], atol=1e-9)
    camera = transform_points(invert_transform(CAMERA_TO_EGO), ego)
    np.testing.assert_allclose(camera, [[-5.0, 0.0, 8.3]], atol=1e-9)  # x right, y down, z forward
    intrinsics = np.array([[1000.0, 0, 800.0], [0, 1000.0, 450.0], [0, 0, 1]])
    pixels, depth = project_to_image(camera, intrinsics)
    np.testing.assert_allclose(pixels, [[800.0 - 5000.0 / 8.3, 450.0]])
    np.testing.assert_allclose(depth, [8.3])
    # camera -> lidar directly equals camera -> ego -> lidar.
    camera_to_lidar = invert_transform(LIDAR_TO_EGO) @ CAMERA_TO_EGO
    np.testing.assert_allclose(transform_points(camera_to_lidar, camera), lidar, atol=1e-9)


def test_point_round_trips_through_all_frames():
    rng = np.random.default_rng(0)
    points = rng.uniform(-50, 50, size=(20, 3))
    lidar_to_global = EGO_TO_GLOBAL @ make_transform(REAL_LIDAR_ROTATION, [0.94, 0.0, 1.84])
    chain = [lidar_to_global, invert_transform(lidar_to_global), CAMERA_TO_EGO, invert_transform(CAMERA_TO_EGO)]
    out = points
    for t in chain:
        out = transform_points(t, out)
    np.testing.assert_allclose(out, points, atol=1e-9)


def test_quaternions_agree_with_pyquaternion():
    for q in (REAL_LIDAR_ROTATION, [0.5, -0.5, 0.5, -0.5], yaw_to_quaternion(2.5), [0.1, 0.7, -0.2, 0.3]):
        q = np.asarray(q) / np.linalg.norm(q)
        np.testing.assert_allclose(quaternion_to_matrix(q), Quaternion(q).rotation_matrix, atol=1e-12)
    assert quaternion_yaw(yaw_to_quaternion(-2.0)) == pytest.approx(-2.0)
    assert quaternion_yaw(REAL_LIDAR_ROTATION) == pytest.approx(Quaternion(REAL_LIDAR_ROTATION).yaw_pitch_roll[0],
                                                                abs=2e-4)


def test_bev_grid_cell_of_a_box_centre_by_hand():
    grid = BEVGrid(-51.2, 51.2, -51.2, 51.2, 0.8)
    assert grid.shape == (128, 128)
    # (continuous x, y position in cells, cell ix, iy) of the centres the heatmap targets are drawn at
    cells = [box_cell(np.array(xy), grid) for xy in ([0.0, 0.0], [-51.2, 51.1], [-50.3, -49.7])]
    assert [cell[2:] for cell in cells] == [(64, 64), (0, 127), (1, 1)]
    np.testing.assert_allclose(cells[2][:2], [1.125, 1.875])  # (0.9 / 0.8, 1.5 / 0.8)
    assert box_cell(np.array([51.2, 0.0]), grid) is None and box_cell(np.array([0.0, -51.3]), grid) is None
    wide = BEVGrid(-10.0, 10.0, -5.0, 5.0, 1.0)
    assert wide.shape == (10, 20)  # (Y, X)
    assert box_cell(np.array([-2.5, -2.5]), wide)[2:] == (7, 2)  # (ix, iy): map row iy = 2, column ix = 7


def test_bev_augmentation_matrices_by_hand():
    point = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(BEVAugmentation(flip_x=True).apply_points(point), [[1.0, -2.0, 3.0]])
    np.testing.assert_allclose(BEVAugmentation(flip_y=True).apply_points(point), [[-1.0, 2.0, 3.0]])
    np.testing.assert_allclose(BEVAugmentation(rotation=np.pi / 2).apply_points(point), [[-2.0, 1.0, 3.0]],
                               atol=1e-12)
    # rotation first, then scale, then flip: (1, 0) -> (0, 1) -> (0, 2) -> (0, -2).
    aug = BEVAugmentation(rotation=np.pi / 2, scale=2.0, flip_x=True)
    np.testing.assert_allclose(aug.apply_points(np.array([[1.0, 0.0, 1.0]])), [[0.0, -2.0, 2.0]], atol=1e-12)


def test_box_yaw_and_velocity_under_flips():
    box = np.array([[3.0, 1.0, 0.0, 4.0, 2.0, 1.5, 0.3, 1.0, 0.5]])
    flipped_x = BEVAugmentation(flip_x=True).apply_boxes(box)[0]
    np.testing.assert_allclose(flipped_x[[0, 1, 6, 7, 8]], [3.0, -1.0, -0.3, 1.0, -0.5])
    flipped_y = BEVAugmentation(flip_y=True).apply_boxes(box)[0]
    np.testing.assert_allclose(flipped_y[[0, 1, 6, 7, 8]], [-3.0, 1.0, np.pi - 0.3, -1.0, 0.5])
    rotated = BEVAugmentation(rotation=0.5, scale=1.05).apply_boxes(box)[0]
    np.testing.assert_allclose(rotated[3:6], [4.2, 2.1, 1.575])
    np.testing.assert_allclose(rotated[6], 0.8)


def test_points_inside_boxes_stay_inside_under_random_augmentations():
    rng = np.random.default_rng(1)
    boxes = np.column_stack([rng.uniform(-30, 30, (8, 2)), rng.uniform(-1, 1, 8), rng.uniform(1, 6, (8, 3)),
                             rng.uniform(-np.pi, np.pi, 8), np.zeros((8, 2))])
    # One point per box, somewhere inside it (box-frame offsets within 90% of the half sizes).
    local = rng.uniform(-0.45, 0.45, (8, 3)) * boxes[:, 3:6]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    points = boxes[:, :3] + np.column_stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1],
                                             local[:, 2]])
    assert np.all(np.diag(points_in_boxes(points, boxes)))
    for _ in range(10):
        aug = BEVAugmentation(float(rng.uniform(-0.4, 0.4)), float(rng.uniform(0.95, 1.05)),
                              bool(rng.uniform() < 0.5), bool(rng.uniform() < 0.5))
        inside = points_in_boxes(aug.apply_points(points), aug.apply_boxes(boxes))
        assert np.all(np.diag(inside)), aug


def test_image_augmentation_matrix_by_hand():
    aug = ImageAugmentation(source_size=(400, 200), resize_dims=(200, 100), crop=(10, 20), final_size=(60, 150),
                            flip=True)
    # (100, 100) -> resize 0.5 -> (50, 50) -> crop -> (40, 30) -> flip in a 150-wide image -> (110, 30).
    np.testing.assert_allclose(aug.matrix() @ [100.0, 100.0, 1.0], [110.0, 30.0, 1.0])
    rotated = ImageAugmentation((400, 200), (400, 200), (0, 0), (200, 400), rotation=90.0)
    # 90 deg counter-clockwise on screen about (200, 100): a point 50 px right of the centre moves 50 px up.
    np.testing.assert_allclose(rotated.matrix() @ [250.0, 100.0, 1.0], [200.0, 50.0, 1.0], atol=1e-9)


def test_test_mode_image_augmentation_is_bevdet_crop():
    aug = sample_image_augmentation(DataConfig(final_size=(256, 704)), (1600, 900), rng=None)
    assert aug.resize_dims == (704, 396) and aug.crop == (0, 140) and not aug.flip and aug.rotation == 0.0
    rng_aug = sample_image_augmentation(DataConfig(final_size=(256, 704)), (1600, 900), np.random.default_rng(0))
    assert 0.38 * 1600 <= rng_aug.resize_dims[0] <= 0.55 * 1600 and abs(rng_aug.rotation) <= 5.4
