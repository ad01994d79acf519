"""Pre-flight check of a split's inputs and a content fingerprint of the LiDAR data the teacher reads.

`check_split_inputs` walks the LIDAR_TOP records the test-mode loader reads for every sample of a split (the key
frame and the nearest `num_sweeps` previous sweeps, via `lidar_records`) and stats each file once: every missing
or malformed file becomes one problem line, so a long run is not started on a dataroot that fails at sample
20,000. It never reads point data, so it takes seconds on v1.0-trainval.

The same pass hashes what those records say (file name, timestamp, calibration, ego pose, file size) into a
fingerprint that is independent of where the dataroot is mounted and changes with any input the teacher sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .loading import lidar_records, load_nuscenes, split_sample_tokens
from .virtual_points import FILE_SUFFIX as VIRTUAL_FILE_END
from .virtual_points import MAKE_COMMAND, virtual_path

POINT_BYTES = 20  # 5 float32 per point: x, y, z, intensity, ring


@dataclass
class SplitInputs:
    """What the pre-flight pass found for one split."""

    problems: list[str]  # one line each, every problem (not only the first)
    sample_count: int
    files: int  # distinct LiDAR files checked (key frames + sweeps; a file read by two samples counts once)
    bytes: int  # their total size (files that exist)
    fingerprint: str  # sha256 hex over the split's LiDAR records, see `check_split_inputs`


def lidar_inputs(nusc, sample_tokens: list[str], num_sweeps: int, sweep_candidates: int) -> list[list[dict]]:
    """Per sample, the LIDAR_TOP sample_data records the test-mode loader reads: [key frame, nearest sweeps...].

    Exactly the records of `load_lidar_points(rng=None)`; [] for a sample without a LIDAR_TOP key frame.
    """
    if num_sweeps < 0 or sweep_candidates < num_sweeps:
        raise ValueError(f"need 0 <= num_sweeps <= sweep_candidates, found {num_sweeps} and {sweep_candidates}")
    inputs = []
    for token in sample_tokens:
        if "LIDAR_TOP" not in nusc.get("sample", token)["data"]:
            inputs.append([])
        else:
            inputs.append(lidar_records(nusc, token, num_sweeps, sweep_candidates, None))
    return inputs


def _file_size(path: str, virtual: bool = False) -> tuple[int, str | None]:
    """(size in bytes, -1 unless a regular file; what is wrong with the file or None) from one os.stat.

    virtual: an MVP virtual-point file (any positive size), else a .pcd.bin (a positive multiple of 20 bytes)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return -1, "not found"
    except OSError as exc:
        return -1, f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return -1, "is not a regular file"
    if info.st_size <= 0 or (not virtual and info.st_size % POINT_BYTES != 0):
        return info.st_size, "bad size"
    return info.st_size, None


def _file_problem(path: str, size: int, issue: str, readers: list[str]) -> str:
    """One problem line for a LiDAR file: the path, the sample(s) reading it, what was expected, the fix."""
    samples = f"sample {readers[0]}"
    if len(readers) > 1:
        samples += f" (and {len(readers) - 1} more sample{'s' if len(readers) > 2 else ''})"
    if path.endswith(VIRTUAL_FILE_END):
        return (f"{path}: MVP virtual-point file of {samples} {'is empty' if issue == 'bad size' else issue}; run "
                f"`{MAKE_COMMAND}` or put MVP's released LIDAR_TOP_VIRTUAL folders next to samples/ and sweeps/")
    if issue == "bad size":
        return (f"{path}: {size} bytes in {samples}, expected a positive multiple of {POINT_BYTES} (5 float32 x, y, "
                f"z, intensity, ring per point); the file is truncated or not a .pcd.bin, re-extract it")
    if issue == "not found":
        return (f"{path}: LiDAR file of {samples} not found; check that samples/ and sweeps/ were extracted into "
                f"the dataroot")
    return f"{path}: LiDAR file of {samples} {issue}; re-extract it from the dataset archive"


def _record_key(filename: str, timestamp: int, calibration: list[float], pose: list[float], size: int,
                virtual_size: int | None = None) -> dict:
    """The fingerprinted content of one LiDAR record (no absolute paths, floats normalised).

    calibration / pose: w, x, y, z, tx, ty, tz of calibrated_sensor / ego_pose; virtual_size: the size of its MVP
    virtual-point file, for a fingerprint of MVP inputs (left out otherwise, so LiDAR fingerprints are unchanged).
    """
    extra = {} if virtual_size is None else {"virtual_size": int(virtual_size)}
    return {**extra,
        "filename": filename, "timestamp": int(timestamp), "size": size,
        "sensor_translation": [float(v) for v in calibration[4:]],
        "sensor_rotation": [float(v) for v in calibration[:4]],
        "ego_translation": [float(v) for v in pose[4:]],
        "ego_rotation": [float(v) for v in pose[:4]],
    }


