"""detections_to_results (LiDAR -> global records) by hand, and the metrics table."""

from __future__ import annotations

import numpy as np
import pytest

from distillbev.pipeline.data.types import Detections
from distillbev.pipeline.eval import detections_to_results, format_metrics_table
from distillbev.pipeline.geometry.transforms import make_transform, yaw_to_quaternion

# Ego at (100, 200, 0) facing global +y; LiDAR rotated -90 deg at (0.943713, 0, 1.84023) (the tiny dataroot's rig).
LIDAR_TO_EGO = make_transform(yaw_to_quaternion(-np.pi / 2), [0.943713, 0.0, 1.84023])
EGO_TO_GLOBAL = make_transform(yaw_to_quaternion(np.pi / 2), [100.0, 200.0, 0.0])


class FakeDataset:
    """The three things detections_to_results needs from a dataset."""

    sample_tokens = ["a", "b", "c"]

    def index_of(self, token):
        return self.sample_tokens.index(token)

    def poses(self, index):
        return LIDAR_TO_EGO, EGO_TO_GLOBAL


def test_lidar_box_to_global_record_by_hand():
    car = [-5.0, 9.056287, -0.34023, 4.5, 2.0, 1.6, np.deg2rad(120), 0.5, 2.0]
    detections = [Detections("a", np.array([car]), np.array([0.9]), np.array([0]), np.array([5]))]
    results = detections_to_results(detections, FakeDataset(), use_camera=True)
    assert results["meta"]["use_camera"] is True and results["meta"]["use_lidar"] is False
    assert set(results["results"]) == {"a", "b", "c"} and results["results"]["b"] == []
    (record,) = results["results"]["a"]
    np.testing.assert_allclose(record["translation"], [95.0, 210.0, 1.5], atol=1e-6)
    assert record["size"] == pytest.approx([2.0, 4.5, 1.6])  # [w, l, h]
    # LiDAR yaw 120 deg = global yaw 120 deg here: quaternion (cos 60, 0, 0, sin 60).
    np.testing.assert_allclose(record["rotation"], [0.5, 0.0, 0.0, np.sqrt(3) / 2], atol=1e-9)
    # LiDAR (0.5, 2.0) -> ego (2.0, -0.5) -> global (0.5, 2.0): both rotations cancel for this rig.
    np.testing.assert_allclose(record["velocity"], [0.5, 2.0], atol=1e-9)
    assert record["detection_name"] == "car" and record["attribute_name"] == "vehicle.moving"
    assert record["detection_score"] == pytest.approx(0.9) and isinstance(record["detection_score"], float)
    assert record["sample_token"] == "a"


def test_attribute_defaults_and_classes_without_attributes():
    boxes = np.tile([1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], (3, 1))
    # truck without a predicted attribute, barrier with one (ignored), pedestrian with one.
    detections = [Detections("b", boxes, np.array([0.3, 0.2, 0.1]), np.array([1, 5, 8]), np.array([-1, 3, 2]))]
    records = detections_to_results(detections, FakeDataset())["results"]["b"]
    assert [r["attribute_name"] for r in records] == ["vehicle.parked", "", "pedestrian.moving"]
    no_attributes = [Detections("c", boxes[:1], np.array([0.5]), np.array([7]))]
    assert detections_to_results(no_attributes, FakeDataset())["results"]["c"][0]["attribute_name"] == \
        "cycle.without_rider"


def test_limits_sorting_and_non_finite_boxes():
    boxes = np.tile([1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], (503, 1))
    boxes[3, 0] = np.nan
    boxes[4, 3] = 0.0  # zero size is clamped: the devkit asserts sizes > 0
    scores = np.linspace(0.0, 1.0, 503)
    records = detections_to_results([Detections("a", boxes, scores, np.zeros(503, dtype=int))],
                                    FakeDataset())["results"]["a"]
    assert len(records) == 500
    record_scores = [r["detection_score"] for r in records]
    assert record_scores == sorted(record_scores, reverse=True) and record_scores[0] == 1.0
    assert min(min(r["size"]) for r in records) > 0
    assert all(np.isfinite(r["translation"]).all() for r in records)


def test_seven_column_boxes_and_bad_inputs():
    boxes7 = np.array([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    record = detections_to_results([Detections("a", boxes7, np.array([0.5]), np.array([9]))],
                                   FakeDataset())["results"]["a"][0]
    assert record["velocity"] == [0.0, 0.0] and record["detection_name"] == "traffic_cone"
    with pytest.raises(ValueError, match="more than one"):
        detections_to_results([Detections("a", boxes7, np.ones(1), np.zeros(1, dtype=int))] * 2, FakeDataset())
    with pytest.raises(ValueError, match="same length"):
        detections_to_results([Detections("a", boxes7, np.ones(2), np.zeros(1, dtype=int))], FakeDataset())
    with pytest.raises(ValueError):
        detections_to_results([Detections("zzz", boxes7, np.ones(1), np.zeros(1, dtype=int))], FakeDataset())


def test_format_metrics_table():
    classes = ["car", "barrier"]
    summary = {
        "mean_ap": 0.5, "nd_score": 0.61,
        "tp_errors": {"trans_err": 0.1, "scale_err": 0.2, "orient_err": 0.3, "vel_err": 0.4, "attr_err": 0.5},
        "mean_dist_aps": {"car": 0.75, "barrier": 0.25},
        "label_tp_errors": {name: {"trans_err": 0.1, "scale_err": 0.2, "orient_err": 0.3, "vel_err": float("nan"),
                                   "attr_err": 0.5} for name in classes},
    }
    table = format_metrics_table(summary)
    lines = table.splitlines()
    assert lines[0] == "mAP:  0.5000" and lines[1] == "NDS:  0.6100"
    assert "mATE: 0.1000" in table and "mAAE: 0.5000" in table
    car_line = next(line for line in lines if line.startswith("car"))
    assert "0.7500" in car_line and "nan" in car_line
