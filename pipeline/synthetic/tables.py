"""The 13 nuScenes tables of a synthetic dataroot: records, md5 tokens and prev/next links.

Records are appended while the sensors are simulated; `link()` then fills every prev/next chain and the
first/last/count summaries, and `write()` dumps the tables as JSON. Tokens are md5 hashes of stable strings
(seed, table, indices), so the same seed gives byte-identical tables.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data.classes import ATTRIBUTES
from ..geometry.transforms import yaw_to_quaternion
from .catalog import CLASS_SPECS
from .rig import IMAGE_HEIGHT, IMAGE_WIDTH, RIG, rig_variant

TABLE_NAMES: tuple[str, ...] = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log", "scene",
    "sample", "sample_data", "sample_annotation", "map",
)
# nuScenes visibility levels: fraction of the object visible over all six cameras.
VISIBILITY_LEVELS = (("1", "v0-40", 0.0), ("2", "v40-60", 0.4), ("3", "v60-80", 0.6), ("4", "v80-100", 0.8))


def make_token(seed: int, *parts: object) -> str:
    """A 32-hex-digit token from the seed and a stable description of the record."""
    text = "/".join(["distillbev-synthetic", str(seed), *(str(p) for p in parts)])
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def visibility_token(fraction: float) -> str:
    """nuScenes visibility token ('1'..'4') of the visible fraction of an object."""
    token = VISIBILITY_LEVELS[0][0]
    for level_token, _, lower in VISIBILITY_LEVELS:
        if fraction >= lower:
            token = level_token
    return token


def _floats(values: np.ndarray | list[float]) -> list[float]:
    """JSON-safe list of Python floats (np.float32 does not serialise)."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


