"""The real LIDAR_TOP cloud: its layout, and what its 8,274 rows near the sensor are.

A nuScenes .pcd.bin holds every ray of the turn, 32 rings per firing column. About a quarter of the rows lie within
the devkit's 1 m box around the sensor (`LidarPointCloud.remove_close(1.0)`, mmdet3d's `remove_close`). They are of
two kinds, told apart here from the file alone:

- rays without a return (4,393 rows): within a firing column they share one position, the same for every ring,
  and over the turn that position runs along a straight segment that ends at the origin with the last column.
  It is the sensor's own position when the column fired, moved like every row to the sweep's end (nuScenes
  compensates the ego motion within a sweep): the segment is parallel to the ego's motion, which the info file's
  camera matrices give independently, and its length is the ego speed x one turn (0.45 m at 9.2 m/s);
- returns from the car itself (3,881 rows): only the lower rings (0-10, pointing 17-31 degrees down) have them,
  0.23-0.47 m below the sensor, 0.37-1.16 m from it: the roof around the sensor's mount.

Neither is the scene, and their intensities look like any others (so intensity does not tell them apart).
"""

from __future__ import annotations

import numpy as np
import pytest
from real_keyframe import LIDAR_FILE, RINGS, ROWS, SWEEP_SECONDS, ego_motion_in_lidar, read_cloud, read_info

from distillbev.pipeline.data.loading import NEAR_SENSOR_BOX, lidar_returns, near_sensor, read_points
from distillbev.pipeline.data.stats import lidar_row_counts

NEAR_ROWS = 8_274
NO_RETURN_ROWS = 4_393
BODY_ROWS = 3_881


@pytest.fixture(scope="module")
def cloud() -> np.ndarray:
    return read_cloud()


@pytest.fixture(scope="module")
def no_return(cloud) -> tuple[np.ndarray, np.ndarray]:
    """(P,) rows of rays without a return, and the (2, 3) line [slope per column; position at column 0] they lie on.

    A row whose x, y, z equals exactly that of another ring in its column cannot be a return (the rings point
    1.33 degrees apart); a line through those rows (least squares over the column number) then also holds the
    columns with a single ray without a return."""
    columns = cloud.reshape(-1, RINGS, 5)[:, :, :3]  # (1084, 32, 3)
    same = (columns[:, :, None, :] == columns[:, None, :, :]).all(-1)  # (1084, 32, 32)
    same[:, np.arange(RINGS), np.arange(RINGS)] = False
    shared = same.any(-1).reshape(-1)  # (P,)
    column = np.arange(len(cloud)) // RINGS
    design = np.stack([column, np.ones(len(cloud))], axis=1)  # (P, 2)
    line, *_ = np.linalg.lstsq(design[shared], cloud[shared, :3].astype(np.float64), rcond=None)  # (2, 3)
    assert np.abs(design[shared] @ line - cloud[shared, :3]).max() < 1e-3  # those rows really are on one line
    on_line = np.linalg.norm(cloud[:, :3] - design @ line, axis=1) < 1e-3
    return on_line, line


def test_the_file_holds_every_ray_column_by_column(cloud):
    assert cloud.shape == (ROWS, 5)
    assert (cloud.reshape(-1, RINGS, 5)[:, :, 4] == np.arange(RINGS)).all()
    assert read_points(LIDAR_FILE, "sample").shape == (ROWS, 5)


def test_returns_are_the_rows_outside_the_devkit_near_sensor_box(cloud):
    from nuscenes.utils.data_classes import LidarPointCloud

    inside = (np.abs(cloud[:, 0]) < 1.0) & (np.abs(cloud[:, 1]) < 1.0)
    assert NEAR_SENSOR_BOX == 1.0
    assert int(inside.sum()) == NEAR_ROWS
    assert (near_sensor(cloud) == inside).all() and (lidar_returns(cloud) == ~inside).all()
    devkit = LidarPointCloud.from_file(str(LIDAR_FILE))
    devkit.remove_close(1.0)
    assert devkit.nbr_points() == ROWS - NEAR_ROWS == 26_414
    assert lidar_row_counts(cloud) == (ROWS, 26_414, NEAR_ROWS)
    # the earlier rule (a ray without a return sits within 1 mm of the origin) found only 8 of them
    assert int((np.linalg.norm(cloud[:, :3], axis=1) <= 1e-3).sum()) == 8