def _devkit_record_key(nusc, record: dict, size: int, virtual_size: int | None = None) -> dict:
    calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", record["ego_pose_token"])
    return _record_key(record["filename"], record["timestamp"], [*calibration["rotation"], *calibration["translation"]],
                       [*pose["rotation"], *pose["translation"]], size, virtual_size)


def _fingerprint_header(num_sweeps: int, virtual: bool = False) -> "hashlib._Hash":
    digest = hashlib.sha256()
    header = {"num_sweeps": int(num_sweeps), **({"virtual_points": True} if virtual else {})}
    digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
    return digest


def _fingerprint_line(token: str, keys: list[dict]) -> bytes:
    return json.dumps({"sample": token, "lidar": keys}, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def check_split_inputs(nusc, sample_tokens: list[str], num_sweeps: int, sweep_candidates: int,
                       progress: bool = False, virtual: bool = False) -> SplitInputs:
    """Stat every LiDAR file of the split once and fingerprint the records; never reads point data.

    A file must exist, be a regular file and hold a positive multiple of 20 bytes; each bad file is one problem
    line naming its path and the sample(s) that read it. The fingerprint is sha256 over one canonical JSON line
    (sorted keys, floats as repr) for `num_sweeps`, then one per sample in split order: its token and, key frame
    first then sweeps nearest first, each record's filename, timestamp, calibrated_sensor and ego_pose
    translation + rotation and file size (-1 if unusable as a file). File names are relative to the dataroot,
    so moving the dataroot keeps the fingerprint. `virtual` (an MVP teacher's input): each record's virtual-point
    file (`pipeline/mvp/points.py::virtual_path`) is checked too and its size enters the fingerprint.
    """
    from tqdm import tqdm

    dataroot = Path(nusc.dataroot)
    table_root = dataroot / nusc.version
    sizes: dict[str, tuple[int, str | None]] = {}  # filename -> (size, issue)
    readers: dict[str, list[str]] = {}  # filename with an issue -> sample tokens reading it, in split order
    missing_key_frames = []
    digest = _fingerprint_header(num_sweeps, virtual)
    records_of = lidar_inputs(nusc, sample_tokens, num_sweeps, sweep_candidates)
    for token, records in tqdm(zip(sample_tokens, records_of), total=len(sample_tokens), desc="preflight",
                               unit="sample", disable=not progress):
        if not records:
            missing_key_frames.append(token)
        keys = []
        for record in records:
            found = []
            for filename in (record["filename"], *([str(virtual_path(record["filename"]))] if virtual else [])):
                found.append(_stat_once(dataroot, filename, token, sizes, readers))
            keys.append(_devkit_record_key(nusc, record, *found))
        digest.update(_fingerprint_line(token, keys))

    problems = [f"sample {token}: no LIDAR_TOP key frame in {table_root / 'sample_data.json'}; regenerate the "
                f"tables or leave the sample out of the split" for token in missing_key_frames]
    problems += [_file_problem(str(dataroot / filename), sizes[filename][0], sizes[filename][1], tokens)
                 for filename, tokens in readers.items()]
    total = sum(size for size, _ in sizes.values() if size >= 0)
    return SplitInputs(problems=problems, sample_count=len(sample_tokens), files=len(sizes), bytes=total,
                       fingerprint=digest.hexdigest())


def _stat_once(dataroot: Path, filename: str, token: str, sizes: dict[str, tuple[int, str | None]],
               readers: dict[str, list[str]]) -> int:
    """The size of `filename` under `dataroot`, stat'ed once per check (`sizes`: filename -> (size, issue)); a file
    with an issue records `token` among its readers, in split order."""
    if filename not in sizes:
        sizes[filename] = _file_size(str(dataroot / filename), filename.endswith(VIRTUAL_FILE_END))
    size, issue = sizes[filename]
    if issue is not None and token not in readers.setdefault(filename, []):
        readers[filename].append(token)
    return size


def dataset_fingerprint(nusc, sample_tokens: list[str], num_sweeps: int, sweep_candidates: int,
                        virtual: bool = False) -> str:
    """sha256 hex of the split's LiDAR inputs (`check_split_inputs`); path-independent."""
    return check_split_inputs(nusc, sample_tokens, num_sweeps, sweep_candidates, virtual=virtual).fingerprint


def check_index_inputs(index, num_sweeps: int, progress: bool = False, virtual: bool = False) -> SplitInputs:
    """`check_split_inputs` from a `SplitIndex` instead of the devkit (an index built from mmdet3d's infos, whose
    dataroot may hold no tables): the same records (the key frame and the nearest `num_sweeps` sweeps), each file
    stat'ed once, the same problem lines and the same fingerprint.

    The index must hold at least `num_sweeps` sweep candidates per sample (ValueError otherwise). Every sample of an
    index has its key frame (the builders refuse one without), so only files can be problems.
    """
    from tqdm import tqdm

    if index.sweeps.files.shape[1] < num_sweeps:
        raise ValueError(f"the index holds {index.sweeps.files.shape[1]} sweep candidates, the fingerprint needs "
                         f"{num_sweeps}")
    dataroot = Path(index.dataroot)
    sizes: dict[str, tuple[int, str | None]] = {}  # filename -> (size, issue)
    readers: dict[str, list[str]] = {}  # filename with an issue -> sample tokens reading it, in split order
    digest = _fingerprint_header(num_sweeps, virtual)
    for i in tqdm(range(len(index)), desc="preflight", unit="sample", disable=not progress):
        token = index.token(i)
        where = [(index.lidar, (i,))] + [(index.sweeps, (i, j))
                                         for j in range(min(int(index.sweep_counts[i]), num_sweeps))]
        keys = []
        for table, at in where:
            filename = table.files[at].decode()
            found = []
            for name in (filename, *([str(virtual_path(filename))] if virtual else [])):
                found.append(_stat_once(dataroot, name, token, sizes, readers))
            keys.append(_record_key(filename, table.timestamps[at], index.calibrations[table.calibration[at]].tolist(),
                                    table.ego_pose[at].tolist(), *found))
        digest.update(_fingerprint_line(token, keys))
    problems = [_file_problem(str(dataroot / name), sizes[name][0], sizes[name][1], tokens)
                for name, tokens in readers.items()]
    total = sum(size for size, _ in sizes.values() if size >= 0)
    return SplitInputs(problems=problems, sample_count=len(index), files=len(sizes), bytes=total,
                       fingerprint=digest.hexdigest())


def index_fingerprint(index, num_sweeps: int, virtual: bool = False) -> str:
    """The `dataset_fingerprint` of a split from its `SplitIndex` (no devkit): the same records, the same hash.

    The index must hold at least `num_sweeps` sweep candidates per sample (ValueError otherwise).
    """
    return check_index_inputs(index, num_sweeps, virtual=virtual).fingerprint


def preflight_message(problems: list[str], limit: int = 5) -> str:
    """One line: '<N> problem(s) in the inputs: p1; p2; ... (and K more)'."""
    count = len(problems)
    message = f"{count} problem{'s' if count != 1 else ''} in the inputs: {'; '.join(problems[:limit])}"
    if count > limit:
        message += f" (and {count - limit} more)"
    return message


def preflight_split(dataroot: str | Path, version: str, split: str, num_sweeps: int, sweep_candidates: int,
                    progress: bool = False, virtual: bool = False) -> tuple[object, list[str], SplitInputs]:
    """Check a split's inputs before a long run -> (devkit NuScenes, sample tokens, `SplitInputs`).

    The dataroot, the version folder and the 13 tables are checked first: every missing table, or every table
    that is not valid JSON, is named in one `DataError` (as are an unknown split and tables the devkit cannot
    link). File problems are not raised but returned in `SplitInputs.problems`, so the caller can add its own
    and report all of them at once (`preflight_message`).
    """
    nusc = load_nuscenes(dataroot, version)
    sample_tokens = split_sample_tokens(nusc, split)
    return nusc, sample_tokens, check_split_inputs(nusc, sample_tokens, num_sweeps, sweep_candidates, progress,
                                                   virtual)


# The loader crops the points to point_cloud_range after the BEV augmentation (`NuScenesDetectionDataset.get`). A
# cache manifest records it as point_loading.range_filter; a manifest without the key describes a store whose
# points were cropped before the augmentation, so comparing manifests tells such a store apart.
RANGE_FILTER = "after_bev_augmentation"


def point_loading_settings(config) -> dict:
    """The `DataConfig` settings that decide the teacher's test-mode input points (recorded in a cache manifest)."""
    return {"num_sweeps": int(config.num_sweeps), "sweep_candidates": int(config.sweep_candidates),
            "sweep_selection": "nearest", "sweep_min_distance": float(config.sweep_min_distance),
            "point_cloud_range": [float(v) for v in config.point_cloud_range], "point_dims": int(config.point_dims),
            "range_filter": RANGE_FILTER, "pad_empty_sweeps": bool(config.pad_empty_sweeps),
            # only an MVP teacher's manifest names its point features (a LiDAR manifest stays as before)
            **({"point_features": config.point_features} if config.point_features != "lidar" else {})}
