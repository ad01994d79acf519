"""Generate a small nuScenes-format dataroot (v1.0-synthetic) that nuscenes-devkit loads and evaluates.

Layout written under `out_dir`:
    samples/LIDAR_TOP/*.pcd.bin, sweeps/LIDAR_TOP/*.pcd.bin, samples/CAM_*/*.jpg, maps/<token>.png,
    <version>/<13 tables>.json, <version>/splits.json, synthetic_manifest.json, synthetic_summary.json.
    With instance_masks (world 2's default, world 1 on request): masks/CAM_*/<image stem>.png + .json and
    masks_truth/ (masks.py).
The manifest (generator, config, "complete": false) is written first and marks the folder as a synthetic dataroot
that may be regenerated in place; the tables are written last into a temporary folder that is then renamed, and
only then are the manifest marked complete and synthetic_summary.json written. An interrupted run therefore has
no `<version>/` tables, no summary and a manifest that says it is incomplete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.classes import DETECTION_CLASSES
from ..data.loading import lidar_returns
from ..data.masks import MASK_FOLDER, TRUTH_FOLDER
from ..errors import ConfigError, DataError
from .camera import save_jpeg
from .frames import CameraRig, LidarFrame, SensorSettings, camera_times, ego_height, ego_pose, simulate_lidar
from .layout import NUM_CARS, OTHER_KINDS, build_street_scene
from .lidar import LidarPattern
from .masks import MaskErrorModel, write_key_frame_masks
from .rig import CAMERA_CHANNELS, LIDAR_CHANNEL
from .tables import DatasetTables
from .world import Scene, build_scene

logger = logging.getLogger(__name__)

MANIFEST_NAME = "synthetic_manifest.json"
SUMMARY_NAME = "synthetic_summary.json"  # written last: its presence means the dataroot is complete
GENERATOR_ID = "distillbev-synthetic"
# Split names the devkit maps to the official scene lists; a custom split must use other names.
PREDEFINED_SPLITS = frozenset({"train", "val", "test", "mini_train", "mini_val", "train_detect", "train_track"})


@dataclass
class SyntheticConfig:
    """What to generate. Defaults: world 2, the street world, at 10 scenes x 10 key frames (8 train, 2 val scenes)
    with nuScenes' range and density; `SyntheticConfig.boxes()` gives world 1."""

    num_scenes: int = 10  # scenes (one log each)
    samples_per_scene: int = 10  # key frames per scene (2 Hz)
    seed: int = 0  # everything (tokens, world, noise) follows from it
    version: str = "v1.0-synthetic"  # table folder name passed to NuScenes(version=...)
    train_split: str = "synth_train"  # custom split names in <version>/splits.json (not train/val)
    val_split: str = "synth_val"
    val_scenes: int = 2  # the last `val_scenes` scenes form the val split
    visibility_range: float = 70.0  # objects beyond this distance from the ego are neither rendered nor hit by LiDAR
    sweeps_per_key_frame: int = 9  # 20 Hz LiDAR sweeps before each key frame (world 2: none before a scene's first)
    objects_per_scene: int = 160  # objects drawn per scene (world 1: one of each class first), before overlap rejection
    ego_speed_range: tuple[float, float] = (3.0, 8.0)  # ego speed drawn per scene [m/s]
    max_curvature: float = 0.02  # |curvature| of the ego path [1/m] (radius >= 50 m)
    lidar_azimuth_steps: int = 1084  # LiDAR columns per revolution (32 beams each)
    lidar_range_noise: float = 0.01  # LiDAR range noise std [m]
    start_timestamp: int = 1_600_000_000_000_000  # first key frame of scene 0 [us]; scenes are 60 s apart
    max_scene_attempts: int = 20  # redraws of a scene until every class is annotated in it (world 1)
    world: int = 2  # 2: the street world of layout.py; 1: one coloured box per object on a flat grid
    instance_masks: bool = True  # per-camera instance masks of a segmenter beside samples/ (masks.py); opt-in in
    # world 1 (`make-synthetic --world 1 --masks`), where they add files and change no other byte
    terrain: bool = True  # world 2: slopes and kerbs (terrain.py); the ego pitches and rolls with the ground
    mask_errors: MaskErrorModel = field(default_factory=MaskErrorModel)  # how those masks differ from the truth

    @classmethod
    def boxes(cls, **overrides) -> "SyntheticConfig":
        """World 1: one coloured box per object on flat ground, 28 objects per scene seen to 30 m, no masks. Its
        class is a colour and its depth nearly a lookup; it is kept for the quick main job (`demo --world 1`)."""
        return cls(**{"world": 1, "visibility_range": 30.0, "objects_per_scene": 28, "instance_masks": False,
                      "terrain": False, **overrides})


