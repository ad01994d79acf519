"""Scenes of the synthetic world v2: a street at nuScenes range and density, with traffic and clutter.

The ego drives the right lane of a two-lane street (lane width 3.5 m; lateral offsets below are measured from the
ego lane's centre line, positive to the left). Along the ego's path, out to `reach` metres beyond the first and
last key frames, the street holds:

    traffic       cars, trucks, buses, motorcycles in and against the ego lane, at their own speeds
    parked rows   cars and a few trucks / trailers along both kerbs, some parked bicycles and motorcycles
    pedestrians   on the sidewalks, alone or in groups, standing or walking along the street
    work zones    lines of cones and barriers at the lane edge, sometimes with a construction vehicle
    other         annotated objects of categories outside the 10 detection classes (animals, bins, bicycle
                  racks, debris), which the devkit ignores
    clutter       unannotated buildings, trees, street-light poles and walls beside the sidewalks

Class frequencies follow nuScenes' train split (cars about 44% of the 10 classes' annotations, pedestrians 20%,
barriers 13%, cones 9%, trucks 8%, the rest 1-2% each), so rare classes are absent from some scenes. Every object
is built from parts (`shapes.py`) and painted from palettes shared across classes (`materials.py`). Placement is
rejection sampling: no two objects overlap and none touches the ego at any LiDAR timestamp of the scene.
"""

from __future__ import annotations

import numpy as np

from .ego_path import EgoPath, rectangle_corners, rectangles_overlap
from .materials import paint_colour
from .shapes import class_parts
from .terrain import Terrain
from .world import KEY_FRAME_INTERVAL_US, OBJECT_CLEARANCE, Scene, SceneObject, _ego_corners

LANE = 3.5  # [m]
NUM_CARS = 2  # scenes alternate between two recording cars, each with its own calibration (rig.rig_variant)
KERB_RIGHT, KERB_LEFT = -1.75 - 1.2, 1.75 + LANE + 1.2  # parking lane outer edges [m]
SIDEWALK_WIDTH = 3.5
ROAD_EDGES = (-(LANE / 2 + 2.6), LANE * 1.5 + 2.6)  # lateral offsets of the kerbs: the roadway lies between [m]

# relative frequency of each detection class among annotations (nuScenes train split, rounded)
CLASS_FREQUENCY = {"car": 43.8, "pedestrian": 19.6, "barrier": 13.3, "traffic_cone": 8.7, "truck": 7.6,
                   "trailer": 2.1, "bus": 1.4, "construction_vehicle": 1.3, "motorcycle": 1.1, "bicycle": 1.0}
# mean annotation sizes (w, l, h) of the other categories
OTHER_KINDS = {"animal": ("animal", (0.4, 0.9, 0.7)),
               "movable_object.pushable_pullable": ("box_thing", (0.6, 0.7, 1.1)),
               "static_object.bicycle_rack": ("rack", (0.5, 3.0, 0.9)),
               "movable_object.debris": ("box_thing", (0.5, 0.6, 0.35))}


