"""Statistics of a nuScenes-format dataroot, to set a synthetic world beside the real one.

    stats = dataset_statistics(nusc)      # any dataroot the devkit loads: v1.0-mini, trainval, synthetic
    print(format_statistics(stats))

Per key frame: annotations (all categories and the 10 detection classes), LiDAR rows, returns and near-sensor
rows (`loading.near_sensor`: rays without a return and the car's own body, inside the devkit's 1 m box); per
annotation of the 10 classes: class, distance from the ego in the ground plane, LiDAR points inside the box; per
scene: LiDAR sweeps before its first key frame; per camera record: its time offset from the sample's LiDAR key
frame; per key frame: the ego's pitch and roll (how much the ground tilts under it).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .classes import DETECTION_CLASSES, category_to_class
from .loading import NEAR_SENSOR_BOX, near_sensor

# Published or measured figures of real nuScenes, with where each comes from. Only these are printed beside ours.
NUSCENES_REFERENCE = {
    "annotations_per_sample_all": (46.0, "v1.0-mini, all 23 categories"),
    "lidar_points_per_key_frame": (34500.0, "HDL-32E key frame, about 34.5k rows: every ray of its ~1,085 "
                                            "firing columns, a ray without a return written near the sensor"),
    "lidar_returns_per_key_frame": (26414.0, "one v1.0-mini key frame (ca9a282c, 9 m/s): 26,414 of its 34,688 rows"),
    "lidar_near_sensor_per_key_frame": (8274.0, "the same key frame: 4,393 rays without a return and 3,881 returns "
                                                "from the car's roof"),
}
RANGE_BINS = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0)


@dataclass
class DatasetStatistics:
    """What `dataset_statistics` measures (counts, fractions and percentiles; JSON-ready)."""

    version: str
    samples: int
    scenes: int
    annotations_all: int
    annotations_detection: int
    class_counts: dict[str, int]
    other_categories: dict[str, int]
    range_percentiles: dict[str, float]  # p5 / p50 / p95 of the detection-class annotations' ego distance [m]
    range_histogram: dict[str, float]  # fraction of detection-class annotations per distance bin
    points_per_key_frame: dict[str, float]  # mean / p5 / p95 of the rows of each key frame's .pcd.bin
    points_per_box: dict[str, float]  # median LiDAR points per box, per class
    empty_boxes: float  # fraction of detection-class annotations with no LiDAR point
    sweeps_before_first_key_frame: dict[str, float]  # mean / max over scenes
    camera_offsets_ms: dict[str, float] = field(default_factory=dict)  # per channel: mean |camera - LiDAR| [ms]
    # |pitch| and |roll| of the LiDAR key frames' ego poses [deg]: p50 / p95 / max (0 on flat ground)
    ego_tilt_deg: dict[str, dict[str, float]] = field(default_factory=dict)
    # mean / p5 / p95 of the returns among those rows (outside the devkit's 1 m near-sensor box)
    returns_per_key_frame: dict[str, float] = field(default_factory=dict)
    # mean / p5 / p95 of the other rows: rays without a return and the car's own body (`loading.near_sensor`)
    near_sensor_per_key_frame: dict[str, float] = field(default_factory=dict)

    @property
    def annotations_per_sample(self) -> float:
        return self.annotations_all / max(self.samples, 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "annotations_per_sample": self.annotations_per_sample}


def dataset_statistics(nusc: Any, progress: bool = False) -> DatasetStatistics:
    """Measure a loaded devkit `NuScenes` object (every sample of every scene)."""
    from tqdm import tqdm

    class_counts: Counter = Counter()
    other: Counter = Counter()
    distances: list[float] = []
    box_points: dict[str, list[int]] = {name: [] for name in DETECTION_CLASSES}
    key_points: list[int] = []
    key_returns: list[int] = []
    key_near: list[int] = []
    offsets: dict[str, list[float]] = {}
    tilts: dict[str, list[float]] = {"pitch": [], "roll": []}
    total = 0
    for sample in tqdm(nusc.sample, desc="dataset-stats", unit="sample", disable=not progress):
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        pose = nusc.get("ego_pose", lidar["ego_pose_token"])
        pitch, roll = _pitch_roll(pose["rotation"])
        tilts["pitch"].append(abs(pitch))
        tilts["roll"].append(abs(roll))
        path = os.path.join(nusc.dataroot, lidar["filename"])
        if os.path.exists(path):
            cloud = np.fromfile(path, dtype=np.float32)
            cloud = cloud[:len(cloud) - len(cloud) % 5].reshape(-1, 5)  # x, y, z, intensity, ring
            rows, returns, near = lidar_row_counts(cloud)
            key_points.append(rows)
            key_returns.append(returns)
            key_near.append(near)
        for channel, token in sample["data"].items():
            if channel.startswith("CAM"):
                record = nusc.get("sample_data", token)
                offsets.setdefault(channel, []).append(abs(record["timestamp"] - lidar["timestamp"]) / 1000.0)
        for token in sample["anns"]:
            annotation = nusc.get("sample_annotation", token)
            total += 1
            name = category_to_class(annotation["category_name"])
            if name is None:
                other[annotation["category_name"]] += 1
                continue
            class_counts[name] += 1
            distances.append(float(np.hypot(annotation["translation"][0] - pose["translation"][0],
                                             annotation["translation"][1] - pose["translation"][1])))
            box_points[name].append(int(annotation["num_lidar_pts"]))
    sweeps = []
    for scene in nusc.scene:
        first = nusc.get("sample", scene["first_sample_token"])
        record = nusc.get("sample_data", first["data"]["LIDAR_TOP"])
        count = 0
        while record["prev"]:
            record = nusc.get("sample_data", record["prev"])
            count += 1
        sweeps.append(count)
    detection = sum(class_counts.values())
    distance = np.asarray(distances) if distances else np.zeros(1)
    hist, _ = np.histogram(distance, bins=RANGE_BINS)
    points = np.asarray(key_points, dtype=np.float64) if key_points else np.zeros(1)
    returns = np.asarray(key_returns, dtype=np.float64) if key_returns else np.zeros(1)
    near = np.asarray(key_near, dtype=np.float64) if key_near else np.zeros(1)
    all_box_points = [n for values in box_points.values() for n in values]
    return DatasetStatistics(
        version=str(nusc.version), samples=len(nusc.sample), scenes=len(nusc.scene), annotations_all=total,
        annotations_detection=detection,
        class_counts={name: int(class_counts.get(name, 0)) for name in DETECTION_CLASSES},
        other_categories=dict(sorted(other.items())),
        range_percentiles={f"p{q}": float(np.percentile(distance, q)) for q in (5, 50, 95)},
        range_histogram={f"{lo:.0f}-{hi:.0f} m": float(n / max(detection, 1))
                         for lo, hi, n in zip(RANGE_BINS[:-1], RANGE_BINS[1:], hist)},
        points_per_key_frame={"mean": float(points.mean()), "p5": float(np.percentile(points, 5)),
                              "p95": float(np.percentile(points, 95))},
        points_per_box={name: float(np.median(values)) if values else 0.0 for name, values in box_points.items()},
        empty_boxes=float(np.mean(np.asarray(all_box_points) == 0)) if all_box_points else 0.0,
        sweeps_before_first_key_frame={"mean": float(np.mean(sweeps)) if sweeps else 0.0,
                                       "max": float(max(sweeps)) if sweeps else 0.0},
        camera_offsets_ms={channel: float(np.mean(values)) for channel, values in sorted(offsets.items())},
        ego_tilt_deg={name: {"p50": float(np.degrees(np.percentile(values, 50))),
                             "p95": float(np.degrees(np.percentile(values, 95))),
                             "max": float(np.degrees(np.max(values)))} for name, values in tilts.items() if values},
        returns_per_key_frame=_spread(returns), near_sensor_per_key_frame=_spread(near))


def lidar_row_counts(cloud: np.ndarray) -> tuple[int, int, int]:
    """(rows, returns, near-sensor rows) of one .pcd.bin cloud (P, 5); returns + near-sensor rows = rows."""
    near = int(near_sensor(cloud).sum())
    return len(cloud), len(cloud) - near, near


def _spread(values: np.ndarray) -> dict[str, float]:
    """mean / p5 / p95 of per-key-frame counts."""
    return {"mean": float(values.mean()), "p5": float(np.percentile(values, 5)),
            "p95": float(np.percentile(values, 95))}


def _pitch_roll(rotation: list[float]) -> tuple[float, float]:
    """Pitch (about y) and roll (about x) [rad] of a (w, x, y, z) quaternion as intrinsic z-y-x (yaw, then pitch,
    then roll) angles; a turn about +y by a positive angle puts the nose down."""
    w, x, y, z = (float(v) for v in rotation)
    pitch = np.arcsin(np.clip(2.0 * (w * y - z * x), -1.0, 1.0))
    roll = np.arctan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    return float(pitch), float(roll)


def format_statistics(stats: DatasetStatistics, reference: dict[str, float] | None = None) -> str:
    """Markdown tables: the dataroot's figures, with the real nuScenes figures we know beside them."""
    lines = [f"## {stats.version}: {stats.scenes} scenes, {stats.samples} key frames", "",
             "| measure | this dataroot | nuScenes |", "|---|---|---|"]
    lines.append(f"| annotations per key frame (all categories) | {stats.annotations_per_sample:.1f} | "
                 f"{_ref('annotations_per_sample_all')} |")
    lines.append(f"| annotations per key frame (10 classes) | {stats.annotations_detection / max(stats.samples, 1):.1f}"
                 f" | |")
    p = stats.points_per_key_frame
    lines.append(f"| LiDAR points per key frame, mean (p5-p95) | {p['mean']:.0f} ({p['p5']:.0f}-{p['p95']:.0f}) | "
                 f"{_ref('lidar_points_per_key_frame')} |")
    if stats.returns_per_key_frame:
        q = stats.returns_per_key_frame
        lines.append(f"| of which returns (outside the devkit's {NEAR_SENSOR_BOX:.0f} m box around the sensor), mean "
                     f"(p5-p95) | {q['mean']:.0f} ({q['p5']:.0f}-{q['p95']:.0f}) | "
                     f"{_ref('lidar_returns_per_key_frame')} |")
    if stats.near_sensor_per_key_frame:
        q = stats.near_sensor_per_key_frame
        lines.append(f"| of which near the sensor (inside that box: rays without a return, the car's body), mean "
                     f"(p5-p95) | {q['mean']:.0f} ({q['p5']:.0f}-{q['p95']:.0f}) | "
                     f"{_ref('lidar_near_sensor_per_key_frame')} |")
    r = stats.range_percentiles
    lines.append(f"| ego distance of annotations, p5 / p50 / p95 [m] | {r['p5']:.1f} / {r['p50']:.1f} / "
                 f"{r['p95']:.1f} | |")
    lines.append(f"| annotations with no LiDAR point | {100 * stats.empty_boxes:.1f}% | |")
    s = stats.sweeps_before_first_key_frame
    lines.append(f"| LiDAR sweeps before a scene's first key frame, mean / max | {s['mean']:.1f} / {s['max']:.0f} | "
                 f"0 (a scene starts with no earlier sweep) |")
    if stats.camera_offsets_ms:
        offsets = ", ".join(f"{c[4:]} {v:.0f}" for c, v in stats.camera_offsets_ms.items())
        lines.append(f"| mean camera - LiDAR time offset [ms] | {offsets} | |")
    if stats.ego_tilt_deg:
        t = stats.ego_tilt_deg
        lines.append(f"| ego pitch / roll at key frames, p50 / p95 / max [deg] | {t['pitch']['p50']:.2f} / "
                     f"{t['pitch']['p95']:.2f} / {t['pitch']['max']:.2f} and {t['roll']['p50']:.2f} / "
                     f"{t['roll']['p95']:.2f} / {t['roll']['max']:.2f} | |")
    lines += ["", "| class | share of the 10 classes' annotations | median LiDAR points per box |", "|---|---|---|"]
    total = max(stats.annotations_detection, 1)
    for name in DETECTION_CLASSES:
        lines.append(f"| {name} | {100 * stats.class_counts[name] / total:.1f}% | {stats.points_per_box[name]:.0f} |")
    lines += ["", "| ego distance | share of annotations |", "|---|---|"]
    lines += [f"| {label} | {100 * share:.1f}% |" for label, share in stats.range_histogram.items()]
    if stats.other_categories:
        lines += ["", "Annotated categories outside the 10 classes (ignored by the detection benchmark): "
                  + ", ".join(f"{name} {count}" for name, count in stats.other_categories.items())]
    return "\n".join(lines)


def _ref(key: str) -> str:
    value, source = NUSCENES_REFERENCE[key]
    return f"{value:.0f} ({source})"