@dataclass
class ScenePlan:
    """A scene whose key frames show all 10 classes, with the key-frame LiDAR sweeps already cast."""

    scene: Scene
    key_frames: list[LidarFrame]
    attempt: int


MINI_VERSION = "v1.0-mini"


def official_mini_scenes() -> tuple[list[str], list[str]]:
    """The devkit's own scene names of the mini_train (8) and mini_val (2) splits."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    return list(splits["mini_train"]), list(splits["mini_val"])


def is_official_mini(config: SyntheticConfig) -> bool:
    """With version v1.0-mini the dataroot takes the official mini layout: the 10 scenes carry the official mini
    scene names and the splits are the devkit's own mini_train / mini_val (no splits.json), so the devkit's
    scripts and mmdet3d's converter, which accept only trainval / test / mini, read it unchanged."""
    return config.version == MINI_VERSION


def check_config(config: SyntheticConfig) -> None:
    """Raises ConfigError naming the first invalid field."""
    if is_official_mini(config):
        train, val = official_mini_scenes()
        if (config.num_scenes, config.val_scenes) != (len(train) + len(val), len(val)):
            raise ConfigError(f"synthetic config: version {MINI_VERSION} takes the official mini layout of "
                              f"{len(train) + len(val)} scenes, {len(val)} of them val; found num_scenes "
                              f"{config.num_scenes} and val_scenes {config.val_scenes}; pass --scenes 10 "
                              f"--val-scenes 2 or another --version")
    problems = [
        ("num_scenes", config.num_scenes >= 2, "at least 2 (a train and a val scene)"),
        ("samples_per_scene", config.samples_per_scene >= 1, "at least 1"),
        ("val_scenes", 1 <= config.val_scenes < config.num_scenes,
         f"between 1 and num_scenes - 1 ({config.num_scenes - 1})"),
        ("visibility_range", config.visibility_range > 0, "positive"),
        ("sweeps_per_key_frame", 0 <= config.sweeps_per_key_frame <= 9, "0..9 (20 Hz between 2 Hz key frames)"),
        ("objects_per_scene", config.objects_per_scene >= len(DETECTION_CLASSES), "at least 10 (one per class)"),
        ("train_split", config.train_split not in PREDEFINED_SPLITS, "a custom name (not a predefined nuScenes split)"),
        ("val_split", config.val_split not in PREDEFINED_SPLITS and config.val_split != config.train_split,
         "a custom name different from train_split"),
        ("lidar_azimuth_steps", config.lidar_azimuth_steps >= 64, "at least 64"),
        ("world", config.world in (1, 2), "1 or 2"),
        ("terrain", not config.terrain or config.world == 2, "false in world 1 (its ground is flat)"),
    ]
    for name, ok, expected in problems:
        if not ok:
            raise ConfigError(f"synthetic config field '{name}' must be {expected}, found "
                              f"{getattr(config, name)!r}; fix the value")
    try:
        config.mask_errors.check()
    except ValueError as exc:
        raise ConfigError(f"synthetic config field 'mask_errors': {exc}") from None


def sensor_settings(config: SyntheticConfig) -> SensorSettings:
    return SensorSettings(config.seed, config.visibility_range, LidarPattern(num_azimuths=config.lidar_azimuth_steps),
                          config.lidar_range_noise)


