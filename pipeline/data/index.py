"""`SplitIndex`: everything the loader needs about one split, in a few flat numpy arrays.

The devkit's `NuScenes` object holds every table as Python dicts: several GB for v1.0-trainval, and each forked
DataLoader worker that touches it (reference counts, the garbage collector) copies the pages it touches, so the
resident memory of N workers grows toward N copies. mmdet3d avoids this with serialized info files; distillbev
builds the same content once per process from the devkit and keeps it in numpy arrays, whose buffers a forked
worker reads without copying:

- per sample: token, timestamp, the previous key frame of its scene, the key-frame LIDAR_TOP record, its
  `sweep_candidates` nearest previous sweeps, the configured cameras' records, the 4D students' adjacent-frame
  candidates (below), and the GT annotations already in the key-frame LiDAR frame (centre, size, yaw, velocity,
  label, attribute);
- per sensor record ("frame"): file name relative to the dataroot (fixed-width bytes), timestamp, ego pose
  (w, x, y, z, tx, ty, tz) and an index into a table of distinct calibrations.

Adjacent frames (BEVDet4D's infos, `prepare_nuscenes_for_bevdet4d.py`): walking the reference camera's sample_data
chain backwards (CAM_FRONT, or the first configured camera), candidate a is its record number
(a + 1) * interval - 1 (interval 3 in the reference: 0.25 s apart at 12 Hz), and every other camera contributes its
record nearest in time to that one. Where a dataroot has camera records at key frames only (the synthetic world),
the chain is the previous key frames.

`build_split_index` is the only code that reads the devkit tables for loading; `NuScenesDetectionDataset` reads
only this index. `save` writes it as a folder of raw `.npy` arrays and an `index.json` (no pickle), `load` maps
that folder read-only; `index_store.open_split_index` keeps one such folder per dataroot, split and parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..geometry.transforms import invert_transform, make_transform, quaternion_to_matrix
from .classes import ATTRIBUTE_ID, CLASS_ID, NO_ATTRIBUTE, category_to_class
from .digest import InputDigests
from .loading import lidar_records, read_points, split_sample_tokens
from .virtual_points import FEATURE_WIDTH as MVP_POINT_DIMS
from .virtual_points import mvp_point_features, read_virtual_points, virtual_path

INDEX_FORMAT = 2  # 1: one .npz file; 2: a folder of .npy arrays and index.json
INDEX_HEADER = "index.json"  # an index folder's format, scalars, array shapes and the index store's metadata


@dataclass(frozen=True)
class FrameTable:
    """Sensor records of one kind, any leading shape S (e.g. (N,) key frames, (N, C) cameras, (N, T) sweeps).

    files: S fixed-width bytes, path relative to the dataroot (b"" where there is no record).
    timestamps: S int64 [us]. calibration: S int32 row of `SplitIndex.calibrations` (-1: no record).
    ego_pose: S + (7,) float64 w, x, y, z, tx, ty, tz of the ego pose at the record's own timestamp.
    """

    files: np.ndarray
    timestamps: np.ndarray
    calibration: np.ndarray
    ego_pose: np.ndarray


@dataclass(frozen=True)
class SplitIndex:
    """One split's loader inputs as flat arrays; N samples, T sweep candidates, C cameras, M annotations."""

    dataroot: str
    version: str
    split: str
    camera_channels: tuple[str, ...]
    tokens: np.ndarray  # (N,) bytes sample tokens in split order (scene order, then time)
    timestamps: np.ndarray  # (N,) int64
    previous: np.ndarray  # (N,) int64 position of the scene's previous key frame, -1 at a scene start
    lidar: FrameTable  # (N,) key-frame LIDAR_TOP records
    sweeps: FrameTable  # (N, T) previous LIDAR_TOP sweeps, nearest first
    sweep_counts: np.ndarray  # (N,) int64 sweeps that exist (<= T)
    cameras: FrameTable  # (N, C) key-frame camera records (C = 0 when the index was built without cameras)
    adjacent: FrameTable  # (N, A, C) adjacent-frame candidates' camera records, nearest candidate first
    adjacent_counts: np.ndarray  # (N,) int64 candidates that exist (<= A; 0 at a scene start)
    adjacent_interval: int  # records of the reference camera between candidates
    reference_camera: int  # camera index whose ego pose anchors an adjacent frame
    calibrations: np.ndarray  # (K, 7) float64 sensor w, x, y, z, tx, ty, tz (sensor -> ego)
    intrinsics: np.ndarray  # (K, 3, 3) float64 camera intrinsics (zeros for the LiDAR)
    box_offsets: np.ndarray  # (N + 1,) int64: sample i owns annotation rows box_offsets[i]:box_offsets[i + 1]
    boxes: np.ndarray  # (M, 9) float64 x, y, z, l, w, h, yaw, vx, vy in the key-frame LiDAR frame
    labels: np.ndarray  # (M,) int64 class ids
    attributes: np.ndarray  # (M,) int64 attribute ids, -1 for none

    # ------------------------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def token(self, i: int) -> str:
        return self.tokens[i].decode()

    def path(self, table: FrameTable, *where: int) -> str:
        """Absolute path of one record of `table`."""
        return f"{self.dataroot}/{table.files[where].decode()}"

    def transforms(self, table: FrameTable, *where: int) -> tuple[np.ndarray, np.ndarray]:
        """(sensor_to_ego, ego_to_global) 4x4 float64 of one record of `table`."""
        calibration = self.calibrations[table.calibration[where]]
        pose = table.ego_pose[where]
        return make_transform(calibration[:4], calibration[4:]), make_transform(pose[:4], pose[4:])

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of sample i's GT: boxes (K, 9) float64, labels (K,) int64, attributes (K,) int64."""
        rows = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        return self.boxes[rows].copy(), self.labels[rows].copy(), self.attributes[rows].copy()

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays."""
        return sum(a.nbytes for a in self.arrays().values())

    # ------------------------------------------------------------------------------------------ serialisation
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the index by its file stem: "tokens", "lidar.files", ..."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, FrameTable):
                out.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in fields(FrameTable)})
            elif isinstance(value, np.ndarray):
                out[f.name] = value
        return out

    def save(self, folder: str | Path, metadata: dict | None = None) -> None:
        """Write the index as a folder of raw `.npy` arrays and `index.json`, atomically.

        The arrays go to a temporary sibling folder that is renamed to `folder` once complete, so a reader sees
        no index or a whole one; an existing `folder` is replaced (processes that mapped it keep their pages).
        `metadata` is stored in `index.json` under "metadata" (the index store's parameters and sources).
        Writers of the same `folder` must not run at once (`index_store` holds a lock around this).
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        arrays = self.arrays()
        header = {"format": INDEX_FORMAT, "dataroot": self.dataroot, "version": self.version, "split": self.split,
                  "camera_channels": list(self.camera_channels), "adjacent_interval": int(self.adjacent_interval),
                  "reference_camera": int(self.reference_camera), "build_id": uuid.uuid4().hex,
                  "arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays.items()},
                  "metadata": metadata or {}}
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        old = None
        try:
            for name, array in arrays.items():
                with open(temporary / f"{name}.npy", "wb") as f:
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            with open(temporary / INDEX_HEADER, "w", encoding="utf-8") as f:
                json.dump(header, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if folder.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
                os.replace(folder, old / folder.name)
            os.replace(temporary, folder)
            _fsync_folder(folder.parent)
        except BaseException:
            for leftover in (temporary, old):
                if leftover is not None:
                    shutil.rmtree(leftover, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, folder: str | Path, dataroot: str | None = None, mmap: bool = True) -> "SplitIndex":
        """Map (or, with `mmap=False`, read) an index written by `save`.

        Mapped arrays are read-only `np.memmap`s: every process that loads the same folder shares the page cache
        instead of holding its own copy. `dataroot` replaces the recorded dataroot in the index's paths (the same
        data mounted elsewhere). A folder of another format, or whose arrays do not match `index.json`, is a
        `DataError` naming it.
        """
        folder = Path(folder)
        header = read_index_header(folder)
        values = {"dataroot": str(dataroot) if dataroot is not None else header["dataroot"],
                  "version": header["version"], "split": header["split"],
                  "camera_channels": tuple(header["camera_channels"]),
                  "adjacent_interval": int(header["adjacent_interval"]),
                  "reference_camera": int(header["reference_camera"])}
        arrays = {}
        for name, spec in header["arrays"].items():
            path = folder / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: split index array unreadable ({exc}); delete {folder}, it is rebuilt "
                                f"from the dataroot") from exc
            if array.dtype.str != spec["dtype"] or list(array.shape) != spec["shape"]:
                raise DataError(f"{path}: split index array of {array.dtype.str} {list(array.shape)}, expected "
                                f"{spec['dtype']} {spec['shape']} (index.json); delete {folder}, it is rebuilt "
                                f"from the dataroot")
            arrays[name] = array
        try:
            for f in fields(cls):
                if f.name in values:
                    continue
                if f.name in ("lidar", "sweeps", "cameras", "adjacent"):
                    values[f.name] = FrameTable(**{g.name: arrays[f"{f.name}.{g.name}"] for g in fields(FrameTable)})
                else:
                    values[f.name] = arrays[f.name]
        except KeyError as exc:
            raise DataError(f"{folder / INDEX_HEADER}: the split index lists no array {exc.args[0]!r}; delete "
                            f"{folder}, it is rebuilt from the dataroot") from None
        index = cls(**values)
        if mmap:
            object.__setattr__(index, "_mapped", (str(folder.resolve()), header["build_id"]))
        return index

    def __reduce__(self):
        # A mapped index travels to spawned processes (forkserver DataLoader workers) as its folder, so they map
        # the same pages instead of unpickling a private copy of every array.
        mapped = self.__dict__.get("_mapped")
        if mapped is not None and all(isinstance(a, np.memmap) for a in self.arrays().values()):
            return _remap, (*mapped, self.dataroot)
        return super().__reduce__()


def read_index_header(folder: str | Path) -> dict:
    """The `index.json` of an index folder; a missing or foreign one is a `DataError` naming it."""
    folder = Path(folder)
    if folder.is_file():  # format 1 was one .npz file
        try:
            with np.load(folder, allow_pickle=False) as data:
                found = int(data["format"]) if "format" in data else None
        except (OSError, ValueError):
            found = None
        raise DataError(f"{folder}: split index format {found}, expected {INDEX_FORMAT} (a folder); delete the file, "
                        f"it is rebuilt from the dataroot")
    path = folder / INDEX_HEADER
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: split index header unreadable ({exc}); delete {folder}, it is rebuilt from the "
                        f"dataroot") from exc
    found = header.get("format") if isinstance(header, dict) else None
    if found != INDEX_FORMAT:
        raise DataError(f"{path}: split index format {found}, expected {INDEX_FORMAT}; delete {folder}, it is "
                        f"rebuilt from the dataroot")
    return header


