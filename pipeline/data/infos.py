"""mmdet3d 1.x info files as a second source of the `SplitIndex`.

Users of mmdet3d hold `nuscenes_infos_{train,val}.pkl` (info version 1.1: `create_data.py nuscenes`, i.e.
`nuscenes_converter.create_nuscenes_infos` then `update_infos_to_v2.update_pkl_infos`). Reading them spares
building the devkit's `NuScenes` object (all 13 tables, sample_data.json the largest) and gives the same typed
`SplitIndex` (`index.py`). What the infos hold, per key frame ("info"):

- token, timestamp [s], ego2global (4x4, the key-frame LIDAR_TOP record's ego pose), lidar_points {lidar_path
  (basename of samples/LIDAR_TOP/<name>), lidar2ego}, lidar_sweeps (absent when empty) [{lidar_points {lidar_path
  (the converter's path, ending in sweeps/LIDAR_TOP/<name> or samples/LIDAR_TOP/<name>), lidar2ego},
  ego2global, timestamp [s]}], images {channel: {img_path (basename of samples/<channel>/<name>), cam2img, cam2ego,
  lidar2cam, timestamp [s]}};
- instances [{bbox_3d [x, y, z (gravity centre), l, w, h, yaw] in the key-frame LiDAR frame, bbox_label_3d (index in
  the metainfo's categories, -1 for an ignored category), velocity [vx, vy] in the LiDAR frame, num_lidar_pts,
  num_radar_pts}] in the order of the sample's annotations in sample_annotation.json.

The 4x4 matrices are stored rounded to float32 (about 6e-5 m on a global translation of 1 km), so poses read here
equal the devkit's up to that rounding. Two box fields are defined differently by mmdet3d when the ego is tilted
(pitch or roll): its yaw is pyquaternion's `yaw_pitch_roll[0]` of the box's LiDAR-frame rotation, not the heading
of the box's x axis in the LiDAR xy plane that the devkit path stores; `devkit_yaw` recovers that heading exactly
(see there). Its velocity drops the global vertical velocity vz before rotating into the LiDAR frame, where the
devkit path rotates the full 3-D velocity: the two differ by vz * sin(pitch or roll), which the infos cannot
restore (millimetres per second on nuScenes' nearly level roads).

A camera record's own ego pose is not stored but follows from what is (see `camera_ego_poses`). The key-frame
LIDAR_TOP record's timestamp is taken to be the sample's, as in nuScenes (mmdet3d stores only the sample's).

What the infos lack is read from four small tables when `<dataroot>/<version>/` holds them (sample.json,
scene.json, attribute.json, sample_annotation.json, plus splits.json for a custom split; never sample_data.json and
never the devkit object): the previous key frame of a scene, the split's order (its scene order, then time) and
the annotations' attributes. Without tables (a dataroot of loose key frames) a sample must have no sweeps: it is
then a scene start, its annotations have no attribute, and the samples are in time order.

The info file is pickled; it is read with an unpickler that can only rebuild numpy arrays, dtypes and scalars and
plain Python containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..safe_pickle import ForbiddenGlobal, restricted_load
from .classes import ATTRIBUTE_ID, CLASS_ID, NO_ATTRIBUTE
from .index import FrameTable, SplitIndex
from .loading import split_sample_tokens

logger = logging.getLogger(__name__)

INFO_VERSION = "1.1"
CREATE_COMMAND = ("python tools/create_data.py nuscenes --root-path {dataroot} --out-dir {out} --extra-tag nuscenes "
                  "--version {version}")
UPDATE_COMMAND = ("python tools/dataset_converters/update_infos_to_v2.py --dataset nuscenes --pkl-path {path} "
                  "--out-dir {out}")
# infos file per split: mmdet3d writes one train and one val file per version
_SPLIT_FILES = {"train": "train", "mini_train": "train", "val": "val", "mini_val": "val", "test": "test"}
_TABLES = ("sample", "scene", "attribute", "sample_annotation")


# ---------------------------------------------------------------------------------------------- the file
def infos_file(infos_dir: str | Path, split: str) -> Path:
    """The infos pkl of `split` in `infos_dir`: train/mini_train -> nuscenes_infos_train.pkl, val/mini_val ->
    nuscenes_infos_val.pkl, test -> nuscenes_infos_test.pkl; any other split name -> nuscenes_infos_<split>.pkl.
    A missing file is a DataError naming it and the mmdet3d command that writes it."""
    path = Path(infos_dir) / f"nuscenes_infos_{_SPLIT_FILES.get(split, split)}.pkl"
    if not path.is_file():
        version = "v1.0-mini" if split.startswith("mini") else "v1.0-test" if split == "test" else "v1.0-trainval"
        command = CREATE_COMMAND.format(dataroot="<dataroot>", out=infos_dir, version=version)
        raise DataError(f"{path}: mmdet3d infos of split {split!r} not found; mmdet3d 1.x writes them with "
                        f"`{command}` (run in the mmdet3d source tree), or omit --infos to build the index from "
                        f"the dataroot's tables")
    return path


@contextlib.contextmanager
def _no_garbage_collection():
    """The cyclic garbage collector off while millions of small containers are built: it would rescan them all
    again and again (unpickling trainval infos: about 5x slower with it on); nothing built here forms a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_infos(path: str | Path) -> tuple[dict, list[dict]]:
    """(metainfo, data_list) of an mmdet3d 1.x info file (info version 1.1), read with the restricted unpickler.

    Anything else (a pre-1.x file with "infos"/"metadata", another info version, not a pickle) is a `DataError`
    saying how to convert it.
    """
    path = Path(path)
    try:
        with path.open("rb") as f, _no_garbage_collection():
            content = restricted_load(f)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: mmdet3d info file not found; pass the file written by mmdet3d's "
                        f"`tools/create_data.py nuscenes`") from exc
    except ForbiddenGlobal as exc:
        raise DataError(f"{path}: refused ({exc} in an info file); an info file holds only numpy arrays and plain "
                        f"Python values, regenerate it with mmdet3d's tools/create_data.py nuscenes") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a pickle file ({type(exc).__name__}: {exc}); pass an mmdet3d info file "
                        f"(nuscenes_infos_<split>.pkl)") from exc
    if isinstance(content, dict) and "infos" in content and "metadata" in content:
        command = UPDATE_COMMAND.format(path=path, out="<out_dir>")
        raise DataError(f"{path}: a pre-1.x mmdet3d info file ('infos' and 'metadata'), expected info version "
                        f"{INFO_VERSION} ('metainfo' and 'data_list'); convert it with `{command}` in the mmdet3d "
                        f"1.x source tree, or rewrite it with mmdet3d 1.x's tools/create_data.py nuscenes")
    if not isinstance(content, dict) or not isinstance(content.get("metainfo"), dict) \
            or not isinstance(content.get("data_list"), list):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DataError(f"{path}: expected an mmdet3d info file {{'metainfo': {{...}}, 'data_list': [...]}}, found "
                        f"{found}; write it with mmdet3d 1.x's tools/create_data.py nuscenes")
    metainfo = content["metainfo"]
    found = metainfo.get("info_version")
    if str(found) != INFO_VERSION:
        command = UPDATE_COMMAND.format(path=path, out="<out_dir>")
        raise DataError(f"{path}: metainfo.info_version is {found!r}, expected {INFO_VERSION!r} (mmdet3d 1.x); "
                        f"regenerate it with mmdet3d 1.x's tools/create_data.py nuscenes, or convert an older "
                        f"file with `{command}`")
    if not isinstance(metainfo.get("categories"), dict):
        raise DataError(f"{path}: metainfo.categories missing, expected {{class name: label}}; regenerate the file "
                        f"with mmdet3d 1.x's tools/create_data.py nuscenes")
    return metainfo, content["data_list"]