def test_rays_without_a_return_trace_the_sensor_over_the_turn(cloud, no_return):
    rows, line = no_return
    assert int(rows.sum()) == NO_RETURN_ROWS
    assert near_sensor(cloud)[rows].all()
    slope, start = line
    end = start + slope * (len(cloud) // RINGS - 1)
    assert np.linalg.norm(end) < 2e-3  # the last column fires at the sweep's time: the sensor is at the origin
    length = float(np.linalg.norm(end - start))
    assert length == pytest.approx(0.452, abs=0.002)
    # the ego's displacement from the LiDAR time to each camera's time, from the info file's matrices alone
    _, info = read_info()
    motions = ego_motion_in_lidar(info)
    seconds, displacement = motions["CAM_FRONT"]
    assert seconds == pytest.approx(0.0355, abs=1e-4)
    speed = float(np.linalg.norm(displacement)) / seconds
    assert speed == pytest.approx(9.24, abs=0.02)
    cosine = float(np.dot(-slope, displacement) / (np.linalg.norm(slope) * np.linalg.norm(displacement)))
    assert cosine > 0.999  # the segment runs along the ego's motion (the sensor was behind, earlier)
    assert length / SWEEP_SECONDS == pytest.approx(speed, rel=0.03)
    # and their intensities are ordinary ones: intensity does not mark a ray without a return
    assert float(np.median(cloud[rows, 3])) > 0


def test_the_other_near_rows_are_the_lower_rings_seeing_the_car(cloud, no_return):
    rows, _ = no_return
    body = near_sensor(cloud) & ~rows
    assert int(body.sum()) == BODY_ROWS == NEAR_ROWS - NO_RETURN_ROWS
    assert set(np.unique(cloud[body, 4]).astype(int)) == set(range(11))
    assert -0.48 < float(cloud[body, 2].min()) and float(cloud[body, 2].max()) < -0.22
    distance = np.linalg.norm(cloud[body, :3], axis=1)
    assert 0.35 < float(distance.min()) and float(distance.max()) < 1.2
    # far from the sensor the same rings see the ground and the scene: their returns are ordinary rows
    lower = cloud[:, 4] <= 10
    assert int((lower & ~near_sensor(cloud)).sum()) > 7_000


class KeyFrameTables:
    """The devkit fields `dataset_statistics` reads, for the one key frame (its annotations left out: the info file
    holds them in the LiDAR frame, the statistics read the tables' global ones)."""

    version = "v1.0-mini"

    def __init__(self, info: dict) -> None:
        from real_keyframe import DATAROOT, SAMPLE_TOKEN

        from distillbev.pipeline.data.infos import poses_from_matrices

        self.dataroot = str(DATAROOT)
        pose = poses_from_matrices(np.asarray(info["ego2global"]))
        self.records = {
            "lidar": {"filename": LIDAR_FILE.relative_to(DATAROOT).as_posix(), "ego_pose_token": "pose",
                      "timestamp": round(info["timestamp"] * 1e6), "prev": ""},
            "pose": {"rotation": pose[:4].tolist(), "translation": pose[4:].tolist()},
            **{channel: {"timestamp": round(camera["timestamp"] * 1e6)} for channel, camera in info["images"].items()},
        }
        self.sample = [{"token": SAMPLE_TOKEN, "data": {"LIDAR_TOP": "lidar", **{c: c for c in info["images"]}},
                        "anns": []}]
        self.records[SAMPLE_TOKEN] = self.sample[0]
        self.scene = [{"first_sample_token": SAMPLE_TOKEN}]

    def get(self, table: str, token: str) -> dict:
        return self.records[token]


def test_dataset_stats_reports_returns_and_near_sensor_rows_of_the_real_key_frame():
    from distillbev.pipeline.data.stats import dataset_statistics, format_statistics

    _, info = read_info()
    stats = dataset_statistics(KeyFrameTables(info))
    assert stats.points_per_key_frame == {"mean": ROWS, "p5": ROWS, "p95": ROWS}
    assert stats.returns_per_key_frame == {"mean": 26_414, "p5": 26_414, "p95": 26_414}
    assert stats.near_sensor_per_key_frame == {"mean": NEAR_ROWS, "p5": NEAR_ROWS, "p95": NEAR_ROWS}
    assert stats.camera_offsets_ms["CAM_FRONT"] == pytest.approx(35.491, abs=1e-3)
    table = format_statistics(stats)
    row = "| of which returns (outside the devkit's 1 m box around the sensor), mean (p5-p95) | 26414 (26414-26414) |"
    assert row in table
    assert "| 8274 (8274-8274) |" in table