def _remap(folder: str, build_id: str, dataroot: str) -> SplitIndex:
    """Unpickle a mapped index: map its folder again, which must still hold the same build."""
    found = read_index_header(folder).get("build_id")
    if found != build_id:
        raise DataError(f"{folder}: the split index was rebuilt (build {found}, this process mapped {build_id}) "
                        f"because its sources changed while the job ran; restart the job")
    return SplitIndex.load(folder, dataroot=dataroot)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------------------------------- build
class _Calibrations:
    """Distinct calibrated_sensor records -> rows of the calibration table."""

    def __init__(self, nusc) -> None:
        self.nusc = nusc
        self.rows: dict[str, int] = {}
        self.values: list[list[float]] = []
        self.intrinsics: list[np.ndarray] = []

    def row(self, token: str) -> int:
        if token not in self.rows:
            record = self.nusc.get("calibrated_sensor", token)
            self.rows[token] = len(self.values)
            self.values.append([*map(float, record["rotation"]), *map(float, record["translation"])])
            intrinsic = record.get("camera_intrinsic") or np.zeros((3, 3))
            self.intrinsics.append(np.asarray(intrinsic, dtype=np.float64).reshape(3, 3))
        return self.rows[token]


def _frame_table(nusc, records: np.ndarray, calibrations: _Calibrations) -> FrameTable:
    """A FrameTable of the shape of `records`, an object array of sample_data records (None = no record)."""
    shape = records.shape
    flat = records.reshape(-1)
    names = [b""] * flat.size
    timestamps = np.zeros(flat.size, dtype=np.int64)
    calibration = np.full(flat.size, -1, dtype=np.int32)
    ego_pose = np.zeros((flat.size, 7), dtype=np.float64)
    ego_pose[:, 0] = 1.0
    for k, record in enumerate(flat):
        if record is None:
            continue
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        names[k] = record["filename"].encode()
        timestamps[k] = int(record["timestamp"])
        calibration[k] = calibrations.row(record["calibrated_sensor_token"])
        ego_pose[k] = [*map(float, pose["rotation"]), *map(float, pose["translation"])]
    longest = max((len(name) for name in names), default=1)
    return FrameTable(files=np.array(names, dtype=f"S{max(longest, 1)}").reshape(shape),
                      timestamps=timestamps.reshape(shape), calibration=calibration.reshape(shape),
                      ego_pose=ego_pose.reshape(*shape, 7))


