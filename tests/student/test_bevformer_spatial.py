"""Spatial cross-attention: pillars of hand-picked BEV cells projected into a hand-made two-camera rig, and the
per-camera attention averaged over the cameras a query hits."""

from __future__ import annotations

import math

import numpy as np
import torch

from distillbev.pipeline.geometry.bev import BEVAugmentation
from distillbev.pipeline.student.bevformer.spatial_cross_attention import (SpatialCrossAttention, pillar_points,
                                                                           project_pillars)
from distillbev.pipeline.student.config import BEVRange
from distillbev.pipeline.student.view_transformer import CameraGeometry

IMAGE_SIZE = (32, 64)  # (H, W)
FOCAL = 20.0  # wide enough that a point 45 degrees off the axis is still inside the image
# 7x7 cells of 4 m: centres at -12, -8, ..., 12; anchors at z = -1.5 and 1.5
BEV = BEVRange(x_min=-14.0, x_max=14.0, y_min=-14.0, y_max=14.0, resolution=4.0, z_min=-2.0, z_max=2.0)


def camera_looking_along(yaw: float) -> torch.Tensor:
    """(4, 4) camera -> LiDAR of a level camera at the origin looking at `yaw` (camera x right, y down, z forward)."""
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    transform = np.eye(4)
    transform[:3, :3] = np.stack([right, [0.0, 0.0, -1.0], forward], axis=1)
    return torch.tensor(transform, dtype=torch.float32)


def rig(bev_aug: torch.Tensor | None = None) -> CameraGeometry:
    """One sample, camera 0 looking along +x, camera 1 along +y; principal point at the image centre."""
    height, width = IMAGE_SIZE
    intrinsics = torch.tensor([[FOCAL, 0.0, (width - 1) / 2], [0.0, FOCAL, (height - 1) / 2], [0.0, 0.0, 1.0]])
    cameras = torch.stack([camera_looking_along(0.0), camera_looking_along(math.pi / 2)])
    return CameraGeometry(intrinsics=intrinsics.expand(1, 2, 3, 3), camera_to_lidar=cameras[None],
                          image_aug=torch.eye(3).expand(1, 2, 3, 3),
                          bev_aug=torch.eye(4)[None] if bev_aug is None else bev_aug[None])


def query_index(x: float, y: float) -> int:
    """Query of the cell whose centre is (x, y): row-major iy*X + ix."""
    return int((y - BEV.y_min) // BEV.resolution) * 7 + int((x - BEV.x_min) // BEV.resolution)


def test_pillar_points_sit_at_cell_centres_between_the_z_range():
    points = pillar_points(BEV, num_z_anchors=2)
    assert points.shape == (2, 49, 3)
    assert torch.allclose(points[:, query_index(12.0, 0.0)], torch.tensor([[12.0, 0.0, -1.5], [12.0, 0.0, 1.5]]))
    assert torch.allclose(points[1, query_index(-12.0, 8.0)], torch.tensor([-12.0, 8.0, 1.5]))


def test_cell_ahead_of_a_camera_lands_on_its_principal_point_column():
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    q = query_index(12.0, 0.0)
    # camera 0: depth 12, u = 31.5 (the principal point) -> (31.5 + 0.5) / 64 = 0.5;
    # v = 15.5 - 20 * z / 12: 18.0 for z = -1.5 and 13.0 for z = 1.5 -> (v + 0.5) / 32
    expected = torch.tensor([[0.5, 18.5 / 32], [0.5, 13.5 / 32]])
    assert torch.allclose(reference.locations[0, 0, q], expected, atol=1e-6)
    assert reference.hits[0, 0, q].all()
    # camera 1 looks along +y: the point is on its image plane (depth 0), so it hits nothing there
    assert not reference.hits[0, 1, q].any()


def test_cell_between_the_cameras_hits_both_and_cells_behind_hit_none():
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    both = query_index(8.0, 8.0)  # 45 degrees off both axes: u = 31.5 -+ 20 (camera 0 sees it left of centre)
    assert reference.hits[0, :, both].all()
    assert torch.allclose(reference.locations[0, 0, both, :, 0], torch.full((2,), (11.5 + 0.5) / 64))
    assert torch.allclose(reference.locations[0, 1, both, :, 0], torch.full((2,), (51.5 + 0.5) / 64))
    behind = query_index(-12.0, -12.0)
    assert not reference.hits[0, :, behind].any()
    # (12, -12) is 45 degrees right of camera 0's axis, inside its 58-degree half field of view, and behind camera 1
    right = query_index(12.0, -12.0)
    assert reference.hits[0, 0, right].all() and not reference.hits[0, 1, right].any()


def test_bev_augmentation_is_undone_before_projecting():
    # A point q in the augmented frame is the LiDAR point bev_aug^-1 q, so augmenting both the points and the
    # geometry by the same rotation and flip must give the same projection.
    augmentation = BEVAugmentation(rotation=0.7, scale=1.0, flip_x=True)
    matrix = torch.tensor(augmentation.matrix(), dtype=torch.float32)
    points = pillar_points(BEV, 2)
    plain = project_pillars(points, rig(), IMAGE_SIZE)
    augmented = project_pillars(points @ matrix[:3, :3].T, rig(matrix), IMAGE_SIZE)
    assert torch.equal(plain.hits, augmented.hits)
    assert torch.allclose(plain.locations, augmented.locations, atol=1e-5)


def test_queries_attend_only_in_the_cameras_they_hit_and_average_over_them():
    torch.manual_seed(0)
    channels = 8
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    module = SpatialCrossAttention(channels, num_heads=2, num_levels=2, num_points=4)
    with torch.no_grad():
        module.output_proj.bias.normal_()
    shapes = [(4, 8), (2, 4)]
    query = torch.randn(1, 49, channels)
    value = torch.randn(1, 2, 32 + 8, channels)  # (B, N, L, C)
    output = module(query, value, reference, shapes)
    # Brute force: every query attends in every camera, then only the hit cameras are kept and averaged.
    per_camera = torch.stack([module.attention(query, value[:, n], reference.locations[:, n], shapes)
                              for n in range(2)], dim=1)  # (B, N, Q, C)
    attends = reference.hits.any(dim=-1)  # (B, N, Q)
    assert attends[0, :, query_index(8.0, 8.0)].all() and not attends[0, :, query_index(-12.0, -12.0)].any()
    mean = (per_camera * attends[..., None]).sum(dim=1) / attends.sum(dim=1).clamp(min=1)[..., None]
    assert torch.allclose(output, module.output_proj(mean), atol=1e-5)
    # a query that hits no camera gets the projection of zero
    assert torch.allclose(output[0, query_index(-12.0, -12.0)], module.output_proj.bias)
