"""One synthetic scene: the ego's smooth path, the timestamps of key frames and sweeps, and the objects.

Everything is in the global frame on a flat ground plane z = 0. The ego drives a constant-curvature arc at
constant speed with its heading on the path tangent; objects are upright boxes that either stand still or move
at constant velocity along their heading, so the devkit's finite-difference `box_velocity` is exact.
Placement is rejection sampling: no two objects overlap and no object touches the ego footprint at any
LiDAR timestamp of the scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..data.classes import DETECTION_CLASSES
from .catalog import CLASS_SPECS, ClassSpec
from .ego_path import EgoPath, rectangle_corners, rectangles_overlap
from .rig import EGO_FOOTPRINT
from .terrain import Terrain

KEY_FRAME_INTERVAL_US = 500_000  # key frames at 2 Hz
SWEEP_INTERVAL_US = 50_000  # LiDAR at 20 Hz
OBJECT_CLEARANCE = 0.4  # minimum gap kept between two objects and between an object and the ego [m]


@dataclass(frozen=True)
class SceneObject:
    """An upright box on the ground: centre xy at t = 0, yaw, constant velocity (vx, vy) along its heading."""

    class_name: str  # a detection class, or (world v2) a clutter / other-category kind of shapes.py
    size_wlh: tuple[float, float, float]
    xy: tuple[float, float]
    yaw: float
    velocity: tuple[float, float]
    attribute: str  # nuScenes attribute name, "" for barrier / traffic cone
    parts: tuple = ()  # world v2: the shapes.Part boxes it is built from; () = one solid box (world v1)
    paint: tuple[int, int, int] = (0, 0, 0)  # world v2: paint colour of its painted parts
    category: str = ""  # world v2: nuScenes category when not the class's own (objects of other categories)
    annotated: bool = True  # False for static clutter (buildings, trees, poles), which no table records
    yaw_rate: float = 0.0  # world 2: turn rate of a moving object [rad/s] (its heading follows its velocity)
    acceleration: float = 0.0  # world 2: along its heading [m/s^2]; its speed never goes below 0

    def _motion(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Displacement (T, 2) from t = 0, heading (T,) and speed (T,) of a turning / accelerating object."""
        speed0 = float(np.hypot(*self.velocity))
        if self.yaw_rate == 0.0:  # straight: the speed is linear in time until it reaches 0
            stop = -speed0 / self.acceleration if self.acceleration else np.inf
            t_moving = np.minimum(t, stop) if self.acceleration < 0 else np.maximum(t, stop)
            distance = speed0 * t_moving + 0.5 * self.acceleration * t_moving ** 2
            direction = np.array([np.cos(self.yaw), np.sin(self.yaw)])
            speed = np.maximum(speed0 + self.acceleration * t, 0.0)
            return distance[:, None] * direction, np.full(len(t), self.yaw), speed
        steps = np.linspace(0.0, 1.0, 65)[None, :] * t[:, None]  # (T, 65) times from 0 to t
        speed = np.maximum(speed0 + self.acceleration * steps, 0.0)
        heading = self.yaw + self.yaw_rate * steps
        vx, vy = speed * np.cos(heading), speed * np.sin(heading)
        dx = np.trapz(vx, steps, axis=1)
        dy = np.trapz(vy, steps, axis=1)
        return np.stack([dx, dy], axis=-1), heading[:, -1], speed[:, -1]

    def attribute_at(self, t: float) -> str:
        """The attribute at scene time t: a world-2 vehicle that has braked to a halt is "vehicle.stopped"."""
        if self.acceleration == 0.0 or not self.attribute.startswith("vehicle.moving"):
            return self.attribute
        _, _, speed = self._motion(np.array([t], dtype=np.float64))
        return "vehicle.stopped" if speed[0] < 0.2 else self.attribute

    @property
    def spec(self) -> ClassSpec:
        return CLASS_SPECS[self.class_name]

    @property
    def category_name(self) -> str:
        return self.category or CLASS_SPECS[self.class_name].category

    def boxes_at(self, t: np.ndarray) -> np.ndarray:
        """Boxes (T, 7) = (x, y, z, l, w, h, yaw) at times t (T,) [s]; z is the gravity centre."""
        t = np.asarray(t, dtype=np.float64)
        w, l, h = self.size_wlh
        out = np.empty((len(t), 7))
        if self.yaw_rate == 0.0 and self.acceleration == 0.0:
            out[:, 0] = self.xy[0] + self.velocity[0] * t
            out[:, 1] = self.xy[1] + self.velocity[1] * t
            out[:, 2:7] = (h / 2.0, l, w, h, self.yaw)
            return out
        displacement, heading, _ = self._motion(t)
        out[:, 0:2] = np.asarray(self.xy) + displacement
        out[:, 2:6] = (h / 2.0, l, w, h)
        out[:, 6] = (heading + np.pi) % (2 * np.pi) - np.pi
        return out