def _padded(rows: list[list], width: int, tail: tuple[int, ...] = ()) -> np.ndarray:
    """(N, width, *tail) object array of records, None where a row is short."""
    out = np.full((len(rows), width, *tail), None, dtype=object)
    for i, row in enumerate(rows):
        for j, item in enumerate(row[:width]):
            out[i, j] = item
    return out


def _chain(nusc, record: dict, length: int) -> list[dict]:
    """Up to `length` sample_data records before `record` in its sensor's chain, nearest first."""
    out = []
    while record["prev"] and len(out) < length:
        record = nusc.get("sample_data", record["prev"])
        out.append(record)
    return out


def _adjacent_candidates(nusc, sample: dict, camera_channels: tuple[str, ...], reference: int, count: int,
                         interval: int) -> list[list[dict]]:
    """Up to `count` adjacent-frame candidates of a sample, each a list of one record per camera (see module doc)."""
    length = count * interval
    chains = [_chain(nusc, nusc.get("sample_data", sample["data"][channel]), length + interval)
              for channel in camera_channels]
    candidates = []
    for position in range(interval - 1, min(length, len(chains[reference])), interval):
        anchor = chains[reference][position]["timestamp"]
        candidates.append([min(chain, key=lambda r: abs(r["timestamp"] - anchor)) if chain else None
                           for chain in chains])
    return candidates


