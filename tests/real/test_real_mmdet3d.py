"""The real key frame through mmdet3d 1.4.0's own CenterPoint against our loader and teacher:

- the points, row for row: mmdet3d's LoadPointsFromFile, LoadPointsFromMultiSweeps(sweeps_num=9,
  pad_empty_sweeps=True, remove_close=True) and PointsRangeFilter, as configs/centerpoint/centerpoint_pillar02_*
  load a key frame;
- the teacher on those points, with the same random weights (tests/teacher/test_mmdet3d_equivalence.py's helpers):
  a real cloud fills pillars unevenly (3,083 of its 7,896 pillars hold more than the 20 points hard voxelization
  keeps, the fullest 2,232, near the sensor), which the synthetic clouds of that test do not.

Runs only where mmdet3d imports (the .venv-mmdet3d of `make venv-mmdet3d`):
    .venv-mmdet3d/bin/python -m pytest -m mmdet3d tests/real -q
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from module_loader import load_tests_module
from real_keyframe import LIDAR_FILE, SPLIT, read_info, real_data_config

pytest.importorskip("mmdet3d", reason="mmdet3d is not installed; build the optional venv with `make venv-mmdet3d`")

from mmdet3d.datasets.transforms import LoadPointsFromFile, LoadPointsFromMultiSweeps, PointsRangeFilter  # noqa: E402

from distillbev.pipeline.data.dataset import NuScenesDetectionDataset  # noqa: E402

pytestmark = pytest.mark.mmdet3d

POINT_CLOUD_RANGE = [-51.2, -51.2, -5.0, 51.2, 51.2, 3.0]


def mmdet3d_points() -> np.ndarray:
    """(P, 5) the key frame's points as mmdet3d's CenterPoint test pipeline loads them from the vendored info."""
    _, info = read_info()
    assert "lidar_sweeps" not in info  # a scene start: mmdet3d pads with the key frame
    results = {"lidar_points": {"lidar_path": str(LIDAR_FILE)}, "timestamp": info["timestamp"]}
    results = LoadPointsFromFile(coord_type="LIDAR", load_dim=5, use_dim=5)(results)
    results = LoadPointsFromMultiSweeps(sweeps_num=9, use_dim=[0, 1, 2, 3, 4], pad_empty_sweeps=True,
                                        remove_close=True, test_mode=True)(results)
    results = PointsRangeFilter(point_cloud_range=POINT_CLOUD_RANGE)(results)
    return results["points"].tensor.numpy()


def test_our_loader_gives_mmdet3d_points_at_a_scene_start(lidar_index):
    config = dataclasses.replace(real_data_config(), load_images=False, point_cloud_range=tuple(POINT_CLOUD_RANGE))
    ours = NuScenesDetectionDataset(config, SPLIT, "test", index=lidar_index).get(0).points.numpy()
    reference = mmdet3d_points()
    assert reference.shape == (248_174, 5)
    assert np.array_equal(ours, reference)


@pytest.mark.slow
def test_our_teacher_gives_mmdet3d_outputs_on_the_real_cloud(tmp_path):
    equivalence = load_tests_module("teacher/test_mmdet3d_equivalence.py")
    reference_model = equivalence.build_mmdet3d_centerpoint()
    reference_model.init_weights()
    equivalence.randomise(reference_model, seed=0)
    reference_model.eval()
    state_path = tmp_path / "mmdet3d_state_dict.pth"
    torch.save(reference_model.state_dict(), state_path)
    points = torch.from_numpy(mmdet3d_points())
    reference = equivalence.run_reference(reference_model, [points])
    ours = equivalence.run_ours(equivalence.our_teacher(state_path), [points])
    assert int(reference["num_pillars"]) == 7_896
    equivalence.assert_outputs_match(ours, reference)  # every stage and head output within 1e-4