def plan_scene(config: SyntheticConfig, scene_index: int) -> ScenePlan:
    """Draws scene `scene_index` deterministically; in world 1, redraws it until all 10 classes have key-frame
    points (world 2 keeps nuScenes' frequencies: a rare class may be absent from a scene)."""
    settings = sensor_settings(config)
    if config.world == 2:
        rng = np.random.default_rng([config.seed, scene_index, 2])
        scene = build_street_scene(scene_index, rng, start_timestamp=config.start_timestamp + scene_index * 60_000_000,
                                   num_key_frames=config.samples_per_scene,
                                   sweeps_per_key_frame=config.sweeps_per_key_frame,
                                   objects_per_scene=config.objects_per_scene,
                                   speed_range=tuple(config.ego_speed_range), max_curvature=config.max_curvature,
                                   reach=config.visibility_range,
                                   terrain_rng=np.random.default_rng([config.seed, scene_index, 3]) if config.terrain
                                   else None)
        key_frames = [simulate_lidar(scene, t, settings, count_points=True) for t in scene.key_frame_times_us]
        return ScenePlan(scene, key_frames, 0)
    for attempt in range(config.max_scene_attempts):
        rng = np.random.default_rng([config.seed, scene_index, attempt])
        scene = build_scene(scene_index, rng, start_timestamp=config.start_timestamp + scene_index * 60_000_000,
                            num_key_frames=config.samples_per_scene, sweeps_per_key_frame=config.sweeps_per_key_frame,
                            num_objects=config.objects_per_scene, speed_range=tuple(config.ego_speed_range),
                            max_curvature=config.max_curvature, visibility_range=config.visibility_range)
        key_frames = [simulate_lidar(scene, t, settings, count_points=True) for t in scene.key_frame_times_us]
        seen = {scene.objects[i].class_name for frame in key_frames for i, n in zip(frame.visible, frame.num_points)
                if n > 0}
        if seen == set(DETECTION_CLASSES):
            return ScenePlan(scene, key_frames, attempt)
        logger.debug("scene %d attempt %d misses %s; redrawing", scene_index, attempt,
                     sorted(set(DETECTION_CLASSES) - seen))
    raise ConfigError(f"synthetic scene {scene_index} did not show all 10 classes in {config.max_scene_attempts} "
                      f"attempts; raise objects_per_scene, samples_per_scene or visibility_range")


@dataclass
class SceneResult:
    """One generated scene: its table records (a `DatasetTables` holding this scene only), how many sweeps,
    key-frame points (rows) and key-frame returns it wrote, and the detection classes it annotates."""

    scene_index: int
    tables: DatasetTables
    sweeps: int
    key_frame_points: int
    key_frame_returns: int
    classes: set[str]


def resolve_workers(workers: int | None, num_scenes: int) -> int:
    """Processes to generate with: `workers`, or one per CPU; never more than the scenes, at least 1."""
    wanted = workers if workers is not None else (os.cpu_count() or 1)
    return max(1, min(wanted, num_scenes))


def _new_tables(config: SyntheticConfig) -> DatasetTables:
    return DatasetTables(config.seed, extra_categories=tuple(OTHER_KINDS) if config.world == 2 else (),
                         cars=NUM_CARS if config.world == 2 else 1)


