"""LiDAR-frame detections -> the nuScenes detection results JSON (global frame) that the devkit evaluates."""

from __future__ import annotations

import logging

import numpy as np

from ..data.classes import ATTRIBUTES, DETECTION_CLASSES, attribute_from_speed
from ..data.types import Detections
from ..geometry.transforms import yaw_to_quaternion

logger = logging.getLogger(__name__)

MAX_BOXES_PER_SAMPLE = 500  # the devkit's detection_cvpr_2019 limit (it asserts on more)
MIN_BOX_SIZE = 1e-3  # the devkit asserts sizes > 0
CLASSES_WITHOUT_ATTRIBUTE = ("barrier", "traffic_cone")


def boxes_to_global_records(detections: Detections, lidar_to_ego: np.ndarray,
                            ego_to_global: np.ndarray) -> list[dict]:
    """One sample's boxes (K, 7 or 9) in the key-frame LiDAR frame -> result records in the global frame.

    Boxes stay upright: the global yaw is the direction of the box's heading vector after the rigid transform
    (the real LiDAR is tilted by about a degree; its pitch/roll are not box attributes). Velocity (vx, vy, 0) is
    rotated to the global frame. Size is written [w, l, h], rotation (w, x, y, z), as the devkit expects.
    Non-finite boxes are dropped; at most `MAX_BOXES_PER_SAMPLE` boxes are kept, highest scores first.
    """
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(len(detections.boxes), -1)  # (K, 7|9)
    scores = np.asarray(detections.scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(detections.labels, dtype=np.int64).reshape(-1)
    attributes = (np.full(len(boxes), -1, dtype=np.int64) if detections.attributes is None
                  else np.asarray(detections.attributes, dtype=np.int64).reshape(-1))
    if not (len(boxes) == len(scores) == len(labels) == len(attributes)):
        raise ValueError(f"sample {detections.sample_token}: boxes {boxes.shape}, scores {scores.shape}, labels "
                         f"{labels.shape} and attributes {attributes.shape} must have the same length")
    if len(boxes) == 0:
        return []
    if boxes.shape[1] == 7:
        boxes = np.concatenate([boxes, np.zeros((len(boxes), 2))], axis=1)
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        logger.warning("sample %s: dropping %d non-finite boxes", detections.sample_token, int((~finite).sum()))
    order = np.argsort(-scores[finite], kind="stable")[:MAX_BOXES_PER_SAMPLE]
    keep = np.flatnonzero(finite)[order]
    boxes, scores, labels, attributes = boxes[keep], scores[keep], labels[keep], attributes[keep]

    global_from_lidar = ego_to_global @ lidar_to_ego
    rotation = global_from_lidar[:3, :3]
    centres = boxes[:, :3] @ rotation.T + global_from_lidar[:3, 3]  # (K, 3)
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], axis=1) @ rotation.T
    yaws = np.arctan2(heading[:, 1], heading[:, 0])
    velocities = np.concatenate([boxes[:, 7:9], np.zeros((len(boxes), 1))], axis=1) @ rotation.T  # (K, 3)
    sizes = np.maximum(boxes[:, [4, 3, 5]], MIN_BOX_SIZE)  # (l, w, h) -> [w, l, h]

    records = []
    for k in range(len(boxes)):
        name = DETECTION_CLASSES[int(labels[k])]
        if name in CLASSES_WITHOUT_ATTRIBUTE:
            attribute = ""
        elif attributes[k] >= 0:
            attribute = ATTRIBUTES[int(attributes[k])]
        else:  # no predicted attribute: mmdet3d's rule on the predicted speed
            attribute = attribute_from_speed(name, float(np.hypot(boxes[k, 7], boxes[k, 8])))
        records.append({
            "sample_token": detections.sample_token,
            "translation": [float(v) for v in centres[k]],
            "size": [float(v) for v in sizes[k]],
            "rotation": [float(v) for v in yaw_to_quaternion(float(yaws[k]))],
            "velocity": [float(velocities[k, 0]), float(velocities[k, 1])],
            "detection_name": name,
            "detection_score": float(scores[k]),
            "attribute_name": attribute,
        })
    return records


def detections_to_results(detections: list[Detections], dataset, use_camera: bool = False,
                          use_lidar: bool = False) -> dict:
    """Detections of some samples of `dataset` -> {"meta": ..., "results": {sample_token: [records]}}.

    Every sample token of the dataset's split gets an entry (empty when it has no detections), as the devkit
    requires. `dataset` needs `sample_tokens`, `index_of(token)` and `poses(index)` (NuScenesDetectionDataset).
    """
    results: dict[str, list[dict]] = {token: [] for token in dataset.sample_tokens}
    seen: set[str] = set()
    for item in detections:
        if item.sample_token in seen:
            raise ValueError(f"sample {item.sample_token} has more than one Detections entry; merge them first")
        seen.add(item.sample_token)
        lidar_to_ego, ego_to_global = dataset.poses(dataset.index_of(item.sample_token))
        results[item.sample_token] = boxes_to_global_records(item, lidar_to_ego, ego_to_global)
    meta = {"use_camera": bool(use_camera), "use_lidar": bool(use_lidar), "use_radar": False, "use_map": False,
            "use_external": False}
    return {"meta": meta, "results": results}


def distinct_gt_scores(box_counts: list[int]) -> list[np.ndarray]:
    """Scores for GT boxes fed in as predictions: distinct and descending over the whole split, in (0, 1].

    With tied scores the devkit's sort leaves the order to chance and its TP errors come out as the error of one
    match; distinct scores make every matched box count (box k of N overall scores 1 - k / N).
    """
    total = sum(box_counts)
    scores = 1.0 - np.arange(total, dtype=np.float64) / max(total, 1)
    return list(np.split(scores, np.cumsum(box_counts)[:-1])) if box_counts else []
