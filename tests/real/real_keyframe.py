"""The vendored real nuScenes key frame (tests/real/data, see its NOTICE.md): paths, names and small readers shared
by the tests of this folder (imported as `real_keyframe`: the test folders are not packages)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from distillbev.pipeline.data.config import CAMERA_CHANNELS, DataConfig

DATAROOT = Path(__file__).resolve().parent / "data"
VERSION = "v1.0-mini"
SPLIT = "val"  # the info file is nuscenes_infos_val.pkl (`infos.infos_file(DATAROOT, "val")`)
INFOS = DATAROOT / "nuscenes_infos_val.pkl"
SAMPLE_TOKEN = "ca9a282c9e77460f8360f564131a8af5"
LOG = "n015-2018-07-24-11-22-45+0800"
LIDAR_FILE = DATAROOT / "samples" / "LIDAR_TOP" / f"{LOG}__LIDAR_TOP__1532402927647951.pcd.bin"
CAMERA_FILES = {
    "CAM_FRONT": f"{LOG}__CAM_FRONT__1532402927612460.jpg",
    "CAM_FRONT_RIGHT": f"{LOG}__CAM_FRONT_RIGHT__1532402927620339.jpg",
    "CAM_FRONT_LEFT": f"{LOG}__CAM_FRONT_LEFT__1532402927604844.jpg",
    "CAM_BACK": f"{LOG}__CAM_BACK__1532402927637525.jpg",
    "CAM_BACK_LEFT": f"{LOG}__CAM_BACK_LEFT__1532402927647423.jpg",
    "CAM_BACK_RIGHT": f"{LOG}__CAM_BACK_RIGHT__1532402927627893.jpg",
}
IMAGE_SIZE = (1600, 900)  # (W, H) of every camera
ROWS = 34_688  # rows of the .pcd.bin: 32 rings x 1,084 firing columns
RINGS = 32
SWEEP_SECONDS = 0.05  # one turn of the 20 Hz HDL-32E


def camera_path(channel: str) -> Path:
    return DATAROOT / "samples" / channel / CAMERA_FILES[channel]


def read_cloud() -> np.ndarray:
    """(34688, 5) float32 x, y, z, intensity, ring of the key frame, read with plain numpy."""
    return np.fromfile(LIDAR_FILE, dtype=np.float32).reshape(-1, 5)


def read_info() -> tuple[dict, dict]:
    """(metainfo, the one sample info) of the vendored mmdet3d info file (plain pickle: only builtins inside)."""
    with INFOS.open("rb") as f:
        content = pickle.load(f)
    (info,) = content["data_list"]
    return content["metainfo"], info


def ego_motion_in_lidar(info: dict) -> dict[str, tuple[float, np.ndarray]]:
    """Per camera: (seconds before the LiDAR timestamp, the ego's displacement from the LiDAR time to the camera time
    in the key-frame LiDAR frame (3,)), from the info's matrices alone.

    mmdet3d's lidar2cam carries the ego motion between the two records:
    inv(lidar2cam) = inv(lidar2ego) @ inv(ego2global_lidar) @ ego2global_camera @ cam2ego, so
    lidar2ego @ inv(lidar2cam) @ inv(cam2ego) is the ego at the camera's time in the ego frame at the LiDAR's.
    """
    lidar_to_ego = np.asarray(info["lidar_points"]["lidar2ego"], dtype=np.float64)
    out = {}
    for channel, camera in info["images"].items():
        ego_then = lidar_to_ego @ np.linalg.inv(np.asarray(camera["lidar2cam"], dtype=np.float64)) \
            @ np.linalg.inv(np.asarray(camera["cam2ego"], dtype=np.float64))
        displacement = np.linalg.inv(lidar_to_ego)[:3, :3] @ ego_then[:3, 3]
        out[channel] = (float(info["timestamp"]) - float(camera["timestamp"]), displacement)
    return out


def real_data_config(**overrides) -> DataConfig:
    """The key frame as the nuScenes configs load it: 9 sweeps padded with the key frame at a scene start
    (mmdet3d's pad_empty_sweeps), +-51.2 m, the six cameras at 256x704."""
    values = dict(dataroot=str(DATAROOT), version=VERSION, train_split=SPLIT, val_split=SPLIT, num_sweeps=9,
                  sweep_candidates=10, pad_empty_sweeps=True, final_size=(256, 704))
    values.update(overrides)
    return DataConfig(**values)


def real_index(camera_channels: tuple[str, ...] = CAMERA_CHANNELS, sweep_candidates: int = 10):
    from distillbev.pipeline.data.infos import index_from_infos

    return index_from_infos(INFOS, DATAROOT, VERSION, SPLIT, sweep_candidates, camera_channels, progress=False)
