"""Rigid transforms between the nuScenes frames (global, ego, LiDAR, camera) and the image plane."""

from __future__ import annotations

import numpy as np


def quaternion_to_matrix(q: np.ndarray | list[float]) -> np.ndarray:
    """(w, x, y, z) unit quaternion -> (3, 3) rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """Rotation of `yaw` radians about +z as a (w, x, y, z) quaternion."""
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def quaternion_yaw(q: np.ndarray | list[float]) -> float:
    """Yaw (about +z) of the rotated x axis, as nuScenes' `quaternion_yaw`."""
    v = quaternion_to_matrix(q)[:, 0]
    return float(np.arctan2(v[1], v[0]))


def make_transform(rotation: np.ndarray | list[float], translation: np.ndarray | list[float]) -> np.ndarray:
    """4x4 transform from a (w, x, y, z) quaternion or a (3, 3) matrix and a translation (3,)."""
    rotation = np.asarray(rotation, dtype=np.float64)
    t = np.eye(4)
    t[:3, :3] = quaternion_to_matrix(rotation) if rotation.shape == (4,) else rotation
    t[:3, 3] = np.asarray(translation, dtype=np.float64)
    return t


def invert_transform(t: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (R^T, -R^T t)."""
    inv = np.eye(4)
    inv[:3, :3] = t[:3, :3].T
    inv[:3, 3] = -t[:3, :3].T @ t[:3, 3]
    return inv


def transform_points(t: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points (P, >=3); columns beyond xyz are passed through."""
    out = np.array(points, dtype=np.float64 if points.dtype == np.float64 else points.dtype, copy=True)
    xyz = points[:, :3].astype(np.float64) @ t[:3, :3].T + t[:3, 3]
    out[:, :3] = xyz
    return out


def project_to_image(points_camera: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection of camera-frame points (P, 3) with intrinsics (3, 3) -> pixels (P, 2), depth (P,).

    The camera frame is x right, y down, z forward (nuScenes / OpenCV). Points with depth <= 0 get NaN pixels.
    """
    depth = points_camera[:, 2]
    uvw = points_camera @ np.asarray(intrinsics).T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = uvw[:, :2] / depth[:, None]
    uv[depth <= 1e-6] = np.nan
    return uv, depth


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Corners (K, 8, 3) of boxes (K, >=7). Order: bottom face then top face, each counter-clockwise from
    (+l/2, +w/2) in the box frame."""
    boxes = np.asarray(boxes, dtype=np.float64)
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
    local = np.zeros((8, 3))
    local[:4, :2] = signs * 0.5
    local[4:, :2] = signs * 0.5
    local[:4, 2] = -0.5
    local[4:, 2] = 0.5
    scaled = local[None] * boxes[:, None, 3:6]  # (K, 8, 3)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (K, 2, 2)
    xy = np.einsum("kij,kpj->kpi", rot, scaled[..., :2])
    return np.concatenate([xy, scaled[..., 2:]], axis=-1) + boxes[:, None, :3]


def points_in_boxes_bev(points_xy: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Bird's-eye-view containment (P, K) of points (P, 2) in rotated boxes (K, >=7) (boundary inclusive)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if len(boxes) == 0:
        return np.zeros((len(points_xy), 0), dtype=bool)
    d = np.asarray(points_xy, dtype=np.float64)[:, None, :2] - boxes[None, :, :2]  # (P, K, 2)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    local_x = d[..., 0] * c + d[..., 1] * s
    local_y = -d[..., 0] * s + d[..., 1] * c
    eps = 1e-9
    return (np.abs(local_x) <= boxes[:, 3] / 2 + eps) & (np.abs(local_y) <= boxes[:, 4] / 2 + eps)


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """3D containment (P, K) of points (P, >=3) in boxes (K, >=7) rotated about z."""
    inside = points_in_boxes_bev(points[:, :2], boxes)
    if inside.size == 0:
        return inside
    dz = np.abs(np.asarray(points[:, 2], dtype=np.float64)[:, None] - boxes[None, :, 2])
    return inside & (dz <= boxes[None, :, 5] / 2 + 1e-9)