def _squeeze(table: FrameTable) -> FrameTable:
    """(N, 1) -> (N,)."""
    return FrameTable(table.files[:, 0], table.timestamps[:, 0], table.calibration[:, 0], table.ego_pose[:, 0])


def _annotations(nusc, sample: dict, lidar_to_ego: np.ndarray, ego_to_global: np.ndarray,
                 attribute_names: dict[str, str]) -> tuple[list, list, list]:
    """GT of one sample in its key-frame LiDAR frame, filtered as the devkit's detection eval filters its GT:
    the 10 detection classes, num_lidar_pts + num_radar_pts > 0."""
    lidar_from_global = invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
    rotation = lidar_from_global[:3, :3]
    boxes, labels, attributes = [], [], []
    for token in sample["anns"]:
        ann = nusc.get("sample_annotation", token)
        name = category_to_class(ann["category_name"])
        if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
            continue
        centre = rotation @ np.asarray(ann["translation"], dtype=np.float64) + lidar_from_global[:3, 3]
        box_axes = rotation @ quaternion_to_matrix(ann["rotation"])
        yaw = np.arctan2(box_axes[1, 0], box_axes[0, 0])
        width, length, height = ann["size"]
        velocity = rotation @ np.nan_to_num(nusc.box_velocity(token), nan=0.0)  # global -> LiDAR (3,)
        boxes.append([*centre, length, width, height, yaw, velocity[0], velocity[1]])
        labels.append(CLASS_ID[name])
        tokens = ann["attribute_tokens"]
        attributes.append(ATTRIBUTE_ID.get(attribute_names.get(tokens[0], ""), NO_ATTRIBUTE) if tokens
                          else NO_ATTRIBUTE)
    return boxes, labels, attributes


