"""A tiny nuScenes dataroot written by hand: 1 scene, 2 key frames, LiDAR sweeps, six cameras, all 13 tables.

Geometry chosen so expected values can be worked out on paper:
- ego drives along global +y at 6 m/s with yaw 90 deg (ego x = global +y), at (100, 200, 0) at T0;
- LIDAR_TOP at (0.943713, 0, 1.84023) in the ego frame, rotated -90 deg about z (lidar x = the car's right,
  lidar y = forward), as the real rig is up to about a degree;
- CAM_FRONT is the ideal forward camera at (1.7, 0, 1.5) (x right, y down, z forward); the other five use the
  real v1.0-mini calibration;
- LIDAR_TOP sample_data chain: sweeps at -100 ms and -50 ms, key 0 at 0 ms, sweep at 250 ms, key 1 at 500 ms;
  cameras at 10 ms and 510 ms;
- one annotated object of every detection class in both key frames (constant velocity, linked prev/next),
  a 0-point pedestrian and an animal (both ignored by the detection benchmark).
The car starts at global (95, 210, 1.5), yaw 120 deg, size [w, l, h] = [2.0, 4.5, 1.6], velocity (0, 2) m/s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from distillbev.pipeline.geometry.transforms import invert_transform, make_transform, yaw_to_quaternion

VERSION = "v1.0-tiny"
SCENE_NAME = "scene-0001"
T0 = 1_533_151_603_547_590  # µs
EGO_SPEED = 6.0  # m/s along global +y
LIDAR_TRANSLATION = [0.943713, 0.0, 1.84023]
LIDAR_ROTATION = [float(v) for v in yaw_to_quaternion(-np.pi / 2)]
IMAGE_SIZE = (1600, 900)
LIDAR_TIMES_MS = [(-100, False, 0), (-50, False, 0), (0, True, 0), (250, False, 1), (500, True, 1)]
CAMERA_TIMES_MS = [10, 510]

CAMERAS = {  # channel: (translation, rotation (w, x, y, z), fx, cx, cy, colour)
    "CAM_FRONT": ([1.7, 0.0, 1.5], [0.5, -0.5, 0.5, -0.5], 1266.417203046554, 816.2670197447984, 491.50706579294757,
                  (200, 100, 50)),
    "CAM_FRONT_RIGHT": ([1.5508477543, -0.493404796419, 1.49574800619],
                        [0.2060347966337182, -0.2026940577919598, 0.6824507824531167, -0.6713610884174485],
                        1260.8474446004698, 807.968244525554, 495.3344268742088, (50, 200, 100)),
    "CAM_FRONT_LEFT": ([1.52387798135, 0.494631336551, 1.50932822144],
                       [0.6757265034669446, -0.6736266522251881, 0.21214015046209478, -0.21122827103904068],
                       1272.5979470598488, 826.6154927353808, 479.75165386361925, (100, 50, 200)),
    "CAM_BACK": ([0.0283260309358, 0.00345136761476, 1.57910346144],
                 [0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578],
                 809.2209905677063, 829.2196003259838, 481.77842384512485, (128, 128, 128)),
    "CAM_BACK_LEFT": ([1.03569100218, 0.484795032713, 1.59097014818],
                      [0.6924185592174665, -0.7031619420114925, -0.11648342771943819, 0.11203317912370753],
                      1256.7414812095406, 792.1125740759628, 492.7757465151356, (30, 30, 30)),
    "CAM_BACK_RIGHT": ([1.0148780988, -0.480568219723, 1.56239545128],
                       [0.12280980120078765, -0.132400842670559, -0.7004305821388234, 0.690496031265798],
                       1259.5137405846733, 807.2529053838625, 501.19579884916527, (240, 240, 240)),
}

# category, class, attribute, global (x, y, z) at T0, size [w, l, h], yaw, global velocity (vx, vy)
OBJECTS = [
    ("vehicle.car", "vehicle.moving", (95.0, 210.0, 1.5), (2.0, 4.5, 1.6), np.deg2rad(120), (0.0, 2.0)),
    ("vehicle.truck", "vehicle.parked", (110.0, 215.0, 1.7), (2.5, 7.0, 3.0), 0.3, (0.0, 0.0)),
    ("vehicle.construction", "vehicle.parked", (88.0, 190.0, 1.6), (2.8, 6.5, 3.2), 1.2, (0.0, 0.0)),
    ("vehicle.bus.rigid", "vehicle.moving", (112.0, 195.0, 1.8), (2.9, 11.0, 3.5), 1.5708, (0.0, 5.0)),
    ("vehicle.trailer", "vehicle.parked", (85.0, 212.0, 1.9), (2.4, 12.0, 3.9), -0.2, (0.0, 0.0)),
    ("movable_object.barrier", None, (104.0, 206.0, 0.5), (2.5, 0.5, 1.0), 0.0, (0.0, 0.0)),
    ("vehicle.motorcycle", "cycle.with_rider", (96.0, 194.0, 0.7), (0.8, 2.1, 1.5), -1.0, (1.0, -1.0)),
    ("vehicle.bicycle", "cycle.without_rider", (103.0, 192.0, 0.6), (0.6, 1.7, 1.3), 2.0, (0.0, 0.0)),
    ("human.pedestrian.adult", "pedestrian.moving", (98.0, 205.0, 0.9), (0.7, 0.7, 1.8), 0.5, (1.2, 0.4)),
    ("movable_object.trafficcone", None, (102.0, 211.0, 0.4), (0.4, 0.4, 0.9), 0.0, (0.0, 0.0)),
]
CATEGORIES = [o[0] for o in OBJECTS] + ["animal"]
ATTRIBUTES = ["cycle.with_rider", "cycle.without_rider", "pedestrian.moving", "pedestrian.standing",
              "pedestrian.sitting_lying_down", "vehicle.moving", "vehicle.parked", "vehicle.stopped"]


def token(*parts) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def ego_pose(time_us: int) -> tuple[list[float], list[float]]:
    """(translation, rotation) of the ego at `time_us`."""
    y = 200.0 + EGO_SPEED * (time_us - T0) * 1e-6
    return [100.0, y, 0.0], [float(v) for v in yaw_to_quaternion(np.pi / 2)]


def lidar_from_global(time_us: int) -> np.ndarray:
    translation, rotation = ego_pose(time_us)
    lidar_to_global = make_transform(rotation, translation) @ make_transform(LIDAR_ROTATION, LIDAR_TRANSLATION)
    return invert_transform(lidar_to_global)


def frame_points(key_frame: bool, object_centres_lidar: np.ndarray) -> np.ndarray:
    """(P, 5) float32 sensor-frame points: a close point (dropped in sweeps), 2 in-range points, 2 out of range,
    plus every object centre in key frames (so each box holds a point)."""
    points = [[0.5, 0.2, -1.0, 10, 0], [0.0, 3.0, 0.0, 20, 1], [5.0, 5.0, -1.5, 30, 2],
              [60.0, 0.0, 0.0, 40, 3], [1.0, 20.0, -6.0, 50, 4]]
    if key_frame:
        points += [[*centre, 60, 5] for centre in object_centres_lidar]
    return np.asarray(points, dtype=np.float32)


@dataclass
class TinySlice:
    dataroot: Path
    version: str = VERSION
    sample_tokens: list[str] = field(default_factory=list)
    lidar_files: dict[str, Path] = field(default_factory=dict)  # sample_data token -> path
    key_lidar_files: list[Path] = field(default_factory=list)
    camera_files: list[Path] = field(default_factory=list)


def build_tiny_nuscenes(root: Path) -> TinySlice:
    """Write the tiny dataroot into `root` (created) and return its paths and tokens."""
    root = Path(root)
    table_root = root / VERSION
    table_root.mkdir(parents=True)
    tables: dict[str, list[dict]] = {name: [] for name in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
        "scene", "sample", "sample_data", "sample_annotation", "map")}
    result = TinySlice(dataroot=root)

    tables["category"] = [{"token": token("category", n), "name": n, "description": n, "index": i}
                          for i, n in enumerate(CATEGORIES)]
    tables["attribute"] = [{"token": token("attribute", n), "name": n, "description": n} for n in ATTRIBUTES]
    tables["visibility"] = [{"token": str(i + 1), "level": level, "description": level}
                            for i, level in enumerate(["v0-40", "v40-60", "v60-80", "v80-100"])]
    log_token, scene_token = token("log"), token("scene")
    (root / "maps").mkdir()
    Image.new("L", (20, 20), 255).save(root / "maps" / f"{token('map')}.png")
    tables["map"] = [{"token": token("map"), "log_tokens": [log_token], "category": "semantic_prior",
                      "filename": f"maps/{token('map')}.png"}]
    tables["log"] = [{"token": log_token, "logfile": "tiny-log", "vehicle": "n015", "date_captured": "2018-08-01",
                      "location": "singapore-onenorth"}]

    sensors = {"LIDAR_TOP": ("lidar", LIDAR_TRANSLATION, LIDAR_ROTATION, [])}
    for channel, (translation, rotation, fx, cx, cy, _) in CAMERAS.items():
        sensors[channel] = ("camera", translation, rotation, [[fx, 0.0, cx], [0.0, fx, cy], [0.0, 0.0, 1.0]])
    for channel, (modality, translation, rotation, intrinsic) in sensors.items():
        tables["sensor"].append({"token": token("sensor", channel), "channel": channel, "modality": modality})
        tables["calibrated_sensor"].append({"token": token("calib", channel), "sensor_token": token("sensor", channel),
                                           "translation": translation, "rotation": rotation,
                                           "camera_intrinsic": intrinsic})

    sample_tokens = [token("sample", k) for k in range(2)]
    result.sample_tokens = sample_tokens
    for k, sample_tok in enumerate(sample_tokens):
        tables["sample"].append({"token": sample_tok, "timestamp": T0 + 500_000 * k, "scene_token": scene_token,
                                 "prev": sample_tokens[k - 1] if k > 0 else "",
                                 "next": sample_tokens[k + 1] if k < 1 else ""})
    tables["scene"] = [{"token": scene_token, "log_token": log_token, "nbr_samples": 2, "name": SCENE_NAME,
                        "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[1],
                        "description": "hand-made"}]

    def add_sample_data(channel, time_us, key_frame, sample_index, filename, width, height, prev, nxt, fileformat):
        sd_token = token("sd", channel, time_us)
        translation, rotation = ego_pose(time_us)
        tables["ego_pose"].append({"token": sd_token, "timestamp": time_us, "translation": translation,
                                   "rotation": rotation})
        tables["sample_data"].append({
            "token": sd_token, "sample_token": sample_tokens[sample_index], "ego_pose_token": sd_token,
            "calibrated_sensor_token": token("calib", channel), "timestamp": time_us, "fileformat": fileformat,
            "is_key_frame": key_frame, "height": height, "width": width, "filename": filename,
            "prev": prev, "next": nxt})
        return sd_token

    # LiDAR chain (sweeps included, time order).
    times = [T0 + ms * 1000 for ms, _, _ in LIDAR_TIMES_MS]
    sd_tokens = [token("sd", "LIDAR_TOP", t) for t in times]
    for i, ((ms, key_frame, sample_index), time_us) in enumerate(zip(LIDAR_TIMES_MS, times)):
        folder = "samples" if key_frame else "sweeps"
        filename = f"{folder}/LIDAR_TOP/tiny__LIDAR_TOP__{time_us}.pcd.bin"
        centres = np.array([transform_point(lidar_from_global(time_us), obj_position(o, time_us)) for o in OBJECTS])
        path = root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        frame_points(key_frame, centres).tofile(path)
        add_sample_data("LIDAR_TOP", time_us, key_frame, sample_index, filename, 0, 0,
                        sd_tokens[i - 1] if i > 0 else "", sd_tokens[i + 1] if i + 1 < len(times) else "", "pcd")
        result.lidar_files[sd_tokens[i]] = path
        if key_frame:
            result.key_lidar_files.append(path)

    # Camera key frames, one chain per channel.
    for channel, (*_, colour) in CAMERAS.items():
        cam_times = [T0 + ms * 1000 for ms in CAMERA_TIMES_MS]
        cam_tokens = [token("sd", channel, t) for t in cam_times]
        for k, time_us in enumerate(cam_times):
            filename = f"samples/{channel}/tiny__{channel}__{time_us}.jpg"
            path = root / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", IMAGE_SIZE, colour).save(path, quality=95)
            add_sample_data(channel, time_us, True, k, filename, IMAGE_SIZE[0], IMAGE_SIZE[1],
                            cam_tokens[k - 1] if k > 0 else "", cam_tokens[k + 1] if k < 1 else "", "jpg")
            result.camera_files.append(path)

    # Annotations: every detection class in both samples, plus two the benchmark ignores.
    for i, obj in enumerate(OBJECTS):
        category, attribute, _, size, yaw, _ = obj
        instance_tok = token("instance", i)
        ann_tokens = [token("ann", i, k) for k in range(2)]
        tables["instance"].append({"token": instance_tok, "category_token": token("category", category),
                                   "nbr_annotations": 2, "first_annotation_token": ann_tokens[0],
                                   "last_annotation_token": ann_tokens[1]})
        for k in range(2):
            tables["sample_annotation"].append({
                "token": ann_tokens[k], "sample_token": sample_tokens[k], "instance_token": instance_tok,
                "visibility_token": "4", "attribute_tokens": [token("attribute", attribute)] if attribute else [],
                "translation": list(obj_position(obj, T0 + 500_000 * k)), "size": list(size),
                "rotation": [float(v) for v in yaw_to_quaternion(yaw)],
                "prev": ann_tokens[k - 1] if k > 0 else "", "next": ann_tokens[k + 1] if k < 1 else "",
                "num_lidar_pts": 5, "num_radar_pts": 0})
    extras = [("human.pedestrian.adult", (101.0, 207.0, 0.9), 0), ("animal", (99.0, 208.0, 0.3), 3)]
    for j, (category, position, num_points) in enumerate(extras):
        instance_tok, ann_tok = token("instance-extra", j), token("ann-extra", j)
        tables["instance"].append({"token": instance_tok, "category_token": token("category", category),
                                   "nbr_annotations": 1, "first_annotation_token": ann_tok,
                                   "last_annotation_token": ann_tok})
        tables["sample_annotation"].append({
            "token": ann_tok, "sample_token": sample_tokens[0], "instance_token": instance_tok,
            "visibility_token": "1", "attribute_tokens": [], "translation": list(position),
            "size": [0.7, 0.7, 1.8], "rotation": [1.0, 0.0, 0.0, 0.0], "prev": "", "next": "",
            "num_lidar_pts": num_points, "num_radar_pts": 0})

    for name, records in tables.items():
        (table_root / f"{name}.json").write_text(json.dumps(records, indent=1))
    (table_root / "splits.json").write_text(json.dumps({"tiny_train": [SCENE_NAME], "tiny_val": [SCENE_NAME]}))
    return result


def obj_position(obj, time_us: int) -> tuple[float, float, float]:
    _, _, (x, y, z), _, _, (vx, vy) = obj
    dt = (time_us - T0) * 1e-6
    return (x + vx * dt, y + vy * dt, z)


def transform_point(t: np.ndarray, point) -> np.ndarray:
    return t[:3, :3] @ np.asarray(point, dtype=np.float64) + t[:3, 3]