class DatasetTables:
    """Accumulates the records of all 13 tables for one dataroot."""

    def __init__(self, seed: int, extra_categories: tuple[str, ...] = (), cars: int = 1) -> None:
        """extra_categories: nuScenes categories beyond the 10 classes' own that the world annotates; cars: how
        many recording cars (rigs, rig.rig_variant) the scenes use."""
        self.seed = seed
        self.extra_categories = extra_categories
        self.cars = cars
        self.scene_car: dict[int, int] = {}
        self.tables: dict[str, list[dict]] = {name: [] for name in TABLE_NAMES}
        self._instance_tokens: set[str] = set()
        self._add_vocabulary()
        self._add_rig()

    def token(self, *parts: object) -> str:
        return make_token(self.seed, *parts)

    def _add_vocabulary(self) -> None:
        for index, spec in enumerate(CLASS_SPECS.values()):
            self.tables["category"].append({"token": self.token("category", spec.category), "name": spec.category,
                                            "description": f"Synthetic {spec.name.replace('_', ' ')}.",
                                            "index": index})
        for index, name in enumerate(self.extra_categories, start=len(CLASS_SPECS)):
            self.tables["category"].append({"token": self.token("category", name), "name": name,
                                            "description": f"Synthetic {name} (outside the detection classes).",
                                            "index": index})
        for name in ATTRIBUTES:
            self.tables["attribute"].append({"token": self.token("attribute", name), "name": name,
                                             "description": f"Synthetic attribute {name}."})
        for token, level, lower in VISIBILITY_LEVELS:
            self.tables["visibility"].append({"token": token, "level": level,
                                              "description": f"visibility of whole object is {level[1:]}%"})

    def _add_rig(self) -> None:
        for channel, calibration in RIG.items():
            self.tables["sensor"].append({"token": self.token("sensor", channel), "channel": channel,
                                          "modality": calibration.modality})
        for car in range(self.cars):
            for channel, calibration in rig_variant(car).items():
                intrinsic = calibration.intrinsics.tolist() if calibration.modality == "camera" else []
                self.tables["calibrated_sensor"].append({
                    "token": self._calibration_token(channel, car), "sensor_token": self.token("sensor", channel),
                    "translation": _floats(calibration.translation), "rotation": _floats(calibration.rotation),
                    "camera_intrinsic": intrinsic})

    def _calibration_token(self, channel: str, car: int) -> str:
        # car 0 keeps the token of the one-car world
        return self.token("calibrated_sensor", channel) if car == 0 else self.token("calibrated_sensor", channel, car)

    def add_scene(self, scene_index: int, name: str, log_name: str, description: str) -> str:
        """Adds a log and a scene; returns the scene token."""
        log_token = self.token("log", scene_index)
        car = self.scene_car.get(scene_index, 0)
        self.tables["log"].append({"token": log_token, "logfile": log_name,
                                   "vehicle": "synthetic-ego" if car == 0 else f"synthetic-ego-{car}",
                                   "date_captured": "2020-09-13", "location": "synthetic-flatland"})
        scene_token = self.token("scene", scene_index)
        self.tables["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": 0,
                                     "first_sample_token": "", "last_sample_token": "", "name": name,
                                     "description": description})
        return scene_token

    def add_sample(self, scene_index: int, key_index: int, timestamp: int) -> str:
        token = self.token("sample", scene_index, key_index)
        self.tables["sample"].append({"token": token, "timestamp": int(timestamp), "prev": "", "next": "",
                                      "scene_token": self.token("scene", scene_index)})
        return token

    def add_sample_data(self, scene_index: int, channel: str, sample_token: str, timestamp: int, is_key_frame: bool,
                        filename: str, ego_xy: np.ndarray, ego_heading: float,
                        ego_rotation: np.ndarray | None = None) -> str:
        """Adds a sample_data record and its own ego_pose (at z = 0, as nuScenes; rotated by `ego_rotation`
        (w, x, y, z) when given, else by the yaw `ego_heading` alone); returns the sample_data token."""
        token = self.token("sample_data", scene_index, channel, timestamp)
        ego_token = self.token("ego_pose", scene_index, channel, timestamp)
        rotation = yaw_to_quaternion(ego_heading) if ego_rotation is None else ego_rotation
        self.tables["ego_pose"].append({"token": ego_token, "timestamp": int(timestamp),
                                        "rotation": _floats(rotation),
                                        "translation": [float(ego_xy[0]), float(ego_xy[1]), 0.0]})
        is_camera = RIG[channel].modality == "camera"
        self.tables["sample_data"].append({
            "token": token, "sample_token": sample_token, "ego_pose_token": ego_token,
            "calibrated_sensor_token": self._calibration_token(channel, self.scene_car.get(scene_index, 0)),
            "timestamp": int(timestamp),
            "fileformat": "jpg" if is_camera else "pcd", "is_key_frame": bool(is_key_frame),
            "height": IMAGE_HEIGHT if is_camera else 0, "width": IMAGE_WIDTH if is_camera else 0,
            "filename": filename, "prev": "", "next": "", "_channel": channel, "_scene": scene_index})
        return token

    def add_annotation(self, scene_index: int, object_index: int, category: str, sample_token: str,
                       key_index: int, box: np.ndarray, attribute: str, num_lidar_pts: int,
                       visible_fraction: float) -> str:
        """Adds one sample_annotation for box (7,) = (x, y, z, l, w, h, yaw); creates the instance on first use."""
        instance_token = self.token("instance", scene_index, object_index)
        if instance_token not in self._instance_tokens:
            self._instance_tokens.add(instance_token)
            self.tables["instance"].append({
                "token": instance_token, "category_token": self.token("category", category),
                "nbr_annotations": 0, "first_annotation_token": "", "last_annotation_token": ""})
        token = self.token("sample_annotation", scene_index, object_index, key_index)
        self.tables["sample_annotation"].append({
            "token": token, "sample_token": sample_token, "instance_token": instance_token,
            "visibility_token": visibility_token(visible_fraction),
            "attribute_tokens": [self.token("attribute", attribute)] if attribute else [],
            "translation": _floats(box[:3]), "size": _floats([box[4], box[3], box[5]]),
            "rotation": _floats(yaw_to_quaternion(float(box[6]))), "prev": "", "next": "",
            "num_lidar_pts": int(num_lidar_pts), "num_radar_pts": 0})
        return token

    SCENE_TABLES = ("log", "scene", "sample", "sample_data", "ego_pose", "instance", "sample_annotation")

    def extend(self, other: "DatasetTables") -> None:
        """Appends the scene records of `other` (tables of the same seed, e.g. one scene generated in another
        process) after this one's; the vocabulary and the rig are the same in both and are kept once."""
        for name in self.SCENE_TABLES:
            self.tables[name].extend(other.tables[name])
        self.scene_car.update(other.scene_car)
        self._instance_tokens |= other._instance_tokens

    def add_map(self, png_filename: str) -> None:
        self.tables["map"].append({"token": self.token("map"), "log_tokens": [r["token"] for r in self.tables["log"]],
                                   "category": "semantic_prior", "filename": png_filename})

    def map_token(self) -> str:
        return self.token("map")

    def link(self) -> None:
        """Fills prev/next chains and first/last/count summaries from the records' timestamps."""
        timestamp_of_sample = {r["token"]: r["timestamp"] for r in self.tables["sample"]}
        samples_by_scene: dict[str, list[dict]] = defaultdict(list)
        for record in self.tables["sample"]:
            samples_by_scene[record["scene_token"]].append(record)
        for scene in self.tables["scene"]:
            chain = sorted(samples_by_scene[scene["token"]], key=lambda r: r["timestamp"])
            _link_chain(chain)
            scene["nbr_samples"] = len(chain)
            scene["first_sample_token"] = chain[0]["token"] if chain else ""
            scene["last_sample_token"] = chain[-1]["token"] if chain else ""
        data_chains: dict[tuple[int, str], list[dict]] = defaultdict(list)
        for record in self.tables["sample_data"]:
            data_chains[(record.pop("_scene"), record.pop("_channel"))].append(record)
        for chain in data_chains.values():
            _link_chain(sorted(chain, key=lambda r: r["timestamp"]))
        annotations_by_instance: dict[str, list[dict]] = defaultdict(list)
        for record in self.tables["sample_annotation"]:
            annotations_by_instance[record["instance_token"]].append(record)
        for instance in self.tables["instance"]:
            chain = sorted(annotations_by_instance[instance["token"]],
                           key=lambda r: timestamp_of_sample[r["sample_token"]])
            _link_chain(chain)
            instance["nbr_annotations"] = len(chain)
            instance["first_annotation_token"] = chain[0]["token"]
            instance["last_annotation_token"] = chain[-1]["token"]

    def write(self, table_dir: Path) -> None:
        """Writes `<table>.json` for all 13 tables into table_dir."""
        table_dir.mkdir(parents=True, exist_ok=True)
        for name in TABLE_NAMES:
            with open(table_dir / f"{name}.json", "w", encoding="utf-8") as handle:
                json.dump(self.tables[name], handle, indent=0)


def _link_chain(chain: list[dict]) -> None:
    """Sets prev/next of records already in time order ('' at the ends)."""
    for before, after in zip(chain[:-1], chain[1:]):
        before["next"] = after["token"]
        after["prev"] = before["token"]
