"""`make-virtual-points`: MVP's virtual points of every LiDAR sample_data a teacher reads, beside the sweeps.

The jobs are the key-frame LIDAR_TOP records of the chosen samples and up to `sweeps` previous LIDAR_TOP records of
each (the sweep candidates of the loader, `DataConfig.sweep_candidates`), each once. Each job's cameras are, per
channel, the record nearest in time among the camera record of the LiDAR record's sample and up to 6 records before
it (as MVP's info files pick them); its masks come from `masks/CAM_X/<image stem>.png|json` (docs/mvp.md).

Resumable: a finished file is skipped, every file is written atomically, and the temporary files an interrupted
run left are removed. Deterministic: the pixels drawn for a
sample_data depend only on `seed` and its token, so any order, any worker count and any resume give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.loading import load_nuscenes, read_points, split_sample_tokens
from ..data.masks import mask_paths
from ..data.virtual_points import FILE_SUFFIX, virtual_path, write_virtual_points
from ..geometry.transforms import invert_transform, make_transform
from .virtual import NUM_VIRTUAL, CameraView, read_camera_masks, virtual_points

CAMERA_CHANNELS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
SUMMARY_NAME = "virtual_points_summary.json"  # in the dataroot, written when every file of a run exists
CAMERA_HISTORY = 6  # camera records before the sample's own that may be nearest to a sweep (MVP)


@dataclass(frozen=True)
class CameraJob:
    """One camera record of a job: token, image filename, camera_from_lidar (4, 4), intrinsics (3, 3), size."""

    token: str
    filename: str
    camera_from_lidar: np.ndarray
    intrinsics: np.ndarray
    width: int
    height: int


@dataclass(frozen=True)
class Job:
    """One LIDAR_TOP sample_data: its token, .pcd.bin filename and cameras."""

    token: str
    filename: str
    cameras: tuple[CameraJob, ...]


def _pose(nusc, record: dict, key: str) -> np.ndarray:
    entry = nusc.get(key, record[f"{key}_token"] if key == "ego_pose" else record["calibrated_sensor_token"])
    return make_transform(entry["rotation"], entry["translation"])


def _nearest_camera(nusc, sample: dict, channel: str, timestamp: int) -> dict:
    record = nusc.get("sample_data", sample["data"][channel])
    best = record
    for _ in range(CAMERA_HISTORY):
        if not record["prev"]:
            break
        record = nusc.get("sample_data", record["prev"])
        if abs(record["timestamp"] - timestamp) < abs(best["timestamp"] - timestamp):
            best = record
    return best


def build_jobs(nusc, split: str | None, sweeps: int) -> list[Job]:
    """The jobs of `split` (every sample when None), key frames and their `sweeps` previous LIDAR_TOP records."""
    tokens = split_sample_tokens(nusc, split) if split else [s["token"] for s in nusc.sample]
    records: dict[str, dict] = {}
    for token in tokens:
        record = nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"])
        records.setdefault(record["token"], record)
        for _ in range(sweeps):
            if not record["prev"]:
                break
            record = nusc.get("sample_data", record["prev"])
            records.setdefault(record["token"], record)
    jobs = []
    for record in records.values():
        global_from_lidar = _pose(nusc, record, "ego_pose") @ _pose(nusc, record, "calibrated_sensor")
        sample = nusc.get("sample", record["sample_token"])
        cameras = []
        for channel in CAMERA_CHANNELS:
            if channel not in sample["data"]:
                continue
            camera = _nearest_camera(nusc, sample, channel, record["timestamp"])
            global_from_camera = _pose(nusc, camera, "ego_pose") @ _pose(nusc, camera, "calibrated_sensor")
            intrinsics = np.asarray(nusc.get("calibrated_sensor", camera["calibrated_sensor_token"])
                                    ["camera_intrinsic"], dtype=np.float64)
            cameras.append(CameraJob(camera["token"], camera["filename"],
                                     invert_transform(global_from_camera) @ global_from_lidar, intrinsics,
                                     int(camera["width"]), int(camera["height"])))
        jobs.append(Job(record["token"], record["filename"], tuple(cameras)))
    return jobs


def job_rng(seed: int, token: str) -> np.random.Generator:
    """The pixel draws of one sample_data: a function of the seed and its token only."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "little")])


def run_job(dataroot: Path, job: Job, num_virtual: int, seed: int) -> bool:
    """Write one job's file unless it exists; True when it was written."""
    out = virtual_path(dataroot / job.filename)
    if out.is_file():
        return False
    points = read_points(dataroot / job.filename, job.token)
    views = []
    for camera in job.cameras:
        png, meta = mask_paths(dataroot, camera.filename)
        context = (f"for camera sample_data {camera.token} ({camera.filename}), needed by LIDAR_TOP sample_data "
                   f"{job.token}; run `distillbev make-synthetic --masks` (on by default in world 2) or write your "
                   f"segmenter's masks in the layout of docs/mvp.md")
        views.append(CameraView(camera.camera_from_lidar, camera.intrinsics,
                                read_camera_masks(png, meta, camera.width, camera.height, context)))
    write_virtual_points(out, virtual_points(points, views, job_rng(seed, job.token), num_virtual))
    return True


def _worker(arguments: tuple[Path, Job, int, int]) -> bool:
    return run_job(*arguments)


def make_virtual_points(dataroot: str | Path, version: str, split: str | None = None, sweeps: int = 10,
                        workers: int = 0, num_virtual: int = NUM_VIRTUAL, seed: int = 0,
                        progress: bool = True) -> dict:
    """Write the virtual points of a dataroot (see the module doc); returns counts of jobs, written and skipped."""
    dataroot = Path(dataroot)
    jobs = build_jobs(load_nuscenes(dataroot, version), split, sweeps)
    for folder in {virtual_path(dataroot / job.filename).parent for job in jobs}:
        for leftover in folder.glob(f".*{FILE_SUFFIX}.*.tmp"):  # temporary files of an interrupted run
            leftover.unlink()
    pending = [job for job in jobs if not virtual_path(dataroot / job.filename).is_file()]
    arguments = [(dataroot, job, num_virtual, seed) for job in pending]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="virtual points", unit="sweep",
               disable=not progress)
    written = 0
    if workers > 1 and len(arguments) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for done in pool.imap_unordered(_worker, arguments, chunksize=4):
                written += int(done)
                bar.update(1)
    else:
        for argument in arguments:
            written += int(_worker(argument))
            bar.update(1)
    bar.close()
    counts = {"jobs": len(jobs), "written": written, "skipped": len(jobs) - len(pending)}
    # written last: its presence says every file of this run exists (a demo step's completion marker)
    summary = {**counts, "version": version, "split": split, "sweeps": sweeps, "num_virtual": num_virtual,
               "seed": seed}
    temporary = dataroot / f".{SUMMARY_NAME}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(summary, indent=1))
    os.replace(temporary, dataroot / SUMMARY_NAME)
    return counts