def generate_scene(out_dir: Path, config: SyntheticConfig, scene_index: int, name: str) -> SceneResult:
    """Simulates scene `scene_index` and writes its files (LiDAR, cameras, masks) under out_dir; returns its
    records. Depends only on the config and the scene index."""
    settings = sensor_settings(config)
    cameras = CameraRig()
    tables = _new_tables(config)
    counts = {"sweeps": 0, "key_frame_points": 0, "key_frame_returns": 0}
    classes: set[str] = set()
    plan = plan_scene(config, scene_index)
    scene = plan.scene

    def rotation_at(timestamp: int) -> np.ndarray | None:
        """The ego's full rotation with terrain (pitch and roll); None on flat ground (the yaw alone)."""
        return ego_pose(scene, timestamp)[2] if scene.terrain is not None else None
    log_name = f"synthetic-seed{config.seed}-{scene_index:04d}"
    tables.scene_car[scene_index] = scene.car
    tables.add_scene(scene_index, name, log_name, f"Synthetic drive at {scene.path.speed:.1f} m/s, "
                     f"{len(scene.objects)} objects, draw {plan.attempt}")
    for key_index, key_time in enumerate(scene.key_frame_times_us):
        sample_token = tables.add_sample(scene_index, key_index, key_time)
        for sweep_time in scene.sweep_times_us(key_index):
            frame = simulate_lidar(scene, sweep_time, settings, count_points=False)
            filename = f"sweeps/{LIDAR_CHANNEL}/{log_name}__{LIDAR_CHANNEL}__{sweep_time}.pcd.bin"
            _write_points(out_dir / filename, frame.points)
            ego_xy, heading = scene.ego_pose_2d(sweep_time)
            tables.add_sample_data(scene_index, LIDAR_CHANNEL, sample_token, sweep_time, False, filename,
                                   ego_xy, heading, rotation_at(sweep_time))
            counts["sweeps"] += 1
        key_frame = plan.key_frames[key_index]
        ego_xy, heading = scene.ego_pose_2d(key_time)
        filename = f"samples/{LIDAR_CHANNEL}/{log_name}__{LIDAR_CHANNEL}__{key_time}.pcd.bin"
        _write_points(out_dir / filename, key_frame.points)
        counts["key_frame_points"] += len(key_frame.points)
        counts["key_frame_returns"] += int(lidar_returns(key_frame.points).sum())
        tables.add_sample_data(scene_index, LIDAR_CHANNEL, sample_token, key_time, True, filename, ego_xy, heading,
                               rotation_at(key_time))
        camera_frame = cameras.render(scene, key_time, settings, with_owners=config.instance_masks)
        image_filenames = []
        for channel, image, time_us in zip(CAMERA_CHANNELS, camera_frame.images, camera_times(scene, key_time)):
            filename = f"samples/{channel}/{log_name}__{channel}__{time_us}.jpg"
            image_filenames.append(filename)
            save_jpeg(image, out_dir / filename)
            camera_xy, camera_heading = scene.ego_pose_2d(time_us)
            tables.add_sample_data(scene_index, channel, sample_token, time_us, True, filename, camera_xy,
                                   camera_heading, rotation_at(time_us))
        if config.instance_masks:
            write_key_frame_masks(out_dir, scene, camera_frame, image_filenames, camera_times(scene, key_time),
                                  config.seed, config.mask_errors)
        assert np.array_equal(camera_frame.visible, key_frame.visible)
        boxes = scene.boxes_at(key_time)
        boxes[:, 2] -= ego_height(scene, key_time)  # in the frame of the key frame's ego pose, written at z = 0
        for slot, object_index in enumerate(key_frame.visible):
            if key_frame.num_points[slot] == 0:
                continue
            obj = scene.objects[object_index]
            tables.add_annotation(scene_index, int(object_index), obj.category_name, sample_token, key_index,
                                  boxes[object_index], obj.attribute_at(float(scene.seconds(key_time))),
                                  int(key_frame.num_points[slot]),
                                  float(camera_frame.visible_fraction[slot]))
            if not obj.category:
                classes.add(obj.class_name)
    return SceneResult(scene_index, tables, counts["sweeps"], counts["key_frame_points"], counts["key_frame_returns"],
                       classes)


def _scene_job(args: tuple[Path, SyntheticConfig, int, str]) -> SceneResult:
    return generate_scene(*args)


def _run_scenes(out_dir: Path, config: SyntheticConfig, names: list[str], workers: int, bar) -> list[SceneResult]:
    """Every scene's result in scene order, from `workers` processes (1: in this process)."""
    jobs = [(out_dir, config, k, names[k]) for k in range(config.num_scenes)]
    if workers == 1:
        results = []
        for job in jobs:
            results.append(_scene_job(job))
            bar.update(config.samples_per_scene)
        return results
    # fork: the workers inherit the loaded modules; each returns its scene's records, merged here in order
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_scene_job, job) for job in jobs]
        for future in as_completed(futures):
            future.result()
            bar.update(config.samples_per_scene)
        return [future.result() for future in futures]