def build_split_index(nusc, split: str, sweep_candidates: int, camera_channels: tuple[str, ...] = (),
                      adjacent_count: int = 0, adjacent_interval: int = 1, progress: bool = True) -> SplitIndex:
    """Read the devkit tables of `split` once into a `SplitIndex`.

    Every sample needs a key-frame LIDAR_TOP record and one for each of `camera_channels`; a missing one is a
    `DataError` naming the sample and the table. Sweeps: up to `sweep_candidates` previous LIDAR_TOP records,
    nearest first, exactly those `lidar_records` walks. Adjacent frames: `adjacent_count` candidates
    `adjacent_interval` reference-camera records apart (needs cameras).
    """
    if adjacent_count and not camera_channels:
        raise ValueError("adjacent frames need camera channels")
    if adjacent_interval < 1:
        raise ValueError(f"adjacent_interval must be >= 1, found {adjacent_interval}")
    reference = camera_channels.index("CAM_FRONT") if "CAM_FRONT" in camera_channels else 0
    from tqdm import tqdm

    tokens = split_sample_tokens(nusc, split)
    position = {token: i for i, token in enumerate(tokens)}
    attribute_names = {record["token"]: record["name"] for record in nusc.attribute}
    calibrations = _Calibrations(nusc)
    table_path = Path(nusc.dataroot) / nusc.version / "sample_data.json"
    keys, sweeps, cameras, adjacent, previous, timestamps = [], [], [], [], [], []
    boxes, labels, attributes, offsets = [], [], [], [0]
    # the bar appears only when the walk takes more than 2 s (v1.0-trainval: about a minute)
    for token in tqdm(tokens, desc=f"index {split}", unit="sample", disable=not progress, delay=2.0, leave=False):
        sample = nusc.get("sample", token)
        missing = [channel for channel in ("LIDAR_TOP", *camera_channels) if channel not in sample["data"]]
        if missing:
            raise DataError(f"{table_path}: sample {token} has no key-frame {', '.join(missing)} sample_data; every "
                            f"sample needs LIDAR_TOP and the configured cameras (data.camera_channels)")
        key, *candidates = lidar_records(nusc, token, sweep_candidates, sweep_candidates, None)
        keys.append([key])
        sweeps.append(candidates)
        cameras.append([nusc.get("sample_data", sample["data"][channel]) for channel in camera_channels])
        if adjacent_count:
            adjacent.append(_adjacent_candidates(nusc, sample, tuple(camera_channels), reference, adjacent_count,
                                                 adjacent_interval))
        else:
            adjacent.append([])
        previous.append(position.get(sample["prev"], -1) if sample["prev"] else -1)
        timestamps.append(int(sample["timestamp"]))
        calibration = nusc.get("calibrated_sensor", key["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", key["ego_pose_token"])
        found = _annotations(nusc, sample, make_transform(calibration["rotation"], calibration["translation"]),
                             make_transform(pose["rotation"], pose["translation"]), attribute_names)
        boxes += found[0]
        labels += found[1]
        attributes += found[2]
        offsets.append(len(labels))
    sweep_table = _frame_table(nusc, _padded(sweeps, sweep_candidates), calibrations)
    longest = max((len(t) for t in tokens), default=1)
    return SplitIndex(
        dataroot=str(nusc.dataroot), version=str(nusc.version), split=split, camera_channels=tuple(camera_channels),
        tokens=np.array([t.encode() for t in tokens], dtype=f"S{longest}").reshape(-1),
        timestamps=np.asarray(timestamps, dtype=np.int64).reshape(-1),
        previous=np.asarray(previous, dtype=np.int64).reshape(-1),
        lidar=_squeeze(_frame_table(nusc, _padded(keys, 1), calibrations)),
        sweeps=sweep_table,
        sweep_counts=np.asarray([len(row) for row in sweeps], dtype=np.int64).reshape(-1),
        cameras=_frame_table(nusc, _padded(cameras, len(camera_channels)), calibrations),  # (N, C)
        adjacent=_frame_table(nusc, _padded(adjacent, adjacent_count, (len(camera_channels),)), calibrations),
        adjacent_counts=np.asarray([len(row) for row in adjacent], dtype=np.int64).reshape(-1),
        adjacent_interval=int(adjacent_interval), reference_camera=int(reference),
        calibrations=np.asarray(calibrations.values, dtype=np.float64).reshape(-1, 7),
        intrinsics=np.asarray(calibrations.intrinsics, dtype=np.float64).reshape(-1, 3, 3),
        box_offsets=np.asarray(offsets, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 9),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1),
        attributes=np.asarray(attributes, dtype=np.int64).reshape(-1),
    )


