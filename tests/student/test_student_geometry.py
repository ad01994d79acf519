"""Lift-splat geometry, image-augmentation undo, 4D alignment and depth targets on hand-made cameras.

Camera used throughout: 64x64 augmented image, stride 16 (4x4 feature cells), focal 32 px, principal point
(31.5, 31.5). Feature cell (row 1, col 2) has its centre at pixel (39.5, 23.5), i.e. the ray (0.25, -0.25, 1).
Depth bins 2..12 m in 1 m steps: bin 5 is lifted at 7.5 m, so the frustum point is (1.875, -1.875, 7.5) in the
camera frame; a camera at the origin looking along +x puts it at LiDAR (7.5, -1.875, 1.875), one looking along -x
at (-7.5, 1.875, 1.875). BEV grid +-10.4 m at 0.8 m (26 x 26 cells).
"""

import math

import numpy as np
import pytest
import torch

from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVRange
from distillbev.pipeline.student.config import DepthBins
from distillbev.pipeline.student.depth_net import depth_bce_loss, depth_targets
from distillbev.pipeline.student.temporal import align_previous_bev
from distillbev.pipeline.student.view_transformer import (CameraGeometry, LiftSplat, frustum_points,
                                                          undo_image_aug)

BINS = DepthBins(start=2.0, stop=12.0, step=1.0)
BEV = BEVRange(x_min=-10.4, x_max=10.4, y_min=-10.4, y_max=10.4, resolution=0.8, z_min=-5.0, z_max=5.0)


def aug_matrix(**kwargs) -> torch.Tensor:
    return torch.tensor(BEVAugmentation(**kwargs).matrix(), dtype=torch.float32)


@pytest.mark.parametrize("augmentation, camera, expected_cell", [
    (dict(), 0, (10, 22)),  # (7.5, -1.875): ix = floor(17.9 / 0.8) = 22, iy = floor(8.525 / 0.8) = 10
    (dict(), 1, (15, 3)),  # (-7.5, 1.875)
    (dict(rotation=math.pi / 2), 0, (22, 15)),  # rotated to (1.875, 7.5)
    (dict(flip_x=True), 0, (15, 22)),  # y -> -y: (7.5, 1.875)
    (dict(flip_y=True), 1, (15, 22)),  # x -> -x: (7.5, 1.875)
    (dict(rotation=math.pi / 2, flip_x=True), 0, (3, 15)),  # (-y, x) then y -> -y: (1.875, -7.5)
    (dict(scale=1.1), 0, (10, 23)),  # (8.25, -2.0625)
])
def test_one_hot_depth_lands_in_the_expected_bev_cell(hand_camera, augmentation, camera, expected_cell):
    camera_looking_along, intrinsics = hand_camera
    cameras = torch.stack([camera_looking_along(0.0), camera_looking_along(math.pi)])  # (N=2, 4, 4)
    geometry = CameraGeometry(
        intrinsics=intrinsics(32.0, 31.5, 31.5).expand(2, 2, 3, 3),
        camera_to_lidar=cameras.expand(2, 2, 4, 4),
        image_aug=torch.eye(3).expand(2, 2, 3, 3),
        bev_aug=torch.stack([torch.eye(4), aug_matrix(**augmentation)]),
    )
    channels = 3
    depth = torch.zeros(4, BINS.count, 4, 4)  # (B*N, D, Hf, Wf)
    depth[0, 5, 1, 2] = 1.0  # sample 0, camera 0, identity augmentation
    depth[2 + camera, 5, 1, 2] = 1.0  # sample 1, the parametrised camera and augmentation
    # Every (camera, channel, pixel) carries a distinct value, so a wrong gather shows up as a wrong value.
    context = (torch.arange(4)[:, None, None, None] * 100 + torch.arange(channels)[None, :, None, None] * 10
               + torch.arange(16).view(1, 1, 4, 4) + 1).float()
    pooled = LiftSplat((64, 64), 16, BINS, BEV)(depth, context, geometry)

    assert pooled.shape == (2, channels, 26, 26)
    assert torch.equal(pooled[0, :, 10, 22], context[0, :, 1, 2])
    iy, ix = expected_cell
    assert torch.equal(pooled[1, :, iy, ix], context[2 + camera, :, 1, 2])
    # Nothing else received any feature.
    assert pooled.abs().sum() == pytest.approx(float(context[0, :, 1, 2].sum() + context[2 + camera, :, 1, 2].sum()))