@dataclass(frozen=True)
class Scene:
    """A scenario: ego path, timestamps and objects."""

    index: int
    start_timestamp: int  # [us] of the first key frame
    key_frame_times_us: tuple[int, ...]  # key-frame timestamps
    sweeps_per_key_frame: int
    path: EgoPath
    objects: tuple[SceneObject, ...]
    first_sweeps: bool = True  # sweeps before the first key frame (world v1); a real scene starts with none
    world: int = 1  # 1: one solid per object, class colours (world.py); 2: parts and materials (layout.py)
    sun: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # world v2: sun direction (3,) and exposure
    car: int = 0  # which car (rig.rig_variant) recorded the scene; world 1 has one car
    terrain: Terrain | None = None  # world 2: the ground height (terrain.py); None: the flat plane z = 0

    def seconds(self, timestamp_us: int | np.ndarray) -> np.ndarray:
        """Scene time [s] (0 at the first key frame) of absolute timestamps [us]."""
        return (np.asarray(timestamp_us, dtype=np.int64) - self.start_timestamp) * 1e-6

    def sweep_times_us(self, key_index: int) -> list[int]:
        """Timestamps of the LiDAR sweeps before key frame `key_index`, oldest first."""
        if key_index == 0 and not self.first_sweeps:
            return []
        key = self.key_frame_times_us[key_index]
        return [key - j * SWEEP_INTERVAL_US for j in range(self.sweeps_per_key_frame, 0, -1)]

    def lidar_times_us(self) -> np.ndarray:
        """Every LiDAR timestamp of the scene (sweeps and key frames) in time order."""
        times = []
        for k, key in enumerate(self.key_frame_times_us):
            times.extend(self.sweep_times_us(k))
            times.append(key)
        return np.asarray(times, dtype=np.int64)

    def ego_pose_2d(self, timestamp_us: int) -> tuple[np.ndarray, float]:
        """Ego position (2,) and heading at an absolute timestamp."""
        xy, heading = self.path.pose(self.seconds(timestamp_us))
        return xy[0], float(heading[0])

    @cached_property
    def _linear_motion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The objects that move at constant velocity (K_c,), their xy (K_c, 2) at t = 0, velocities (K_c, 2) and
        (z, l, w, h, yaw) (K_c, 5), for `boxes_at`."""
        linear = [k for k, obj in enumerate(self.objects) if obj.yaw_rate == 0.0 and obj.acceleration == 0.0]
        objs = [self.objects[k] for k in linear]
        return (np.asarray(linear, dtype=np.int64), np.array([o.xy for o in objs]).reshape(-1, 2),
                np.array([o.velocity for o in objs]).reshape(-1, 2),
                np.array([(o.size_wlh[2] / 2.0, o.size_wlh[1], o.size_wlh[0], o.size_wlh[2], o.yaw)
                          for o in objs]).reshape(-1, 5))

    def boxes_at(self, timestamp_us: int) -> np.ndarray:
        """Boxes (K, 7) of every object at an absolute timestamp (K = len(objects))."""
        t = np.array([self.seconds(timestamp_us)])
        if not self.objects:
            return np.zeros((0, 7))
        out = np.empty((len(self.objects), 7))
        linear, xy, velocity, rest = self._linear_motion
        out[linear, 0] = xy[:, 0] + velocity[:, 0] * t[0]  # as SceneObject.boxes_at, all at once
        out[linear, 1] = xy[:, 1] + velocity[:, 1] * t[0]
        out[linear, 2:7] = rest
        moving = np.ones(len(self.objects), dtype=bool)
        moving[linear] = False
        for k in np.nonzero(moving)[0]:
            out[k] = self.objects[k].boxes_at(t)[0]
        if self.terrain is not None:  # objects stand on the ground: clutter on the lowest point under it
            out[:, 2] += self.terrain.footprint_height(out[:, :2], out[:, 3], out[:, 4], out[:, 6], self._sunk)
        return out

    @cached_property
    def _sunk(self) -> np.ndarray:
        """(K,) True for the unannotated clutter, which stands on the lowest ground under its footprint."""
        return np.array([not obj.annotated for obj in self.objects], dtype=bool)


def _ego_corners(scene_path: EgoPath, times_s: np.ndarray, clearance: float) -> np.ndarray:
    """Ego footprint corners (T, 4, 2) at times (T,), inflated by `clearance` on every side."""
    xy, heading = scene_path.pose(times_s)
    cx, cy, length, width = EGO_FOOTPRINT
    c, s = np.cos(heading), np.sin(heading)
    centre = xy + np.stack([c * cx - s * cy, s * cx + c * cy], axis=-1)
    return rectangle_corners(centre, np.full(len(times_s), length + 2 * clearance),
                             np.full(len(times_s), width + 2 * clearance), heading)


def _object_corners(obj: SceneObject, times_s: np.ndarray, clearance: float) -> np.ndarray:
    """Object footprint corners (T, 4, 2) at times (T,), inflated by `clearance / 2` on every side."""
    boxes = obj.boxes_at(times_s)
    return rectangle_corners(boxes[:, :2], boxes[:, 3] + clearance, boxes[:, 4] + clearance, boxes[:, 6])


def _propose(spec: ClassSpec, rng: np.random.Generator, path: EgoPath, arc_range: tuple[float, float],
             lateral_range: tuple[float, float]) -> SceneObject:
    """Draw one object of a class beside the path: position, size jitter, heading, motion and attribute."""
    arc = rng.uniform(*arc_range)
    lateral = rng.uniform(*lateral_range) * rng.choice([-1.0, 1.0])
    moving = rng.uniform() < spec.moving_probability
    # The object's position is chosen at the moment the ego passes its arc position, then moved back to t = 0.
    t_pass = arc / path.speed
    path_xy, tangent = path.pose(t_pass)
    normal = np.array([-np.sin(tangent[0]), np.cos(tangent[0])])
    xy = path_xy[0] + lateral * normal
    if spec.heading == "across":  # long side (width) along the road, as barriers stand
        yaw = tangent[0] + np.pi / 2 + rng.normal(0.0, 0.05)
    elif spec.heading == "road" or (moving and spec.name != "pedestrian"):
        yaw = tangent[0] + rng.choice([0.0, np.pi]) + rng.normal(0.0, 0.05 if moving else 0.12)
    else:
        yaw = rng.uniform(-np.pi, np.pi)
    yaw = float((yaw + np.pi) % (2 * np.pi) - np.pi)
    speed = rng.uniform(*spec.speed_range) if moving else 0.0
    velocity = (speed * np.cos(yaw), speed * np.sin(yaw))
    xy = xy - np.array(velocity) * t_pass
    size = tuple(float(v) for v in np.asarray(spec.size_wlh) * rng.uniform(0.92, 1.08, size=3))
    attribute = spec.moving_attribute if moving else str(rng.choice(spec.static_attributes))
    return SceneObject(spec.name, size, (float(xy[0]), float(xy[1])), yaw, (float(velocity[0]), float(velocity[1])),
                       attribute)


def build_scene(index: int, rng: np.random.Generator, *, start_timestamp: int, num_key_frames: int,
                sweeps_per_key_frame: int, num_objects: int, speed_range: tuple[float, float],
                max_curvature: float, visibility_range: float, max_attempts_per_object: int = 60) -> Scene:
    """Draw a scene. One object of every class is placed first, close to the path near a random key frame,
    so each scene can show all 10 classes; the rest are drawn by class weight anywhere along the path."""
    heading = rng.uniform(-np.pi, np.pi)
    path = EgoPath((float(rng.uniform(200.0, 1800.0)), float(rng.uniform(200.0, 1800.0))), float(heading),
                   float(rng.uniform(*speed_range)), float(rng.uniform(-max_curvature, max_curvature)))
    key_times = tuple(start_timestamp + k * KEY_FRAME_INTERVAL_US for k in range(num_key_frames))
    scene = Scene(index, start_timestamp, key_times, sweeps_per_key_frame, path, ())
    times_s = scene.seconds(scene.lidar_times_us())
    ego = _ego_corners(path, times_s, OBJECT_CLEARANCE)  # (T, 4, 2)
    key_arcs = path.speed * scene.seconds(np.asarray(key_times))
    placed: list[SceneObject] = []
    placed_corners: list[np.ndarray] = []  # (T, 4, 2) each

    names = list(DETECTION_CLASSES)
    weights = np.array([CLASS_SPECS[n].weight for n in names])
    extra = rng.choice(len(names), size=max(0, num_objects - len(names)), p=weights / weights.sum())
    requests = [(name, True) for name in names] + [(names[i], False) for i in extra]
    for name, guaranteed in requests:
        spec = CLASS_SPECS[name]
        for _ in range(max_attempts_per_object):
            if guaranteed:
                # Near a key frame and close to the path, so at least one key frame sees it with many points.
                arc_centre = rng.choice(key_arcs)
                arc_range = (arc_centre - 8.0, arc_centre + 8.0)
                lateral_range = (spec.lateral_range[0], min(spec.lateral_range[1], spec.lateral_range[0] + 6.0))
            else:
                margin = 0.6 * visibility_range
                arc_range = (key_arcs[0] - margin, key_arcs[-1] + margin)
                lateral_range = spec.lateral_range
            candidate = _propose(spec, rng, path, arc_range, lateral_range)
            corners = _object_corners(candidate, times_s, OBJECT_CLEARANCE)
            if rectangles_overlap(corners, ego).any():
                continue
            if any(rectangles_overlap(corners, other).any() for other in placed_corners):
                continue
            placed.append(candidate)
            placed_corners.append(corners)
            break
    return Scene(index, start_timestamp, key_times, sweeps_per_key_frame, path, tuple(placed))