def _object(kind: str, size_wlh, centre: np.ndarray, yaw: float, speed: float, t_pass: float, attribute: str,
            rng: np.random.Generator, *, category: str = "", annotated: bool = True, rider: bool = False,
            paint_kind: str | None = None, yaw_rate: float = 0.0, acceleration: float = 0.0) -> SceneObject:
    """An object whose centre is `centre` (2,) with heading `yaw` and speed `speed` at scene time `t_pass`; a
    moving one may turn (`yaw_rate`) and speed up or brake (`acceleration`)."""
    w, l, h = size_wlh
    parts = class_parts(kind, l, w, h, rng, rider=rider)
    paint = paint_colour(paint_kind or kind, rng)
    if speed == 0.0 or (yaw_rate == 0.0 and acceleration == 0.0):
        velocity = (speed * np.cos(yaw), speed * np.sin(yaw))
        xy = np.asarray(centre) - np.array(velocity) * t_pass
        return SceneObject(kind, (float(w), float(l), float(h)), (float(xy[0]), float(xy[1])),
                           float((yaw + np.pi) % (2 * np.pi) - np.pi), (float(velocity[0]), float(velocity[1])),
                           attribute, parts, paint, category, annotated)
    yaw0 = yaw - yaw_rate * t_pass
    speed0 = max(speed - acceleration * t_pass, 0.0)
    probe = SceneObject(kind, (w, l, h), (0.0, 0.0), yaw0, (speed0 * np.cos(yaw0), speed0 * np.sin(yaw0)),
                        attribute, (), paint, category, annotated, yaw_rate, acceleration)
    xy = np.asarray(centre) - probe.boxes_at(np.array([t_pass]))[0, :2]
    return SceneObject(kind, (float(w), float(l), float(h)), (float(xy[0]), float(xy[1])),
                       float((yaw0 + np.pi) % (2 * np.pi) - np.pi),
                       (float(speed0 * np.cos(yaw0)), float(speed0 * np.sin(yaw0))), attribute, parts, paint,
                       category, annotated, float(yaw_rate), float(acceleration))


def _jitter(size, rng: np.random.Generator, spread: float = 0.1):
    return tuple(float(v) for v in np.asarray(size) * rng.uniform(1 - spread, 1 + spread, size=3))


class _Street:
    """Positions on the street at arc length s of the ego path."""

    def __init__(self, path: EgoPath) -> None:
        self.path = path

    def at(self, s: float, lateral: float) -> tuple[np.ndarray, float, float]:
        """(centre (2,), road heading, scene time when the ego passes s)."""
        t = self.path.time_at_arc(s)
        xy, heading = self.path.pose(t)
        normal = np.array([-np.sin(heading[0]), np.cos(heading[0])])
        return xy[0] + lateral * normal, float(heading[0]), float(t)


def _vehicle_attribute(moving: bool, rng: np.random.Generator) -> str:
    return "vehicle.moving" if moving else str(rng.choice(["vehicle.parked", "vehicle.parked", "vehicle.stopped"]))


SIZES = {"car": (1.95, 4.62, 1.73), "truck": (2.51, 6.93, 2.84), "construction_vehicle": (2.85, 6.37, 3.19),
         "bus": (2.94, 10.50, 3.47), "trailer": (2.90, 12.29, 3.87), "barrier": (2.53, 0.50, 0.98),
         "motorcycle": (0.77, 2.11, 1.47), "bicycle": (0.60, 1.70, 1.28), "pedestrian": (0.67, 0.73, 1.77),
         "traffic_cone": (0.41, 0.41, 1.07)}


# mean objects per placed group: cones and barriers come in lines of 3-7, pedestrians alone or in groups
GROUP_SIZE = {"traffic_cone": 4.2, "barrier": 4.2, "pedestrian": 2.6}


