"""Sensor readings of a scene at one timestamp: the LiDAR point cloud and the six camera renders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry.transforms import make_transform, points_in_boxes, transform_points, yaw_to_quaternion
from .camera import GroundStyle, pixel_rays, render_camera
from .catalog import CLASS_SPECS
from .lidar import LidarPattern, cast_lidar, cast_lidar_materials, solid_boxes
from .materials import MATERIALS, part_colour
from .rig import CAMERA_CHANNELS, LIDAR_CHANNEL, _quaternion_product, rig_variant
from .shapes import parts_in_world
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
    the fraction of their pixels (summed over cameras) not hidden by nearer objects.

    With `CameraRig.render(..., with_owners=True)` also, over every rendered object (R,) annotated or not:
    `rendered` (R,) their scene object indices, `owners` (N, h, w) the slot in `rendered` nearest at each
    low-resolution pixel (-1: ground or sky), `pixels` (N, R) their visible and `coverable` (N, R) their silhouette
    (the pixels they would cover without other objects) low-resolution pixel counts per camera.
    """

    timestamp: int
    images: np.ndarray
    visible: np.ndarray
    visible_fraction: np.ndarray
    rendered: np.ndarray | None = None
    owners: np.ndarray | None = None
    pixels: np.ndarray | None = None
    coverable: np.ndarray | None = None


def ego_pose(scene: Scene, timestamp: int) -> tuple[np.ndarray, float, np.ndarray]:
    """The ego at a timestamp: position xy (2,) on the path, the height z of its origin (the ground under its rear
    axle) and its rotation (w, x, y, z): yaw along the path's tangent, and with terrain the pitch and roll of the
    ground under its wheels (yaw, then pitch nose up, then roll left side up)."""
    xy, heading = scene.ego_pose_2d(timestamp)
    if scene.terrain is None:
        return xy, 0.0, yaw_to_quaternion(heading)
    z, pitch, roll = scene.terrain.ego_attitude(xy, heading)
    yaw_q = np.array([np.cos(heading / 2), 0.0, 0.0, np.sin(heading / 2)])
    pitch_q = np.array([np.cos(-pitch / 2), 0.0, np.sin(-pitch / 2), 0.0])  # about y: nose up is a negative turn
    roll_q = np.array([np.cos(roll / 2), np.sin(roll / 2), 0.0, 0.0])
    rotation = _quaternion_product(yaw_q, _quaternion_product(pitch_q, roll_q))
    return xy, z, rotation / np.linalg.norm(rotation)


def ego_height(scene: Scene, timestamp: int) -> float:
    """Height of the ego origin at a timestamp in the simulation's frame (0 on flat ground). nuScenes writes every
    ego_pose at z = 0, so what a key frame records (boxes) is written this much lower (terrain.py)."""
    return ego_pose(scene, timestamp)[1]


def global_from_ego(scene: Scene, timestamp: int) -> np.ndarray:
    """(4, 4) true ego pose at a timestamp in the simulation's frame: on the path, heading along its tangent, on
    the ground (z = 0 when flat; with terrain at the ground's height, pitched and rolled with it)."""
    xy, z, rotation = ego_pose(scene, timestamp)
    return make_transform(rotation, [xy[0], xy[1], z])


