"""Sensor readings of a scene at one timestamp: the LiDAR point cloud and the six camera renders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...geometry.transforms import make_transform, points_in_boxes, transform_points, yaw_to_quaternion
from .camera import pixel_rays, render_camera
from .catalog import CLASS_SPECS
from .lidar import LidarPattern, cast_lidar
from .rig import CAMERA_CHANNELS, LIDAR_CHANNEL, RIG
from .world import Scene

# Key-frame points closer than this to a box surface are dropped: consumers count points in float32 after
# LiDAR -> ego -> global transforms (about 1e-4 m rounding at map coordinates of ~1000 m), and a point on the
# fence would make `num_lidar_pts` depend on that rounding.
BOUNDARY_GUARD = 2e-3  # [m]


@dataclass(frozen=True)
class SensorSettings:
    """What the sensor simulation needs besides the scene."""

    seed: int
    visibility_range: float  # objects at or beyond this xy distance from the ego are neither seen nor annotated
    pattern: LidarPattern
    range_noise: float  # LiDAR range noise std [m] (clipped at 3 sigma)


@dataclass
class LidarFrame:
    """One LiDAR sweep. points: (P, 5) float32 x, y, z, intensity, ring in the LiDAR frame at `timestamp`;
    visible: (V,) indices of the scene objects within range; num_points: (V,) points inside each of their boxes."""

    timestamp: int
    points: np.ndarray
    visible: np.ndarray
    num_points: np.ndarray


@dataclass
class CameraFrame:
    """Six low-resolution renders (N, h, w, 3) uint8 in CAMERA_CHANNELS order, and for the visible objects (V,)
    the fraction of their pixels (summed over cameras) not hidden by nearer objects."""

    timestamp: int
    images: np.ndarray
    visible: np.ndarray
    visible_fraction: np.ndarray


def global_from_ego(scene: Scene, timestamp: int) -> np.ndarray:
    """(4, 4) ego pose at a timestamp: on the path, heading along its tangent, on the ground (z = 0)."""
    xy, heading = scene.ego_pose_2d(timestamp)
    return make_transform(yaw_to_quaternion(heading), [xy[0], xy[1], 0.0])


def visible_objects(scene: Scene, timestamp: int, visibility_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (V,) and boxes (V, 7) of the objects whose centre is within visibility_range of the ego (xy)."""
    boxes = scene.boxes_at(timestamp)
    ego_xy, _ = scene.ego_pose_2d(timestamp)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64), boxes
    within = np.nonzero(np.hypot(boxes[:, 0] - ego_xy[0], boxes[:, 1] - ego_xy[1]) < visibility_range)[0]
    return within, boxes[within]


def _frame_rng(settings: SensorSettings, scene: Scene, timestamp: int, stream: int) -> np.random.Generator:
    """An independent generator per (scene, timestamp, stream), so frames can be simulated in any order."""
    # Seed entries must be non-negative: sweeps before the first key frame have negative offsets (>= -0.45 s).
    offset_us = int(timestamp - scene.start_timestamp) + 10_000_000
    return np.random.default_rng([settings.seed, scene.index, offset_us, stream])


def simulate_lidar(scene: Scene, timestamp: int, settings: SensorSettings, count_points: bool) -> LidarFrame:
    """Casts the LiDAR from the ego pose at `timestamp` against the objects at their positions at that time.

    With count_points (key frames), points within BOUNDARY_GUARD of a visible box surface are dropped and the
    points inside each visible box are counted in the global frame.
    """
    global_from_lidar = global_from_ego(scene, timestamp) @ RIG[LIDAR_CHANNEL].ego_from_sensor
    visible, boxes = visible_objects(scene, timestamp, settings.visibility_range)
    intensities = np.array([CLASS_SPECS[scene.objects[i].class_name].intensity for i in visible])
    points = cast_lidar(global_from_lidar, boxes, intensities, settings.pattern, settings.visibility_range,
                        _frame_rng(settings, scene, timestamp, 0), settings.range_noise)
    num_points = np.zeros(len(visible), dtype=np.int64)
    if count_points and len(visible):
        global_points = transform_points(global_from_lidar, points[:, :3].astype(np.float64))
        grown, shrunk = boxes.copy(), boxes.copy()
        grown[:, 3:6] += 2 * BOUNDARY_GUARD
        shrunk[:, 3:6] -= 2 * BOUNDARY_GUARD
        inside = points_in_boxes(global_points, shrunk)  # (P, V)
        ambiguous = (points_in_boxes(global_points, grown) & ~inside).any(axis=1)
        points = points[~ambiguous]
        num_points = inside[~ambiguous].sum(axis=0)
    return LidarFrame(timestamp, points, visible, num_points)


class CameraRig:
    """The six cameras with their low-resolution pixel rays computed once."""

    def __init__(self) -> None:
        self.rays = {channel: pixel_rays(RIG[channel].intrinsics) for channel in CAMERA_CHANNELS}

    def render(self, scene: Scene, timestamp: int, settings: SensorSettings) -> CameraFrame:
        ego_pose = global_from_ego(scene, timestamp)
        visible, boxes = visible_objects(scene, timestamp, settings.visibility_range)
        colours = np.array([CLASS_SPECS[scene.objects[i].class_name].colour for i in visible],
                           dtype=np.float64).reshape(-1, 3)
        images = []
        seen = np.zeros(len(visible), dtype=np.int64)
        coverable = np.zeros(len(visible), dtype=np.int64)
        for channel in CAMERA_CHANNELS:
            calibration = RIG[channel]
            image, shown, unoccluded = render_camera(ego_pose @ calibration.ego_from_sensor, calibration.intrinsics,
                                                     self.rays[channel], boxes, colours, settings.visibility_range)
            images.append(image)
            seen += shown
            coverable += unoccluded
        fraction = np.where(coverable > 0, seen / np.maximum(coverable, 1), 0.0)
        return CameraFrame(timestamp, np.stack(images), visible, fraction)