def test_image_aug_undo_round_trip(hand_camera):
    _, intrinsics = hand_camera
    camera_matrix = intrinsics(1266.0, 816.0, 491.0)
    scale, crop_x, crop_y = 0.22, 4.0, 70.0  # 1600x900 -> resize 352x198 -> crop to 128 rows starting at 70
    image_aug = torch.tensor([[scale, 0.0, -crop_x], [0.0, scale, -crop_y], [0.0, 0.0, 1.0]])
    rng = np.random.default_rng(0)
    points = torch.tensor(np.c_[rng.uniform(-5, 5, (20, 2)), rng.uniform(3, 40, 20)], dtype=torch.float32)
    original = (points @ camera_matrix.T)[:, :2] / points[:, 2:3]
    augmented = original * scale - torch.tensor([crop_x, crop_y])
    recovered = undo_image_aug(augmented.view(1, 1, 20, 2), image_aug.view(1, 1, 3, 3)).view(20, 2)
    assert torch.allclose(recovered, original, atol=1e-3)

    # A frustum point of the augmented feature grid lies on the ray of the original pixel it came from.
    geometry = CameraGeometry(camera_matrix.view(1, 1, 3, 3), torch.eye(4).view(1, 1, 4, 4),
                              image_aug.view(1, 1, 3, 3), torch.eye(4).view(1, 4, 4))
    frustum = frustum_points(geometry, (128, 352), 16, BINS)  # (1, 1, D, 8, 22, 3)
    row, col, k = 3, 10, 7
    u_original = (col * 16 + 7.5 + crop_x) / scale
    v_original = (row * 16 + 7.5 + crop_y) / scale
    depth = BINS.start + (k + 0.5) * BINS.step
    expected = depth * torch.linalg.inv(camera_matrix) @ torch.tensor([u_original, v_original, 1.0])
    assert torch.allclose(frustum[0, 0, k, row, col], expected, atol=1e-4)