def prepare_dataroot(out_dir: Path, version: str, overwrite: bool) -> None:
    """Refuses a non-empty folder that is not a previous synthetic dataroot (unless overwrite); clears the paths
    this generator writes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file, expected a folder for the synthetic dataroot; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    previous: dict = {}
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
    is_ours = previous.get("generator") == GENERATOR_ID
    if any(out_dir.iterdir()) and not is_ours and not overwrite:
        raise DataError(f"{out_dir} is not empty and holds no synthetic dataroot ({MANIFEST_NAME} missing); "
                        f"choose an empty folder or pass --overwrite")
    stale = [SUMMARY_NAME, "samples", "sweeps", "maps", MASK_FOLDER, TRUTH_FOLDER, version, f".{version}.partial",
             MANIFEST_NAME]
    if is_ours and isinstance(previous.get("config", {}).get("version"), str):
        stale.append(previous["config"]["version"])
    for name in stale:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _write_points(path: Path, points: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.ascontiguousarray(points, dtype="<f4").tofile(path)


def _write_map(path: Path) -> None:
    """A small grayscale map mask (the devkit reads it lazily; 0.1 m per pixel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:128, 0:128]
    Image.fromarray(np.where((xx // 16 + yy // 16) % 2 == 0, 255, 200).astype(np.uint8), mode="L").save(path)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def generate_dataset(out_dir: Path | str, config: SyntheticConfig, progress: bool = True,
                     overwrite: bool = False, workers: int | None = None) -> dict:
    """Writes the dataroot and returns a summary: scenes, samples, sweeps, annotations, seconds, bytes, ...

    Scenes are generated by `workers` processes (default: one per CPU, at most one per scene); every scene draws
    from its own random streams and the tables are assembled in scene order, so the bytes do not depend on it."""
    started = time.perf_counter()
    check_config(config)
    out_dir = Path(out_dir)
    prepare_dataroot(out_dir, config.version, overwrite)
    manifest = {"generator": GENERATOR_ID, "complete": False, "config": asdict(config)}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    tables = _new_tables(config)
    first_val = config.num_scenes - config.val_scenes
    official = official_mini_scenes() if is_official_mini(config) else None
    scene_names = [(official[0] + official[1])[k] if official else f"scene-{k:04d}" for k in range(config.num_scenes)]
    bar = tqdm(total=config.num_scenes * config.samples_per_scene, desc="synthetic key frames", unit="sample",
               disable=not progress)
    results = _run_scenes(out_dir, config, scene_names, resolve_workers(workers, config.num_scenes), bar)
    bar.close()
    counts = {"sweeps": 0, "key_frame_points": 0, "key_frame_returns": 0}
    val_classes: set[str] = set()
    for result in results:  # in scene order, whatever order the scenes finished in
        tables.extend(result.tables)
        counts["sweeps"] += result.sweeps
        counts["key_frame_points"] += result.key_frame_points
        counts["key_frame_returns"] += result.key_frame_returns
        if result.scene_index >= first_val:
            val_classes |= result.classes

    map_filename = f"maps/{tables.map_token()}.png"
    _write_map(out_dir / map_filename)
    tables.add_map(map_filename)
    tables.link()
    partial = out_dir / f".{config.version}.partial"
    tables.write(partial)
    if official is None:  # the official mini layout uses the devkit's own split lists
        splits = {config.train_split: scene_names[:first_val], config.val_split: scene_names[first_val:]}
        (partial / "splits.json").write_text(json.dumps(splits, indent=1))
    partial.rename(out_dir / config.version)

    summary = {
        "out_dir": str(out_dir), "version": config.version, "scenes": config.num_scenes,
        "train_scenes": first_val, "val_scenes": config.val_scenes,
        "splits": ["mini_train", "mini_val"] if official else [config.train_split, config.val_split],
        "samples": len(tables.tables["sample"]), "sweeps": counts["sweeps"],
        "annotations": len(tables.tables["sample_annotation"]), "instances": len(tables.tables["instance"]),
        "key_frame_points": counts["key_frame_points"], "key_frame_returns": counts["key_frame_returns"],
        "val_classes": [name for name in DETECTION_CLASSES if name in val_classes],
    }
    summary["bytes"] = _folder_bytes(out_dir)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    manifest.update(complete=True, summary=summary)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    logger.info("synthetic dataroot %s: %d scenes, %d samples, %d annotations, %.1f s, %d bytes", out_dir,
                summary["scenes"], summary["samples"], summary["annotations"], summary["seconds"], summary["bytes"])
    return summary