def _draw_class(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    """A class for the next group, so that objects (not groups) follow CLASS_FREQUENCY."""
    names = [n for n in CLASS_FREQUENCY if n not in exclude]
    weights = np.array([CLASS_FREQUENCY[n] / GROUP_SIZE.get(n, 1.0) for n in names])
    return names[rng.choice(len(names), p=weights / weights.sum())]


def _proposals(street: _Street, rng: np.random.Generator, s_range: tuple[float, float], count: int):
    """Yield candidate groups (lists of SceneObject) until `count` detection-class objects were offered."""
    offered = 0
    while offered < count:
        kind = _draw_class(rng)
        s = rng.uniform(*s_range)
        group: list[SceneObject] = []
        if kind in ("car", "truck", "bus", "trailer", "construction_vehicle"):
            size = _jitter(SIZES[kind], rng, 0.08)
            role = rng.choice(["ego_lane", "oncoming", "parked_right", "parked_left"],
                              p=[0.2, 0.2, 0.35, 0.25] if kind != "construction_vehicle" else [0.05, 0.05, 0.6, 0.3])
            if role in ("ego_lane", "oncoming") and kind != "trailer":
                lateral = (0.0 if role == "ego_lane" else LANE) + rng.normal(0, 0.25)
                centre, heading, t = street.at(s, lateral)
                yaw = heading + (0.0 if role == "ego_lane" else np.pi) + rng.normal(0, 0.03)
                speed = float(np.clip(street.path.speed + rng.normal(0, 2.0), 1.0, 14.0))
                # lane traffic follows the street's curve, and speeds up or brakes a little
                turn = street.path.curvature * speed * (1.0 if role == "ego_lane" else -1.0)
                group.append(_object(kind, size, centre, yaw, speed, t, "vehicle.moving", rng, yaw_rate=turn,
                                     acceleration=float(np.clip(rng.normal(0, 0.6), -2.0, 1.5))))
            else:
                kerb = -(LANE / 2 + 0.3 + size[0] / 2) if role == "parked_right" else (LANE * 1.5 + 0.3 + size[0] / 2)
                centre, heading, t = street.at(s, kerb + rng.normal(0, 0.15))
                yaw = heading + (0.0 if rng.uniform() < 0.85 else np.pi) + rng.normal(0, 0.04)
                group.append(_object(kind, size, centre, yaw, 0.0, t, _vehicle_attribute(False, rng), rng))
        elif kind == "pedestrian":
            side = rng.choice([-1.0, 1.0])
            base = (-(LANE / 2 + 2.6) if side < 0 else LANE * 1.5 + 2.6) + side * rng.uniform(0.3, SIDEWALK_WIDTH)
            walking = rng.uniform() < 0.55
            heading_sign = rng.choice([0.0, np.pi])
            for k in range(int(rng.choice([1, 1, 1, 2, 2, 3, 4]))):
                centre, heading, t = street.at(s + k * rng.uniform(0.7, 1.3), base + rng.normal(0, 0.4))
                yaw = heading + heading_sign + rng.normal(0, 0.15) if walking else rng.uniform(-np.pi, np.pi)
                speed = rng.uniform(0.9, 1.6) if walking else 0.0
                attribute = "pedestrian.moving" if walking else str(rng.choice(
                    ["pedestrian.standing", "pedestrian.standing", "pedestrian.sitting_lying_down"]))
                group.append(_object("pedestrian", _jitter(SIZES["pedestrian"], rng, 0.12), centre, yaw, speed, t,
                                     attribute, rng, paint_kind="pedestrian",
                                     yaw_rate=float(rng.normal(0, 0.08)) if walking else 0.0))
        elif kind in ("motorcycle", "bicycle"):
            riding = rng.uniform() < 0.6
            size = _jitter(SIZES[kind], rng, 0.08)
            if riding:
                centre, heading, t = street.at(s, -LANE / 2 + 0.7 + rng.normal(0, 0.2))
                speed = rng.uniform(3.0, 6.0) if kind == "bicycle" else rng.uniform(5.0, 11.0)
                group.append(_object(kind, size, centre, heading + rng.normal(0, 0.04), speed, t, "cycle.with_rider",
                                     rng, rider=True))
            else:
                centre, heading, t = street.at(s, -(LANE / 2 + 2.8 + rng.uniform(0, 1.0)))
                group.append(_object(kind, size, centre, heading + np.pi / 2 + rng.normal(0, 0.2), 0.0, t,
                                     "cycle.without_rider", rng))
        else:  # cone or barrier lines at a lane edge, now and then with a construction vehicle behind them
            count_in_line = int(rng.integers(3, 8))
            edge = rng.choice([-LANE / 2 - 0.4, LANE * 1.5 + 0.4])
            spacing = 2.0 if kind == "traffic_cone" else SIZES["barrier"][0] + rng.uniform(0.0, 0.6)
            for k in range(count_in_line):
                centre, heading, t = street.at(s + k * spacing, edge + rng.normal(0, 0.1))
                if kind == "traffic_cone":
                    yaw = rng.uniform(-np.pi, np.pi)
                else:
                    yaw = heading + np.pi / 2 + rng.normal(0, 0.04)  # the long side (width) along the road
                group.append(_object(kind, _jitter(SIZES[kind], rng, 0.05), centre, yaw, 0.0, t, "", rng,
                                     paint_kind=kind))
        offered += len(group)
        yield group


def _clutter(street: _Street, rng: np.random.Generator, s_range: tuple[float, float]) -> list[SceneObject]:
    """Buildings, trees and poles along both sides, and a few annotated objects of other categories."""
    out: list[SceneObject] = []
    for side in (-1.0, 1.0):
        sidewalk_outer = -(LANE / 2 + 2.6 + SIDEWALK_WIDTH) if side < 0 else LANE * 1.5 + 2.6 + SIDEWALK_WIDTH
        s = s_range[0]
        while s < s_range[1]:  # a row of buildings with gaps
            length = rng.uniform(8.0, 30.0)
            depth, height = rng.uniform(8.0, 16.0), rng.uniform(5.0, 22.0)
            setback = rng.uniform(0.5, 6.0)
            centre, heading, t = street.at(s + length / 2, sidewalk_outer + side * (setback + depth / 2))
            if rng.uniform() < 0.8:
                out.append(_object("building", (depth, length, height), centre, heading, 0.0, t, "", rng,
                                   annotated=False))
            s += length + rng.uniform(1.0, 12.0)
        s = s_range[0] + rng.uniform(0, 10)
        while s < s_range[1]:  # trees and poles at the kerb side of the sidewalk
            lateral = (-(LANE / 2 + 2.9) if side < 0 else LANE * 1.5 + 2.9)
            centre, heading, t = street.at(s, lateral)
            if rng.uniform() < 0.6:
                crown = rng.uniform(2.5, 5.0)
                out.append(_object("tree", (crown, crown, rng.uniform(5.0, 9.0)), centre, rng.uniform(-np.pi, np.pi),
                                   0.0, t, "", rng, annotated=False))
            else:
                out.append(_object("pole", (0.25, 0.25, rng.uniform(6.0, 9.0)), centre, heading, 0.0, t, "", rng,
                                   annotated=False))
            s += rng.uniform(7.0, 16.0)
    for category, (kind, size) in OTHER_KINDS.items():
        for _ in range(int(rng.poisson(1.2 if category != "animal" else 0.15))):
            side = rng.choice([-1.0, 1.0])
            lateral = -(LANE / 2 + 3.0 + rng.uniform(0, 2.5)) if side < 0 else LANE * 1.5 + 3.0 + rng.uniform(0, 2.5)
            centre, heading, t = street.at(rng.uniform(*s_range), lateral)
            out.append(_object(kind, _jitter(size, rng, 0.1), centre, heading + rng.uniform(-0.3, 0.3), 0.0, t, "",
                               rng, category=category, paint_kind="plastic"))
    return out


def _corners(obj: SceneObject, times_s: np.ndarray) -> np.ndarray:
    """Footprint corners (T, 4, 2) inflated by the clearance; (1, 4, 2) for a static object."""
    times = times_s if obj.velocity != (0.0, 0.0) else times_s[:1]
    boxes = obj.boxes_at(times)
    return rectangle_corners(boxes[:, :2], boxes[:, 3] + OBJECT_CLEARANCE, boxes[:, 4] + OBJECT_CLEARANCE,
                             boxes[:, 6])


def build_street_scene(index: int, rng: np.random.Generator, *, start_timestamp: int, num_key_frames: int,
                       sweeps_per_key_frame: int, objects_per_scene: int, speed_range: tuple[float, float],
                       max_curvature: float, reach: float, terrain_rng: np.random.Generator | None = None) -> Scene:
    """Draw one v2 scene: about `objects_per_scene` detection-class objects over the stretch of street the ego
    sees (from `reach` m behind its first key frame to `reach` m beyond its last), plus clutter. With
    `terrain_rng`, the ground has slopes and kerbs drawn from it (terrain.py); without, it is flat."""
    heading = rng.uniform(-np.pi, np.pi)
    speed = float(rng.uniform(*speed_range))
    duration = (num_key_frames - 1) * KEY_FRAME_INTERVAL_US * 1e-6
    profile: tuple[tuple[float, float], ...] = ()
    if rng.uniform() < 0.35:  # the ego brakes to a halt (2 m/s^2), waits, and drives off again (1.5 m/s^2)
        brake = float(rng.uniform(0.0, max(duration * 0.6, 0.1)))
        halt = brake + speed / 2.0
        wait = float(rng.uniform(0.5, 3.0))
        profile = ((brake, speed), (halt, 0.0), (halt + wait, 0.0), (halt + wait + speed / 1.5, speed))
    path = EgoPath((float(rng.uniform(200.0, 1800.0)), float(rng.uniform(200.0, 1800.0))), float(heading), speed,
                   float(rng.uniform(-max_curvature, max_curvature)), profile)
    key_times = tuple(start_timestamp + k * KEY_FRAME_INTERVAL_US for k in range(num_key_frames))
    scene = Scene(index, start_timestamp, key_times, sweeps_per_key_frame, path, (), first_sweeps=False)
    times_s = scene.seconds(scene.lidar_times_us())
    ego = _ego_corners(path, times_s, OBJECT_CLEARANCE)
    street = _Street(path)
    last_arc = float(path.arc(scene.seconds(key_times[-1]))[0])
    s_range = (-reach, last_arc + reach)
    placed: list[SceneObject] = []
    corners: list[np.ndarray] = []
    extents: list[np.ndarray] = []  # (4,) x min, y min, x max, y max of each placed object's swept corners
    ego_extent = np.concatenate([ego.reshape(-1, 2).min(0), ego.reshape(-1, 2).max(0)])

    def apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """True where axis-aligned extents (..., 4) do not meet: such footprints cannot overlap."""
        return (a[..., 2] < b[..., 0]) | (b[..., 2] < a[..., 0]) | (a[..., 3] < b[..., 1]) | (b[..., 3] < a[..., 1])

    def place(candidates: list[SceneObject]) -> None:
        """Place each member of a group that fits (a line of cones may lose the cone a parked car stands on)."""
        for candidate in candidates:
            c = _corners(candidate, times_s)
            extent = np.concatenate([c.reshape(-1, 2).min(0), c.reshape(-1, 2).max(0)])
            if not apart(extent, ego_extent) and rectangles_overlap(c, ego).any():
                continue
            near = np.nonzero(~apart(np.asarray(extents).reshape(-1, 4), extent))[0] if extents else []
            if any(rectangles_overlap(c, corners[k]).any() for k in near):
                continue
            placed.append(candidate)
            corners.append(c)
            extents.append(extent)

    for group in _proposals(street, rng, s_range, objects_per_scene):
        place(group)
    for obj in _clutter(street, rng, s_range):
        place([obj])
    elevation, azimuth = rng.uniform(0.3, 1.1), rng.uniform(-np.pi, np.pi)
    sun = (float(np.cos(elevation) * np.cos(azimuth)), float(np.cos(elevation) * np.sin(azimuth)),
           float(np.sin(elevation)), float(rng.uniform(0.8, 1.15)))
    terrain = Terrain.draw(terrain_rng, path, ROAD_EDGES) if terrain_rng is not None else None
    return Scene(index, start_timestamp, key_times, sweeps_per_key_frame, path, tuple(placed), first_sweeps=False,
                 world=2, sun=sun, car=index % NUM_CARS, terrain=terrain)
