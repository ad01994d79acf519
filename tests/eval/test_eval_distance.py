"""AP by ego-distance band: the devkit's scores per band on the tiny dataroot, with predictions kept only near."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distillbev.cli import main
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.types import Detections
from distillbev.pipeline.eval import detections_to_results, distinct_gt_scores
from distillbev.pipeline.eval.distance import evaluate_by_distance, format_distance_table

SPLIT = "tiny_val"


def ego_distances(dataset, index: int) -> np.ndarray:
    """(K,) xy distance of each GT box centre from the ego origin (LiDAR frame -> ego frame)."""
    boxes, _, _ = dataset.annotations(index)
    lidar_to_ego, _ = dataset.poses(index)
    centres = boxes[:, :3] @ lidar_to_ego[:3, :3].T + lidar_to_ego[:3, 3]
    return np.hypot(centres[:, 0], centres[:, 1])


@pytest.fixture()
def near_only(tiny_slice, tmp_path):
    """Results holding exactly the GT boxes closer than 10 m (distinct scores); the dataset; GT counts per band."""
    config = DataConfig(dataroot=str(tiny_slice.dataroot), version=tiny_slice.version, num_sweeps=0,
                        load_images=False)
    dataset = NuScenesDetectionDataset(config, SPLIT, "test")
    detections, near, far = [], {}, {}
    annotations = [dataset.annotations(i) for i in range(len(dataset))]
    scores = distinct_gt_scores([len(boxes) for boxes, _, _ in annotations])
    for i, ((boxes, labels, attributes), score) in enumerate(zip(annotations, scores)):
        keep = ego_distances(dataset, i) < 10.0
        for label, close in zip(labels, keep):
            counts = near if close else far
            counts[int(label)] = counts.get(int(label), 0) + 1
        detections.append(Detections(dataset.sample_tokens[i], boxes[keep], score[keep], labels[keep],
                                     attributes[keep]))
    path = tmp_path / "near.json"
    path.write_text(json.dumps(detections_to_results(detections, dataset)))
    return path, dataset, near, far


def test_predictions_kept_near_score_one_near_and_zero_far(near_only, tmp_path) -> None:
    path, dataset, near, far = near_only
    # hand-counted on the tiny dataroot: 8 boxes within 10 m (4 per sample), 12 beyond
    assert sum(near.values()) == 8 and sum(far.values()) == 12
    bands = evaluate_by_distance(path, dataset, tmp_path / "eval", edges=(0.0, 10.0))
    assert [(b.low, b.high) for b in bands] == [(0.0, 10.0), (10.0, math.inf)]
    first, second = bands
    assert (first.gt_boxes, first.predictions) == (8, 8) and (second.gt_boxes, second.predictions) == (12, 0)
    assert len(first.class_ap) == len(near) and all(ap >= 0.99 for ap in first.class_ap.values())
    assert len(second.class_ap) == len(far) and all(ap == 0.0 for ap in second.class_ap.values())
    assert first.mean_ap >= 0.99 and second.mean_ap == 0.0
    stored = json.loads((tmp_path / "eval" / "metrics_by_distance.json").read_text())
    assert [row["label"] for row in stored] == ["0-10 m", ">= 10 m"] and stored[1]["high"] is None
    table = format_distance_table(bands, classes=("car",))
    assert table.splitlines()[2].startswith("| 0-10 m | 8 | 100.0 |")


def test_evaluate_command_prints_the_distance_table(near_only, tmp_path, capsys) -> None:
    path, dataset, _, _ = near_only
    args = ["evaluate", "--dataroot", str(dataset.index.dataroot), "--version", dataset.index.version, "--split",
            SPLIT, "--results", str(path), "--out", str(tmp_path / "cli"), "--by-distance"]
    main([*args, "0,10"])
    out = capsys.readouterr().out
    assert "| 0-10 m | 8 | 100.0 |" in out and "| >= 10 m | 12 | 0.0 |" in out
    with pytest.raises(SystemExit) as exit_:
        main([*args, "10,5"])
    assert exit_.value.code == 2 and "must be >= 0 and increasing" in capsys.readouterr().err