# ------------------------------------------------------------------------------------------------ geometry
def _inverse(t: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms (..., 4, 4)."""
    rotation_t = np.swapaxes(t[..., :3, :3], -1, -2)
    out = np.zeros_like(t)
    out[..., :3, :3] = rotation_t
    out[..., :3, 3] = -(rotation_t @ t[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def camera_ego_poses(ego_to_global_key: np.ndarray, lidar_to_ego: np.ndarray, lidar_to_camera: np.ndarray,
                     camera_to_ego: np.ndarray) -> np.ndarray:
    """Ego-to-global transform at each camera record's own timestamp, (..., 4, 4) from (..., 4, 4) inputs.

    The converter stores lidar_to_camera = inverse(camera_to_lidar), with the camera record's points carried
    camera -> ego(t_camera) -> global -> ego(t_key) -> key LiDAR:

        camera_to_lidar = inv(lidar_to_ego) @ inv(ego_to_global_key) @ ego_to_global_camera @ camera_to_ego

    so, solving for the one unknown,

        ego_to_global_camera = ego_to_global_key @ lidar_to_ego @ inv(lidar_to_camera) @ inv(camera_to_ego).
    """
    return ego_to_global_key @ lidar_to_ego @ _inverse(lidar_to_camera) @ _inverse(camera_to_ego)


def poses_from_matrices(t: np.ndarray) -> np.ndarray:
    """Rigid transforms (..., 4, 4) -> (..., 7) w, x, y, z, tx, ty, tz with a unit quaternion, w >= 0.

    Each quaternion comes from the largest of its four squared components (Shepperd's method), so a rotation near
    180 degrees is as exact as one near 0.
    """
    r = np.asarray(t, dtype=np.float64)[..., :3, :3]
    r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    # 4 * the square of w, x, y, z
    squares = np.stack([1 + r00 + r11 + r22, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22], -1)
    # candidate k is 4 * component_k * (w, x, y, z)
    candidates = np.stack([
        np.stack([squares[..., 0], r21 - r12, r02 - r20, r10 - r01], -1),
        np.stack([r21 - r12, squares[..., 1], r01 + r10, r02 + r20], -1),
        np.stack([r02 - r20, r01 + r10, squares[..., 2], r12 + r21], -1),
        np.stack([r10 - r01, r02 + r20, r12 + r21, squares[..., 3]], -1),
    ], -2)  # (..., 4, 4)
    best = np.argmax(squares, axis=-1)[..., None, None]
    q = np.take_along_axis(candidates, np.broadcast_to(best, (*best.shape[:-2], 1, 4)), axis=-2)[..., 0, :]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q *= np.where(q[..., :1] < 0, -1.0, 1.0)
    return np.concatenate([q, np.asarray(t, dtype=np.float64)[..., :3, 3]], axis=-1)


def devkit_yaw(mmdet3d_yaw: np.ndarray, lidar_from_global: np.ndarray) -> np.ndarray:
    """(K,) headings in the key-frame LiDAR frame, as the devkit path measures them, from mmdet3d's yaws (K,) and
    each box's key-frame lidar_from_global transform ((4, 4) or (K, 4, 4)).

    mmdet3d stores pyquaternion's yaw of the box's LiDAR-frame quaternion (w, x, y, z),
    atan2(2 (w z - x y), 1 - 2 (y^2 + z^2)); the devkit path stores the heading of the box's x axis,
    atan2(R[1, 0], R[0, 0]) = atan2(2 (w z + x y), 1 - 2 (y^2 + z^2)). They differ by a term of second order in the
    ego's pitch and roll (about 1e-3 rad at 2 degrees). nuScenes annotations rotate about the global z axis only,
    so the box's LiDAR-frame rotation is lidar_from_global @ Rz(theta) for one global yaw theta: pyquaternion's yaw
    is solved for theta by fixed-point iteration (its derivative in theta is 1 up to that second order, so a few
    steps reach float64 precision), then the heading is measured.
    """
    target = np.asarray(mmdet3d_yaw, dtype=np.float64).reshape(-1)
    transforms = np.broadcast_to(np.asarray(lidar_from_global, dtype=np.float64), (target.size, 4, 4))
    a, b, c, d = poses_from_matrices(transforms)[:, :4].T  # (K,) each

    def pyquaternion_yaw(theta: np.ndarray) -> np.ndarray:
        # (a, b, c, d) (x) (cos(theta / 2), 0, 0, sin(theta / 2)), Hamilton product
        cos, sin = np.cos(theta / 2), np.sin(theta / 2)
        w, x, y, z = a * cos - d * sin, b * cos + c * sin, c * cos - b * sin, d * cos + a * sin
        return np.arctan2(2 * (w * z - x * y), 1 - 2 * (y * y + z * z))

    theta = target - pyquaternion_yaw(np.zeros_like(target))
    for _ in range(50):
        step = (target - pyquaternion_yaw(theta) + np.pi) % (2 * np.pi) - np.pi
        theta = theta + step
        if not np.any(np.abs(step) > 1e-14):
            break
    # the box x axes in the LiDAR frame, (K, 3)
    axis = transforms[:, :3, 0] * np.cos(theta)[:, None] + transforms[:, :3, 1] * np.sin(theta)[:, None]
    return np.arctan2(axis[:, 1], axis[:, 0])


# -------------------------------------------------------------------------------------------------- tables
@dataclass
class _Tables:
    """The few tables read beside the infos; `dataroot`, `version`, `scene` and `sample` are what the split helpers
    of `loading.py` read of a devkit object."""

    dataroot: str
    version: str
    scene: list[dict]
    sample: list[dict]
    attributes: dict[str, list[int]]  # sample token -> attribute id of each annotation, in file order


def _load_table(path: Path, object_hook=None) -> list:
    try:
        with path.open(encoding="utf-8") as f:
            records = json.load(f, object_hook=object_hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-extract or regenerate this table") from exc
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}; re-extract or "
                        f"regenerate this table")
    return records


def _read_tables(dataroot: Path, version: str) -> _Tables | None:
    """The four tables of `<dataroot>/<version>/`, or None when the folder holds none of them."""
    table_root = dataroot / version
    present = [name for name in _TABLES if (table_root / f"{name}.json").is_file()]
    if not present:
        return None
    if len(present) < len(_TABLES):
        missing = [f"{name}.json" for name in _TABLES if name not in present]
        raise DataError(f"{table_root}: holds {', '.join(f'{n}.json' for n in present)} but not "
                        f"{', '.join(missing)}; the infos need all of {', '.join(f'{n}.json' for n in _TABLES)} "
                        f"(or none, for a dataroot of loose key frames without sweeps)")
    try:
        ids = {record["token"]: ATTRIBUTE_ID.get(record["name"], NO_ATTRIBUTE)
               for record in _load_table(table_root / "attribute.json")}
        samples = [{key: record[key] for key in ("token", "timestamp", "scene_token", "prev")}
                   for record in _load_table(table_root / "sample.json")]
        scenes = [{"token": record["token"], "name": record["name"]}
                  for record in _load_table(table_root / "scene.json")]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{table_root}: a record of attribute.json, sample.json or scene.json lacks field {exc}; "
                        f"re-extract or regenerate the tables") from exc

    def annotation(record: dict) -> tuple[str | None, int]:
        # called for every JSON object of sample_annotation.json (its records): keep only what is needed
        tokens = record.get("attribute_tokens")
        return record.get("sample_token"), ids.get(tokens[0], NO_ATTRIBUTE) if tokens else NO_ATTRIBUTE

    attributes: dict[str, list[int]] = {}
    for sample_token, attribute in _load_table(table_root / "sample_annotation.json", annotation):
        attributes.setdefault(sample_token, []).append(attribute)
    return _Tables(str(dataroot), version, scenes, samples, attributes)


# ------------------------------------------------------------------------------------------------- parsing
def _refuse_adjacent(adjacent_count: int) -> None:
    if adjacent_count > 0:
        raise DataError(f"adjacent_count {adjacent_count}: the 4D students' adjacent camera frames are camera sweeps, "
                        f"which mmdet3d's nuScenes infos do not hold; build the index from the dataroot's tables "
                        f"(omit --infos) for a 4D student")


def _transforms(values: list, owners: list[int], tokens: list[str], path: Path, what: str) -> np.ndarray:
    """(M, 4, 4) float64 from M nested lists; owners[m] is the position in `tokens` of the sample value m is of."""
    if not values:
        return np.zeros((0, 4, 4))
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        array = None
    if array is None or array.shape != (len(values), 4, 4):
        bad = next((m for m, value in enumerate(values) if not _is_transform(value)), 0)
        text = repr(values[bad])
        raise DataError(f"{path}: sample {tokens[owners[bad]]}: {what} is {text[:80]}, expected a 4x4 transform; "
                        f"regenerate the file with mmdet3d 1.x's tools/create_data.py nuscenes")
    return array


def _intrinsics(values: list, owners: list[int], tokens: list[str], path: Path) -> np.ndarray:
    """(M, 3, 3) float64 camera matrices from M cam2img values (3x3, or 3x4 / 4x4 with the 3x3 top left)."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        array = None
    if array is not None and array.ndim == 3 and array.shape[0] == len(values) and array.shape[1:] in \
            ((3, 3), (3, 4), (4, 4)):
        return array[:, :3, :3].copy()
    out = np.zeros((len(values), 3, 3))
    for m, value in enumerate(values):
        try:
            matrix = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            matrix = np.zeros(0)
        if matrix.shape not in ((3, 3), (3, 4), (4, 4)):
            raise DataError(f"{path}: sample {tokens[owners[m]]}: an image's cam2img is {repr(value)[:80]}, "
                            f"expected a 3x3 camera matrix; regenerate the file with mmdet3d 1.x's "
                            f"tools/create_data.py nuscenes")
        out[m] = matrix[:3, :3]
    return out


def _is_transform(value) -> bool:
    try:
        return np.asarray(value, dtype=np.float64).shape == (4, 4)
    except (ValueError, TypeError):
        return False


def _microseconds(seconds: list, path: Path, what: str) -> np.ndarray:
    """mmdet3d's timestamps [s] -> int64 [us], exact (float64 holds 1.5e9 s to 0.24 us, inside the rounding)."""
    try:
        return np.rint(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: a {what} is not a number of seconds ({exc}); regenerate the file with mmdet3d "
                        f"1.x's tools/create_data.py nuscenes") from exc


def _record_path(value, folder: str | None = None) -> str:
    """A file's path relative to the dataroot: <folder>/<basename> (mmdet3d keeps only the basename of key-frame
    files), or for a sweep the converter's own path (relative to its working directory or absolute) from its
    samples/ or sweeps/ part on; "" if it has neither."""
    parts = str(value).replace("\\", "/").rsplit("/", 3)
    if folder is not None:
        return f"{folder}/{parts[-1]}"
    return "/".join(parts[-3:]) if len(parts) >= 3 and parts[-3] in ("samples", "sweeps") else ""


@dataclass
class _Records:
    """What the infos hold of the split's samples, gathered flat before the arrays are built: per key frame (N),
    per sweep kept (S, with its sample and slot), per camera record (N * C, row-major)."""

    timestamps: list = field(default_factory=list)
    key_files: list = field(default_factory=list)
    key_poses: list = field(default_factory=list)
    key_calibrations: list = field(default_factory=list)
    sweep_owner: list = field(default_factory=list)
    sweep_slot: list = field(default_factory=list)
    sweep_files: list = field(default_factory=list)
    sweep_times: list = field(default_factory=list)
    sweep_poses: list = field(default_factory=list)
    sweep_calibrations: list = field(default_factory=list)
    camera_files: list = field(default_factory=list)
    camera_times: list = field(default_factory=list)
    camera_calibrations: list = field(default_factory=list)
    camera_intrinsics: list = field(default_factory=list)
    lidar_to_cameras: list = field(default_factory=list)
    box_owner: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    velocities: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    attributes: list = field(default_factory=list)
    offsets: list = field(default_factory=lambda: [0])


def _gather(info: dict, i: int, records: _Records, sweep_candidates: int, camera_channels: tuple[str, ...],
            label_names: dict[int, str], attributes: list[int] | None, path: Path, table: Path | None) -> None:
    """Append sample i's records; `attributes`: its annotations' attribute ids from the tables, None without."""
    token = info["token"]
    records.timestamps.append(info["timestamp"])
    records.key_poses.append(info["ego2global"])
    lidar = info["lidar_points"]
    records.key_calibrations.append(lidar["lidar2ego"])
    records.key_files.append(_record_path(lidar["lidar_path"], "samples/LIDAR_TOP"))
    for j, sweep in enumerate((info.get("lidar_sweeps") or [])[:sweep_candidates]):
        name = _record_path(sweep["lidar_points"]["lidar_path"])
        if not name:
            raise DataError(f"{path}: sample {token} has a LiDAR sweep at {sweep['lidar_points']['lidar_path']!r}, "
                            f"expected a path ending in sweeps/LIDAR_TOP/<name> or samples/LIDAR_TOP/<name>")
        records.sweep_owner.append(i)
        records.sweep_slot.append(j)
        records.sweep_files.append(name)
        records.sweep_times.append(sweep["timestamp"])
        records.sweep_poses.append(sweep["ego2global"])
        records.sweep_calibrations.append(sweep["lidar_points"]["lidar2ego"])
    images = info.get("images") or {}
    for channel in camera_channels:
        if channel not in images:
            raise DataError(f"{path}: sample {token} has no image of {channel} (images: {sorted(images)}); every "
                            f"sample needs the configured cameras (data.camera_channels)")
        camera = images[channel]
        records.camera_files.append(_record_path(camera["img_path"], f"samples/{channel}"))
        records.camera_times.append(camera["timestamp"])
        records.camera_calibrations.append(camera["cam2ego"])
        records.camera_intrinsics.append(camera["cam2img"])
        records.lidar_to_cameras.append(camera["lidar2cam"])
    instances = info.get("instances") or []
    if attributes is None:
        attributes = [NO_ATTRIBUTE] * len(instances)
    elif len(attributes) != len(instances):
        raise DataError(f"{path}: sample {token} has {len(instances)} instances, {table} has {len(attributes)} "
                        f"annotations of it; the infos and the tables are of different datasets: rewrite the infos "
                        f"from this dataroot or omit --infos")
    for instance, attribute in zip(instances, attributes):
        # the devkit's detection filter: the 10 classes, at least one LiDAR or radar point
        name = label_names.get(int(instance["bbox_label_3d"]))
        if name not in CLASS_ID or int(instance["num_lidar_pts"]) + int(instance["num_radar_pts"]) == 0:
            continue
        records.box_owner.append(i)
        records.boxes.append(list(instance["bbox_3d"])[:7])
        records.velocities.append(list(instance.get("velocity", (0.0, 0.0)))[:2])
        records.labels.append(CLASS_ID[name])
        records.attributes.append(attribute)
    records.offsets.append(len(records.labels))


def _split_order(path: Path, dataroot: Path, version: str, split: str, by_token: dict[str, dict],
                 tables: _Tables | None) -> tuple[list[str], list[int], list[bool]]:
    """(tokens in split order, previous key frame positions, whether each sample follows another key frame)."""
    if tables is None:
        tokens = [token for _, token in sorted(zip(_microseconds([info["timestamp"] for info in by_token.values()],
                                                                 path, "timestamp").tolist(), by_token))]
        with_sweeps = [t for t in tokens if by_token[t].get("lidar_sweeps")]
        if with_sweeps:
            raise DataError(f"{path}: sample {with_sweeps[0]} has LiDAR sweeps but {dataroot / version} holds no "
                            f"tables: without sample.json the previous key frame of a scene is unknown; put "
                            f"{', '.join(f'{n}.json' for n in _TABLES)} of {version} in that folder")
        return tokens, [-1] * len(tokens), [False] * len(tokens)
    tokens = split_sample_tokens(tables, split)
    missing = [t for t in tokens if t not in by_token]
    extra = set(by_token).difference(tokens)
    if missing or extra:
        example = missing[0] if missing else sorted(extra)[0]
        raise DataError(f"{path}: the infos hold {len(by_token)} samples, split {split!r} of {dataroot / version} "
                        f"has {len(tokens)}; {len(missing)} of the split's samples are missing and {len(extra)} "
                        f"others present (e.g. {example}); pass the infos of split {split!r} or omit --infos")
    position = {token: i for i, token in enumerate(tokens)}
    prev = {record["token"]: record["prev"] for record in tables.sample}
    return tokens, [position.get(prev[t], -1) if prev[t] else -1 for t in tokens], [bool(prev[t]) for t in tokens]


def _check_sweep_candidates(path: Path, tokens: list[str], by_token: dict[str, dict], follows: list[bool],
                            sweep_candidates: int) -> None:
    """The infos hold the converter's `max_sweeps` nearest sweeps: more candidates than that cannot be read."""
    longest = max((len(by_token[t].get("lidar_sweeps") or ()) for t in tokens), default=0)
    if sweep_candidates <= longest:
        return
    if longest > 0:
        raise DataError(f"{path}: the infos hold at most {longest} LiDAR sweeps per sample (the converter's "
                        f"max_sweeps), sweep_candidates is {sweep_candidates}; a longer sweep chain is not in the "
                        f"infos: set data.sweep_candidates <= {longest}, rewrite the infos with a larger max_sweeps, "
                        f"or omit --infos")
    if any(follows):
        raise DataError(f"{path}: the infos hold no LiDAR sweeps, yet sample {tokens[follows.index(True)]} follows "
                        f"another key frame (the infos were written with max_sweeps=0?); set data.sweep_candidates "
                        f"to 0, rewrite the infos with max_sweeps >= {sweep_candidates}, or omit --infos")


def _files(names: list[str], shape: tuple[int, ...]) -> np.ndarray:
    longest = max((len(name) for name in names), default=1)
    return np.array([name.encode() for name in names], dtype=f"S{max(longest, 1)}").reshape(shape)


def _calibration_rows(sensor_to_ego: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deduplicate (M, 4, 4) calibrations with their (M, 3, 3) intrinsics by value, first seen first ->
    (row of each (M,), distinct calibrations (K, 7), distinct intrinsics (K, 3, 3))."""
    values = np.concatenate([sensor_to_ego.reshape(-1, 16), intrinsics.reshape(-1, 9)], axis=1)
    if values.shape[0] == 0:
        return np.zeros(0, dtype=np.int32), np.zeros((0, 7)), np.zeros((0, 3, 3))
    _, first, inverse = np.unique(values, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # distinct values in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    distinct = first[order]
    return rank[inverse.reshape(-1)].astype(np.int32), poses_from_matrices(sensor_to_ego[distinct]), \
        intrinsics[distinct]


def index_from_infos(infos_path: str | Path, dataroot: str | Path, version: str, split: str, sweep_candidates: int,
                     camera_channels: tuple[str, ...] = (), adjacent_count: int = 0, adjacent_interval: int = 1,
                     progress: bool = True) -> SplitIndex:
    """Read an mmdet3d 1.x info file of `split` into a `SplitIndex` equal to `build_split_index`'s (module doc).

    With the tables in `<dataroot>/<version>/`, the infos must hold exactly the split's samples and each sample's
    instances must match its annotations in sample_annotation.json one for one. Sweeps: the infos hold the
    converter's `max_sweeps` nearest, so `sweep_candidates` above the longest sweep list is refused. Adjacent frames
    (`adjacent_count` > 0) are not in the infos and are refused.
    """
    _refuse_adjacent(adjacent_count)
    if adjacent_interval < 1:
        raise ValueError(f"adjacent_interval must be >= 1, found {adjacent_interval}")
    with _no_garbage_collection():
        return _index_from_infos(Path(infos_path), Path(dataroot), version, split, sweep_candidates,
                                 tuple(camera_channels), adjacent_interval, progress)


def _index_from_infos(path: Path, dataroot: Path, version: str, split: str, sweep_candidates: int,
                      camera_channels: tuple[str, ...], adjacent_interval: int, progress: bool) -> SplitIndex:
    from tqdm import tqdm

    # the tables first: their JSON text is freed before the infos' many small objects exist (a lower peak)
    tables = _read_tables(dataroot, version)
    metainfo, data_list = read_infos(path)
    if metainfo.get("version") is not None and str(metainfo["version"]) != version:
        raise DataError(f"{path}: infos written for version {metainfo['version']!r}, expected {version!r}; pass the "
                        f"infos of {version} or --version {metainfo['version']}")
    label_names = {int(label): str(name) for name, label in metainfo["categories"].items() if int(label) >= 0}
    by_token = {}
    for position, info in enumerate(data_list):
        if not isinstance(info, dict) or "token" not in info or "timestamp" not in info:
            raise DataError(f"{path}: data_list[{position}] is not a sample info with a token and a timestamp; "
                            f"regenerate the file with mmdet3d 1.x's tools/create_data.py nuscenes")
        by_token[str(info["token"])] = info
    if not by_token:
        raise DataError(f"{path}: the infos hold no samples; regenerate the file with mmdet3d 1.x's "
                        f"tools/create_data.py nuscenes")
    tokens, previous, follows = _split_order(path, dataroot, version, split, by_token, tables)
    _check_sweep_candidates(path, tokens, by_token, follows, sweep_candidates)

    records = _Records()
    table = dataroot / version / "sample_annotation.json"
    for i, token in enumerate(tqdm(tokens, desc=f"infos {split}", unit="sample", disable=not progress, delay=2.0,
                                   leave=False)):
        try:
            _gather(by_token[token], i, records, sweep_candidates, camera_channels, label_names,
                    None if tables is None else tables.attributes.get(token, []), path, table)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise DataError(f"{path}: sample {token}: field {exc} missing or malformed ({type(exc).__name__}); "
                            f"expected an mmdet3d 1.x nuScenes info, regenerate the file with tools/create_data.py "
                            f"nuscenes") from exc
    index = _assemble(records, tokens, previous, path, dataroot, version, split, sweep_candidates, camera_channels,
                      adjacent_interval)
    logger.info("%s: split %s, %d samples, %d annotations, %d sweep candidates, %d cameras", path, split, len(index),
                index.labels.size, sweep_candidates, len(camera_channels))
    return index


def _assemble(records: _Records, tokens: list[str], previous: list[int], path: Path, dataroot: Path, version: str,
              split: str, sweep_candidates: int, camera_channels: tuple[str, ...],
              adjacent_interval: int) -> SplitIndex:
    """The gathered records as the index's arrays (all conversions vectorised)."""
    count, num_cameras = len(tokens), len(camera_channels)
    camera_owner = [k // max(num_cameras, 1) for k in range(count * num_cameras)]
    ego_to_global = _transforms(records.key_poses, list(range(count)), tokens, path, "ego2global")  # (N, 4, 4)
    lidar_to_ego = _transforms(records.key_calibrations, list(range(count)), tokens, path, "lidar2ego")
    sweep_poses = _transforms(records.sweep_poses, records.sweep_owner, tokens, path, "a sweep's ego2global")
    sweep_to_ego = _transforms(records.sweep_calibrations, records.sweep_owner, tokens, path,
                               "a sweep's lidar2ego")
    camera_to_ego = _transforms(records.camera_calibrations, camera_owner, tokens, path, "an image's cam2ego")
    lidar_to_camera = _transforms(records.lidar_to_cameras, camera_owner, tokens, path, "an image's lidar2cam")
    intrinsics = _intrinsics(records.camera_intrinsics, camera_owner, tokens, path)

    # one calibration table, rows first seen first in the devkit path's order: sweeps, key frames, cameras
    rows, calibrations, calibration_intrinsics = _calibration_rows(
        np.concatenate([sweep_to_ego, lidar_to_ego, camera_to_ego]),
        np.concatenate([np.zeros((len(sweep_to_ego) + count, 3, 3)), intrinsics]))
    sweep_rows, key_rows, camera_rows = np.split(rows, [len(sweep_to_ego), len(sweep_to_ego) + count])

    timestamps = _microseconds(records.timestamps, path, "timestamp")
    slots = (np.asarray(records.sweep_owner, dtype=np.int64), np.asarray(records.sweep_slot, dtype=np.int64))
    sweep_files = np.full((count, sweep_candidates), b"", dtype=_files(records.sweep_files, (-1,)).dtype)
    sweep_files[slots] = _files(records.sweep_files, (-1,))
    sweep_times = np.zeros((count, sweep_candidates), dtype=np.int64)
    sweep_times[slots] = _microseconds(records.sweep_times, path, "sweep timestamp")
    sweep_calibration = np.full((count, sweep_candidates), -1, dtype=np.int32)
    sweep_calibration[slots] = sweep_rows
    sweep_ego_pose = np.zeros((count, sweep_candidates, 7))
    sweep_ego_pose[..., 0] = 1.0  # the devkit path's filler where there is no record
    sweep_ego_pose[slots] = poses_from_matrices(sweep_poses)
    camera_poses = camera_ego_poses(np.repeat(ego_to_global, num_cameras, axis=0),
                                    np.repeat(lidar_to_ego, num_cameras, axis=0), lidar_to_camera, camera_to_ego)

    boxes = np.asarray(records.boxes, dtype=np.float64).reshape(-1, 7)
    velocities = np.nan_to_num(np.asarray(records.velocities, dtype=np.float64).reshape(-1, 2), nan=0.0)
    lidar_from_global = _inverse(ego_to_global @ lidar_to_ego)
    boxes[:, 6] = devkit_yaw(boxes[:, 6], lidar_from_global[np.asarray(records.box_owner, dtype=np.int64)])
    longest_token = max((len(t) for t in tokens), default=1)
    return SplitIndex(
        dataroot=str(dataroot), version=str(version), split=split, camera_channels=tuple(camera_channels),
        tokens=np.array([t.encode() for t in tokens], dtype=f"S{longest_token}").reshape(-1),
        timestamps=timestamps.reshape(-1),
        previous=np.asarray(previous, dtype=np.int64).reshape(-1),
        # the key-frame LIDAR_TOP record's timestamp is the sample's (nuScenes; mmdet3d keeps only the sample's)
        lidar=FrameTable(_files(records.key_files, (count,)), timestamps.reshape(-1), key_rows,
                         poses_from_matrices(ego_to_global)),
        sweeps=FrameTable(sweep_files, sweep_times, sweep_calibration, sweep_ego_pose),
        sweep_counts=np.bincount(slots[0], minlength=count).astype(np.int64),
        cameras=FrameTable(_files(records.camera_files, (count, num_cameras)),
                           _microseconds(records.camera_times, path, "image timestamp").reshape(count, num_cameras),
                           camera_rows.reshape(count, num_cameras),
                           poses_from_matrices(camera_poses).reshape(count, num_cameras, 7)),
        adjacent=FrameTable(np.zeros((count, 0, num_cameras), dtype="S1"),
                            np.zeros((count, 0, num_cameras), dtype=np.int64),
                            np.zeros((count, 0, num_cameras), dtype=np.int32), np.zeros((count, 0, num_cameras, 7))),
        adjacent_counts=np.zeros(count, dtype=np.int64), adjacent_interval=int(adjacent_interval),
        reference_camera=camera_channels.index("CAM_FRONT") if "CAM_FRONT" in camera_channels else 0,
        calibrations=calibrations.reshape(-1, 7), intrinsics=calibration_intrinsics.reshape(-1, 3, 3),
        box_offsets=np.asarray(records.offsets, dtype=np.int64),
        boxes=np.concatenate([boxes, velocities], axis=1),
        labels=np.asarray(records.labels, dtype=np.int64).reshape(-1),
        attributes=np.asarray(records.attributes, dtype=np.int64).reshape(-1),
    )