def visible_objects(scene: Scene, timestamp: int, visibility_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (V,) and boxes (V, 7) of the objects whose centre is within visibility_range of the ego (xy)."""
    boxes = scene.boxes_at(timestamp)
    ego_xy, _ = scene.ego_pose_2d(timestamp)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64), boxes
    within = np.nonzero(np.hypot(boxes[:, 0] - ego_xy[0], boxes[:, 1] - ego_xy[1]) < visibility_range)[0]
    return within, boxes[within]


# World 2: when each camera is exposed relative to the LiDAR key frame [us]. The cameras fire as the spinning
# LiDAR (20 Hz, 50 ms per turn) sweeps across their field of view, as on the nuScenes car, so their offsets
# follow their mounting yaw (about -25 ms to +25 ms).
CAMERA_YAW_DEG = {"CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": -55.0, "CAM_FRONT_LEFT": 55.0, "CAM_BACK": 180.0,
                  "CAM_BACK_LEFT": 110.0, "CAM_BACK_RIGHT": -110.0}


def camera_times(scene: Scene, timestamp: int) -> list[int]:
    """Exposure time [us] of each camera (CAMERA_CHANNELS order) of the key frame at LiDAR time `timestamp`."""
    if scene.world != 2:
        return [timestamp] * len(CAMERA_CHANNELS)
    rng = np.random.default_rng([scene.index, int(timestamp - scene.start_timestamp) + 10_000_000, 5])
    out = []
    for channel in CAMERA_CHANNELS:
        turn = ((-CAMERA_YAW_DEG[channel] + 180.0) % 360.0) / 360.0 - 0.5  # clockwise spin, front at 0
        out.append(int(timestamp + round(turn * 50_000 + rng.normal(0.0, 1_500))))
    return out


def _frame_rng(settings: SensorSettings, scene: Scene, timestamp: int, stream: int) -> np.random.Generator:
    """An independent generator per (scene, timestamp, stream), so frames can be simulated in any order."""
    # Seed entries must be non-negative: sweeps before the first key frame have negative offsets (>= -0.45 s).
    offset_us = int(timestamp - scene.start_timestamp) + 10_000_000
    return np.random.default_rng([settings.seed, scene.index, offset_us, stream])


def object_solids(scene: Scene, visible: np.ndarray, boxes: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """World v2: the physical part boxes of the visible objects with annotation boxes `boxes` (V, 7).

    Returns solids (N, 7) in the global frame (inset like `solid_boxes`), their reflectivity (N,), RGB albedo
    (N, 3) and the visible slot each belongs to (N,).
    """
    solids, reflectivity, colours, owners = [], [], [], []
    for slot, (index, box) in enumerate(zip(visible, boxes)):
        obj = scene.objects[index]
        part_boxes = solid_boxes(parts_in_world(obj.parts, box))
        solids.append(part_boxes)
        reflectivity += [MATERIALS[part.material].reflectivity for part in obj.parts]
        colours += [part_colour(part.material, obj.paint) for part in obj.parts]
        owners += [slot] * len(obj.parts)
    if not solids:
        return np.zeros((0, 7)), np.zeros(0), np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    return (np.concatenate(solids), np.asarray(reflectivity), np.asarray(colours, dtype=np.float64),
            np.asarray(owners, dtype=np.int64))


def _points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """`points_in_boxes` (P, V) of points (P, 3) in boxes (V, 7), testing each box only on the points within its
    circumscribed square (the same test on fewer points)."""
    out = np.zeros((len(points), len(boxes)), dtype=bool)
    order = np.argsort(points[:, 0], kind="stable")
    xs = points[order, 0]
    radius = np.hypot(boxes[:, 3], boxes[:, 4]) / 2.0 + 1e-3
    for v, box in enumerate(boxes):
        lo, hi = np.searchsorted(xs, [box[0] - radius[v], box[0] + radius[v]], side="left")
        near = order[lo:hi + 1] if hi < len(xs) else order[lo:hi]
        near = near[np.abs(points[near, 1] - box[1]) <= radius[v]]
        out[near, v] = points_in_boxes(points[near], box[None])[:, 0]
    return out


def simulate_lidar(scene: Scene, timestamp: int, settings: SensorSettings, count_points: bool) -> LidarFrame:
    """Casts the LiDAR from the ego pose at `timestamp` against the objects at their positions at that time.

    With count_points (key frames), points within BOUNDARY_GUARD of a visible box surface are dropped (world 2:
    written as rays without a return, at the origin) and the points inside each visible box are counted in the
    global frame.
    """
    global_from_lidar = global_from_ego(scene, timestamp) @ rig_variant(scene.car)[LIDAR_CHANNEL].ego_from_sensor
    visible, boxes = visible_objects(scene, timestamp, settings.visibility_range)
    rng = _frame_rng(settings, scene, timestamp, 0)
    if scene.world == 2:
        solids, reflectivity, _, _ = object_solids(scene, visible, boxes)
        points, _ = cast_lidar_materials(global_from_lidar, solids, reflectivity, settings.pattern,
                                         settings.visibility_range, rng, settings.range_noise, terrain=scene.terrain)
        annotated = np.array([scene.objects[i].annotated for i in visible], dtype=bool)
        visible, boxes = visible[annotated], boxes[annotated]  # clutter is seen but never annotated
    else:
        intensities = np.array([CLASS_SPECS[scene.objects[i].class_name].intensity for i in visible])
        points = cast_lidar(global_from_lidar, boxes, intensities, settings.pattern, settings.visibility_range,
                            rng, settings.range_noise)
    num_points = np.zeros(len(visible), dtype=np.int64)
    if count_points and len(visible):
        global_points = transform_points(global_from_lidar, points[:, :3].astype(np.float64))
        grown, shrunk = boxes.copy(), boxes.copy()
        grown[:, 3:6] += 2 * BOUNDARY_GUARD
        shrunk[:, 3:6] -= 2 * BOUNDARY_GUARD
        inside = _points_in_boxes(global_points, shrunk)  # (P, V)
        ambiguous = (_points_in_boxes(global_points, grown) & ~inside).any(axis=1)
        if scene.world == 2:  # every ray keeps its row (nuScenes' layout): an ambiguous one becomes a no-return
            points[ambiguous, :4] = 0.0
        else:
            points = points[~ambiguous]
        num_points = inside[~ambiguous].sum(axis=0)
    return LidarFrame(timestamp, points, visible, num_points)


class CameraRig:
    """The six cameras with their low-resolution pixel rays computed once."""

    def __init__(self) -> None:
        self._rays: dict[int, dict[str, np.ndarray]] = {}

    def rays(self, car: int) -> dict[str, np.ndarray]:
        """Low-resolution pixel rays of each camera of car `car` (computed once per car)."""
        if car not in self._rays:
            rig = rig_variant(car)
            self._rays[car] = {channel: pixel_rays(rig[channel].intrinsics) for channel in CAMERA_CHANNELS}
        return self._rays[car]

    def render(self, scene: Scene, timestamp: int, settings: SensorSettings, with_owners: bool = False) -> CameraFrame:
        """The six cameras of the key frame at LiDAR time `timestamp`. In world 2 each camera is exposed at its
        own time (`camera_times`), from the ego pose and with the objects where they are at that time.
        `with_owners` adds the per-pixel object maps and per-camera pixel counts (see `CameraFrame`)."""
        visible, boxes = visible_objects(scene, timestamp, settings.visibility_range)
        style = GroundStyle.for_scene(scene, settings.seed) if scene.world == 2 else None
        images, owner_maps, pixels, coverables = [], [], [], []
        seen = np.zeros(len(visible), dtype=np.int64)
        coverable = np.zeros(len(visible), dtype=np.int64)
        for channel, time_us in zip(CAMERA_CHANNELS, camera_times(scene, timestamp)):
            calibration = rig_variant(scene.car)[channel]
            ego_pose = global_from_ego(scene, time_us)
            if scene.world == 2:
                solids, _, colours, owners = object_solids(scene, visible, scene.boxes_at(time_us)[visible]
                                                           if len(visible) else boxes)
            else:
                solids = boxes
                colours = np.array([CLASS_SPECS[scene.objects[i].class_name].colour for i in visible],
                                   dtype=np.float64).reshape(-1, 3)
                owners = None
            rays = self.rays(scene.car)[channel]
            owner_map = np.full(rays.shape[:2], -1, dtype=np.int64) if with_owners else None
            silhouette = np.zeros(len(visible), dtype=np.int64) if with_owners and owners is not None else None
            image, shown, unoccluded = render_camera(ego_pose @ calibration.ego_from_sensor, calibration.intrinsics,
                                                     rays, solids, colours, settings.visibility_range,
                                                     owners=owners, num_owners=len(visible), style=style,
                                                     owner_out=owner_map, silhouette_out=silhouette)
            images.append(image)
            if with_owners:
                owner_maps.append(owner_map)
                pixels.append(shown)
                coverables.append(silhouette if silhouette is not None else unoccluded)
            seen += shown
            coverable += unoccluded
        fraction = np.where(coverable > 0, seen / np.maximum(coverable, 1), 0.0)
        rendered = visible
        if scene.world == 2:
            annotated = np.array([scene.objects[i].annotated for i in visible], dtype=bool)
            visible, fraction = visible[annotated], fraction[annotated]
        if not with_owners:
            return CameraFrame(timestamp, np.stack(images), visible, fraction)
        return CameraFrame(timestamp, np.stack(images), visible, fraction, rendered, np.stack(owner_maps),
                           np.stack(pixels), np.stack(coverables))
