"""CenterHead outputs -> metric boxes: sigmoid heatmap, top-k per task, circle NMS, merge, undo BEV augmentation.

Positions decode as x = (ix + reg_x) * res + x_min (the inverse of `targets.encode_box`), dims as exp(dim),
yaw as atan2(sin, cos). Circle NMS is CenterPoint's: greedy by score, a box suppresses every lower-scored box of
the same task whose BEV centre lies within squared distance `radius` (the config value is compared with the
squared distance, as in CenterPoint's released configs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.types import Detections
from ..geometry.bev import BEVGrid


@dataclass
class DecodeSettings:
    """How raw head maps become detections (a plain view of the decode fields of `CenterHeadConfig`)."""

    grid: BEVGrid
    score_threshold: float
    top_k: int
    max_per_sample: int
    nms_type: str
    nms_radius: tuple[float, ...]
    post_max_size: int
    post_center_range: tuple[float, ...]


def circle_nms(centers: np.ndarray, scores: np.ndarray, radius_squared: float, post_max_size: int) -> np.ndarray:
    """Indices kept by greedy circle NMS (best first), at most `post_max_size`.

    centers: (K, 2) BEV centres; scores: (K,). A kept box suppresses lower-scored boxes whose squared centre
    distance is <= radius_squared.
    """
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank, index in enumerate(order):
        if suppressed[rank]:
            continue
        keep.append(index)
        if len(keep) >= post_max_size:
            break
        rest = order[rank + 1:]
        distance = ((centers[rest] - centers[index]) ** 2).sum(axis=1)
        suppressed[rank + 1:] |= distance <= radius_squared
    return np.asarray(keep, dtype=np.int64)


def decode_task(task_output: dict[str, torch.Tensor], grid: BEVGrid,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k boxes of one task for the whole batch.

    task_output: heatmap (B, C, Y, X) logits, reg (B, 2, Y, X), height (B, 1, ..), dim (B, 3, ..) log sizes,
    rot (B, 2, ..) sin/cos, vel (B, 2, ..). Returns boxes (B, K, 9), scores (B, K), class slot within the task (B, K).
    """
    heatmap = task_output["heatmap"].sigmoid()
    batch, num_classes, num_y, num_x = heatmap.shape
    k = min(top_k, num_classes * num_y * num_x)
    scores, flat = heatmap.reshape(batch, -1).topk(k, dim=1)  # (B, K) over C*Y*X
    classes = flat // (num_y * num_x)
    cell = flat % (num_y * num_x)
    iy, ix = cell // num_x, cell % num_x

    def gather(name: str) -> torch.Tensor:
        value = task_output[name]
        channels = value.shape[1]
        value = value.reshape(batch, channels, num_y * num_x)
        return value.gather(2, cell.unsqueeze(1).expand(batch, channels, k)).transpose(1, 2)  # (B, K, ch)

    reg, height, dim, rot, vel = (gather(n) for n in ("reg", "height", "dim", "rot", "vel"))
    x = (ix.to(reg.dtype) + reg[..., 0]) * grid.resolution + grid.x_min
    y = (iy.to(reg.dtype) + reg[..., 1]) * grid.resolution + grid.y_min
    yaw = torch.atan2(rot[..., 0], rot[..., 1])
    boxes = torch.cat([x[..., None], y[..., None], height, dim.exp(), yaw[..., None], vel], dim=-1)  # (B, K, 9)
    return boxes, scores, classes


def undo_bev_augmentation(boxes: np.ndarray, bev_aug: np.ndarray) -> np.ndarray:
    """Map boxes (K, 9) from the augmented frame back to the LiDAR frame of the sample.

    bev_aug: (4, 4) augmentation matrix (rotation, scale, flips) that was applied to the points.
    """
    if len(boxes) == 0 or np.allclose(bev_aug, np.eye(4)):
        return boxes
    linear = np.asarray(bev_aug, dtype=np.float64)[:3, :3]
    inverse = np.linalg.inv(linear)
    scale = abs(np.linalg.det(linear[:2, :2])) ** 0.5
    out = boxes.astype(np.float64).copy()
    out[:, :3] = boxes[:, :3] @ inverse.T
    out[:, 3:6] = boxes[:, 3:6] / scale
    direction = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1) @ inverse[:2, :2].T
    out[:, 6] = np.arctan2(direction[:, 1], direction[:, 0])
    out[:, 7:9] = boxes[:, 7:9] @ inverse[:2, :2].T
    return out.astype(boxes.dtype)


def decode_detections(head_outputs: list[dict[str, torch.Tensor]], settings: DecodeSettings,
                      task_class_ids: list[list[int]], sample_tokens: list[str],
                      bev_aug: torch.Tensor | np.ndarray | None = None) -> list[Detections]:
    """Decode a batch of CenterHead outputs into one `Detections` per sample (LiDAR frame, numpy).

    task_class_ids[t][c] is the global class id of class slot c of task t. bev_aug (B, 4, 4), if given, is undone.
    """
    per_sample: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in sample_tokens]
    low = np.asarray(settings.post_center_range[:3])
    high = np.asarray(settings.post_center_range[3:])
    for task_index, task_output in enumerate(head_outputs):
        with torch.no_grad():
            boxes, scores, classes = decode_task(task_output, settings.grid, settings.top_k)
        boxes_np = boxes.float().cpu().numpy()
        scores_np = scores.float().cpu().numpy()
        classes_np = classes.cpu().numpy()
        class_ids = np.asarray(task_class_ids[task_index], dtype=np.int64)
        for b in range(len(sample_tokens)):
            keep = scores_np[b] >= settings.score_threshold
            keep &= (boxes_np[b, :, :3] >= low).all(axis=1) & (boxes_np[b, :, :3] <= high).all(axis=1)
            task_boxes, task_scores = boxes_np[b][keep], scores_np[b][keep]
            task_labels = class_ids[classes_np[b][keep]]
            if settings.nms_type == "circle" and len(task_boxes):
                kept = circle_nms(task_boxes[:, :2], task_scores, settings.nms_radius[task_index],
                                  settings.post_max_size)
                task_boxes, task_scores, task_labels = task_boxes[kept], task_scores[kept], task_labels[kept]
            per_sample[b].append((task_boxes, task_scores, task_labels))
    augmentations = None if bev_aug is None else np.asarray(
        bev_aug.cpu().numpy() if isinstance(bev_aug, torch.Tensor) else bev_aug, dtype=np.float64)
    detections = []
    for b, token in enumerate(sample_tokens):
        boxes = np.concatenate([p[0] for p in per_sample[b]]) if per_sample[b] else np.zeros((0, 9), np.float32)
        scores = np.concatenate([p[1] for p in per_sample[b]]) if per_sample[b] else np.zeros(0, np.float32)
        labels = np.concatenate([p[2] for p in per_sample[b]]) if per_sample[b] else np.zeros(0, np.int64)
        order = np.argsort(-scores, kind="stable")[:settings.max_per_sample]
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        if augmentations is not None:
            boxes = undo_bev_augmentation(boxes, augmentations[b])
        detections.append(Detections(sample_token=token, boxes=boxes.astype(np.float32),
                                     scores=scores.astype(np.float32), labels=labels.astype(np.int64),
                                     attributes=None))
    return detections
