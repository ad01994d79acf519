"""Virtual points of a hand-made scene: one box, one camera, a known mask."""

from __future__ import annotations

import numpy as np
import pytest

from distillbev.pipeline.data.virtual_points import MVP_CLASSES
from distillbev.pipeline.geometry.transforms import make_transform, yaw_to_quaternion
from distillbev.pipeline.mvp.virtual import CameraMasks, CameraView, label_vectors, virtual_points

WIDTH, HEIGHT = 640, 480
INTRINSICS = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
# LiDAR (x forward, y left, z up) -> camera (x right, y down, z forward), the camera 0.3 m above and 0.2 m behind
CAMERA_AXES = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
CAMERA_POSITION = np.array([-0.2, 0.0, 0.3])  # in the LiDAR frame


def camera_from_lidar() -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = CAMERA_AXES
    out[:3, 3] = -CAMERA_AXES @ CAMERA_POSITION
    return out


def box_surface(centre: np.ndarray, size: float, yaw: float, spacing: float) -> np.ndarray:
    """Points (K, 3) on the faces of a cube (edge `size`) turned by `yaw`, `spacing` apart, and their face normals
    facing the camera only (the LiDAR beside the camera sees the same faces)."""
    grid = np.arange(-size / 2, size / 2 + 1e-9, spacing)
    a, b = np.meshgrid(grid, grid)
    a, b = a.reshape(-1), b.reshape(-1)
    rotation = make_transform(yaw_to_quaternion(yaw), [0, 0, 0])[:3, :3]
    faces = []
    for axis in range(2):  # the four side faces
        for sign in (-1.0, 1.0):
            local = np.zeros((len(a), 3))
            local[:, axis] = sign * size / 2
            local[:, 1 - axis], local[:, 2] = a, b
            normal = rotation[:, axis] * sign
            world = local @ rotation.T + centre
            if normal @ (CAMERA_POSITION - centre) > 0:  # facing the sensors
                faces.append(world)
    return np.concatenate(faces)


def distance_to_box(points: np.ndarray, centre: np.ndarray, size: float, yaw: float) -> np.ndarray:
    """Distance (K,) of points to the surface of the cube."""
    rotation = make_transform(yaw_to_quaternion(yaw), [0, 0, 0])[:3, :3]
    local = (points - centre) @ rotation
    outside = np.maximum(np.abs(local) - size / 2, 0.0)
    inside = np.minimum(np.max(np.abs(local) - size / 2, axis=1), 0.0)
    return np.linalg.norm(outside, axis=1) + np.abs(inside)


def silhouette_mask(surface: np.ndarray) -> np.ndarray:
    """The mask (H, W) of the pixels the cube covers: those its dense surface points fall in, closed by one pixel."""
    from scipy import ndimage

    camera = surface @ CAMERA_AXES.T - CAMERA_AXES @ CAMERA_POSITION
    uv = (camera @ INTRINSICS.T)[:, :2] / camera[:, 2:3]
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    ids[np.floor(uv[:, 1]).astype(int), np.floor(uv[:, 0]).astype(int)] = 1
    return ndimage.binary_erosion(ndimage.binary_closing(ids, iterations=2), iterations=1).astype(np.int64)


@pytest.mark.parametrize("yaw", [0.0, np.deg2rad(30.0)])
def test_virtual_points_land_on_the_visible_surface(yaw: float) -> None:
    centre, size = np.array([10.0, 0.5, 0.0]), 2.0
    surface = box_surface(centre, size, yaw, 0.1)  # what the LiDAR sees of the box (0.1 m apart)
    ids = silhouette_mask(box_surface(centre, size, yaw, 0.01))
    rng = np.random.default_rng(0)
    ground = np.stack([rng.uniform(4, 8, 300), rng.uniform(-8, 8, 300), np.full(300, -1.5)], axis=1)  # in front
    behind = np.array([[14.0, 0.5, 0.0]])  # hidden behind the box, inside the mask's view: painted, as in MVP
    xyz = np.concatenate([surface, ground, behind])
    points = np.concatenate([xyz, rng.uniform(0, 100, (len(xyz), 1)), np.zeros((len(xyz), 1))], axis=1)
    labels = label_vectors(["truck"], [0.8], "hand-made")
    view = CameraView(camera_from_lidar(), INTRINSICS, CameraMasks(ids, labels))

    result = virtual_points(points.astype(np.float32), [view], np.random.default_rng(1), num_virtual=50)

    assert result.virtual.shape == (50, 14)
    # Tolerance: a drawn pixel takes the depth of the nearest surface point in the image. On the face that faces
    # the camera every point has the same depth, so a virtual point lies on it, at most two pixels' footprint (2 x
    # 9.2 m / 500 px = 0.037 m) outside its edge where the mask's closed silhouette overhangs it. On a face turned by
    # 30 deg the depth changes across the 0.1 m point spacing, which adds about 0.1 * tan(60 deg) / 2 = 0.09 m.
    tolerance = 0.04 if yaw == 0.0 else 0.13
    gaps = distance_to_box(result.virtual[:, :3], centre, size, yaw)
    assert gaps.max() < tolerance
    truck = MVP_CLASSES.index("truck")
    assert np.all(result.virtual[:, 3 + truck] == 1.0) and np.all(result.virtual[:, 3:13].sum(axis=1) == 1.0)
    assert np.allclose(result.virtual[:, 13], 0.8)
    # the painted points: the box's points and the hidden one, never the ground outside the mask
    painted, hidden = set(result.real_indices.tolist()), len(surface) + len(ground)
    assert hidden in painted
    assert painted - {hidden} <= set(range(len(surface)))
    assert len(painted - {hidden}) > 0.8 * len(surface)  # all but the points on the mask's eroded edge
    assert np.array_equal(result.real[:, :4], points[result.real_indices, :4].astype(np.float32))
    assert np.all(result.real[:, 4 + truck] == 1.0) and np.allclose(result.real[:, 14], 0.8)


def test_a_mask_without_points_and_a_second_camera() -> None:
    """A mask no LiDAR point falls in gives no virtual point; a point seen by two cameras takes the element-wise
    maximum of its masks' vectors (MVP)."""
    surface = box_surface(np.array([10.0, 0.5, 0.0]), 2.0, 0.0, 0.1)
    points = np.concatenate([surface, np.full((len(surface), 1), 50.0), np.zeros((len(surface), 1))], axis=1)
    ids = silhouette_mask(box_surface(np.array([10.0, 0.5, 0.0]), 2.0, 0.0, 0.01))
    ids[:20, :20] = 2  # a mask in the sky
    first = CameraView(camera_from_lidar(), INTRINSICS,
                       CameraMasks(ids, label_vectors(["car", "bus"], [0.6, 0.9], "a")))
    second = CameraView(camera_from_lidar(), INTRINSICS, CameraMasks((ids == 1).astype(np.int64),
                                                                     label_vectors(["truck"], [0.7], "b")))
    result = virtual_points(points.astype(np.float32), [first, second], np.random.default_rng(0), num_virtual=20)
    assert result.virtual.shape == (40, 14)  # 20 per camera from mask 1, none from the empty mask 2
    car, truck = MVP_CLASSES.index("car"), MVP_CLASSES.index("truck")
    assert np.all(result.real[:, 4 + car] == 1.0) and np.all(result.real[:, 4 + truck] == 1.0)
    assert np.allclose(result.real[:, 14], 0.7)