# ---------------------------------------------------------------------------------------------------- LiDAR
def load_lidar_points(index: SplitIndex, i: int, config, rng: np.random.Generator | None,
                      digests: InputDigests | None = None) -> np.ndarray:
    """Key-frame LIDAR_TOP points of sample i + `config.num_sweeps` previous sweeps in the key-frame LiDAR frame.

    Returns (P, 5) float32 x, y, z, intensity, time lag [s] (0 for the key frame), or with `config.point_features`
    "mvp" (P, 17) float32 MVP points (`pipeline/mvp/points.py::mvp_point_features`: each record's plain, painted
    and virtual points, time lag last). Sweeps are moved like the devkit's `from_file_multisweep`: sweep lidar ->
    ego(t_sweep) -> global -> ego(t_key) -> key lidar. With `rng` the sweeps are a random choice of `num_sweeps`
    among the `sweep_candidates` nearest, kept nearest first (train); without, the nearest `num_sweeps` (test). A
    key frame without any previous sweep is padded with copies of itself, without its own close returns, when
    `config.pad_empty_sweeps` (mmdet3d's LoadPointsFromMultiSweeps(pad_empty_sweeps=True)). `digests` records the
    SHA-256 of every file read, in read order (`data/digest.py`: key frame, sweeps, each with its virtual points).
    """
    num_sweeps, available = config.num_sweeps, int(index.sweep_counts[i])
    available = min(available, config.sweep_candidates)
    if rng is not None and available > num_sweeps:
        chosen = [int(j) for j in sorted(rng.choice(available, num_sweeps, replace=False))]
    else:
        chosen = list(range(min(available, num_sweeps)))
    token = index.token(i)
    lidar_to_ego, ego_to_global = index.transforms(index.lidar, i)
    lidar_from_global = invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
    mvp = config.point_features == "mvp"

    def read(path: str, lag: float) -> np.ndarray:
        """One record's points in its own sensor frame with `lag` in the last column: (P, 5) or (P, 17)."""
        raw = read_points(path, token, digests)
        if not mvp:
            raw[:, 4] = lag
            return raw
        owner = f"{Path(path).name} (sample {token})"
        return mvp_point_features(raw, read_virtual_points(virtual_path(path), owner, digests), lag)

    def far(points: np.ndarray) -> np.ndarray:
        # the ego body's own returns would smear across the key frame once a sweep is moved
        close = (np.abs(points[:, 0]) < config.sweep_min_distance) & (np.abs(points[:, 1]) < config.sweep_min_distance)
        return points[~close]

    key_points = read(index.path(index.lidar, i), 0.0)
    clouds = [key_points]
    if not chosen and num_sweeps > 0 and config.pad_empty_sweeps:
        clouds += [far(key_points)] * num_sweeps
    key_time = int(index.lidar.timestamps[i])
    for j in chosen:
        points = far(read(index.path(index.sweeps, i, j), (key_time - int(index.sweeps.timestamps[i, j])) * 1e-6))
        sweep_to_ego, sweep_ego_to_global = index.transforms(index.sweeps, i, j)
        key_from_sweep = lidar_from_global @ sweep_ego_to_global @ sweep_to_ego
        # float32 is exact enough (1e-5 m at 100 m) and about twice as fast as float64 here.
        points[:, :3] = points[:, :3] @ key_from_sweep[:3, :3].T.astype(np.float32) \
            + key_from_sweep[:3, 3].astype(np.float32)
        clouds.append(points)
    return np.concatenate(clouds, axis=0)  # (P, 5) or (P, 17) float32


def key_frame_lidar(points: np.ndarray) -> np.ndarray:
    """The key frame's own LiDAR returns of a loaded cloud, (P_key, 5) x, y, z, intensity, time lag: rows with time
    lag 0 (the last column) and, in an MVP cloud, only the plain rows (virtual flag 1), never painted or virtual."""
    key = points[:, -1] == 0
    if points.shape[1] == MVP_POINT_DIMS:
        key &= points[:, MVP_POINT_DIMS - 2] == 1  # the virtual flag column
        return np.concatenate([points[key, :4], points[key, -1:]], axis=1)
    return points[key]