@pytest.mark.parametrize("motion, augmentation, source_cell, expected_cell", [
    # Ego drove 1.6 m forward: the object at previous (1.2, -2.0) is now at (-0.4, -2.0).
    (dict(translation=(-1.6, 0.0)), dict(), (2, 6), (2, 4)),
    # Ego turned by -90 deg: previous (1.2, -2.0) is now at (2.0, 1.2).
    (dict(yaw=math.pi / 2), dict(), (2, 6), (6, 7)),
    # Same drive under a y-flip augmentation: both maps are mirrored, so (1.2, 2.0) -> (-0.4, 2.0).
    (dict(translation=(-1.6, 0.0)), dict(flip_x=True), (7, 6), (7, 4)),
])
def test_previous_frame_alignment_moves_static_object_onto_its_current_cell(motion, augmentation, source_cell,
                                                                             expected_cell):
    bev = BEVRange(x_min=-4.0, x_max=4.0, y_min=-4.0, y_max=4.0, resolution=0.8)  # 10 x 10, centres -3.6 + 0.8k
    prev_to_current = torch.eye(4)
    yaw = motion.get("yaw", 0.0)
    prev_to_current[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    prev_to_current[:2, 3] = torch.tensor(motion.get("translation", (0.0, 0.0)))
    previous = torch.zeros(1, 2, 10, 10)
    previous[0, :, source_cell[0], source_cell[1]] = torch.tensor([1.0, 5.0])
    aligned = align_previous_bev(previous, prev_to_current[None], aug_matrix(**augmentation)[None], bev)
    iy, ix = expected_cell
    assert torch.allclose(aligned[0, :, iy, ix], torch.tensor([1.0, 5.0]), atol=1e-5)
    assert aligned.abs().sum() == pytest.approx(6.0, abs=1e-4)


@pytest.mark.parametrize("augmentation", [dict(), dict(rotation=0.7, flip_y=True, scale=1.05)])
@pytest.mark.parametrize("crop_x, columns", [(0.0, (2, 1)), (16.0, (1, 0))])
def test_depth_target_from_projected_points(hand_camera, augmentation, crop_x, columns):
    camera_looking_along, intrinsics = hand_camera
    # Camera-frame points (x right, y down, z forward); the camera looks along LiDAR +x, so LiDAR = (z, -x, -y).
    in_camera = torch.tensor([
        [2.0, -2.0, 7.6],  # pixel (39.92, 23.08) -> (40, 23): row 1, col 2, bin floor(5.6) = 5
        [2.5, -2.5, 9.3],  # the same cell but farther: the minimum depth wins
        [-1.0, 1.0, 4.2],  # pixel (23.88, 39.12) -> row 2, col 1, bin 2
        [0.1, 0.1, 13.0],  # row 2, col 2, depth beyond the last bin: invalid
        [0.0, 0.0, -5.0],  # behind the camera
        [10.0, 0.0, 5.0],  # right of the image
    ])
    lidar = torch.stack([in_camera[:, 2], -in_camera[:, 0], -in_camera[:, 1]], dim=1)
    matrix = BEVAugmentation(**augmentation).matrix()
    augmented = torch.tensor(BEVAugmentation(**augmentation).apply_points(lidar.numpy().astype(np.float64)),
                             dtype=torch.float32)
    geometry = CameraGeometry(intrinsics(32.0, 31.5, 31.5).view(1, 1, 3, 3), camera_looking_along(0.0).view(1, 1, 4, 4),
                              torch.tensor([[1.0, 0.0, -crop_x], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 1, 3, 3),
                              torch.tensor(matrix, dtype=torch.float32).view(1, 4, 4))
    points = torch.cat([augmented, torch.zeros(len(augmented), 2)], dim=1)  # (P, 5) as Sample.points
    one_hot, valid = depth_targets([points], geometry, (64, 64), 16, BINS)

    expected_valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected_valid[0, 1, columns[0]] = True
    expected_valid[0, 2, columns[1]] = True
    assert torch.equal(valid, expected_valid)
    assert one_hot.shape == (1, BINS.count, 4, 4)
    assert one_hot.sum() == 2
    assert one_hot[0, 5, 1, columns[0]] == 1 and one_hot[0, 2, 2, columns[1]] == 1


def test_depth_bce_loss_values():
    one_hot = torch.zeros(1, 4, 2, 2)
    one_hot[0, 1, 0, 0] = 1.0
    valid = torch.zeros(1, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = True
    assert depth_bce_loss(one_hot, one_hot, valid, 100.0).item() < 1e-3
    uniform = torch.full((1, 4, 2, 2), 0.25)
    # One valid cell: -log(0.25) + 3 * -log(0.75), averaged over all 16 elements, times 100.
    expected = 100.0 * (-math.log(0.25) - 3 * math.log(0.75)) / 16
    assert depth_bce_loss(uniform, one_hot, valid, 100.0).item() == pytest.approx(expected, rel=1e-5)


class Square(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


@pytest.mark.parametrize("before, expected", [(True, 2.0), (False, 1.0)])
def test_temporal_pre_process_runs_before_or_after_the_alignment(before, expected):
    """A previous-frame cell of value 2 moved by half a cell (0.4 m along x) splits bilinearly over two cells.
    Refined first (the reference's before=True, squared here): 4 -> two cells of 2. Aligned first: two cells of 1,
    squared -> 1 each. The current frame is refined either way."""
    from distillbev.pipeline.student.temporal import TemporalFusion

    bev = BEVRange(x_min=-4.0, x_max=4.0, y_min=-4.0, y_max=4.0, resolution=0.8)  # 10 x 10
    fusion = TemporalFusion(1, bev, pre_process=True, pre_process_before_align=before)
    fusion.pre_process = Square()
    previous = torch.zeros(1, 1, 10, 10)
    previous[0, 0, 5, 5] = 2.0
    current = torch.full((1, 1, 10, 10), 3.0)
    prev_to_current = torch.eye(4)
    prev_to_current[0, 3] = 0.4
    fused = fusion(current, previous, prev_to_current[None], torch.eye(4)[None])
    assert fused.shape == (1, 2, 10, 10)
    assert torch.all(fused[0, 0] == 9.0)
    aligned = fused[0, 1]
    assert aligned[5, 5].item() == pytest.approx(expected, abs=1e-5)
    assert aligned[5, 6].item() == pytest.approx(expected, abs=1e-5)
    assert aligned.sum().item() == pytest.approx(2 * expected, abs=1e-4)
