"""Typed containers passed between pipeline steps.

Shape letters (used in every docstring and in the cache's zarr `dimension_names`):
B batch, N cameras, C channels, D depth bins, H/W image rows/cols, Y/X BEV rows/cols, K boxes, P points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class CameraInputs:
    """The six camera images of one key frame and their geometry.

    images:        (N, 3, H, W) float32, normalised (ImageNet mean/std) after the image augmentation.
    intrinsics:    (N, 3, 3) camera intrinsics of the original full-size image.
    camera_to_lidar: (N, 4, 4) camera frame -> key-frame LiDAR frame (before BEV augmentation).
    image_aug:     (N, 3, 3) homogeneous 2D map from original pixels to augmented (resized/cropped) pixels.
    channels:      the N camera channel names.
    """

    images: torch.Tensor
    intrinsics: torch.Tensor
    camera_to_lidar: torch.Tensor
    image_aug: torch.Tensor
    channels: tuple[str, ...]


@dataclass
class Sample:
    """One key frame as the models see it, everything in the key-frame LiDAR frame.

    points:     (P, 5) float32 x, y, z, intensity, time lag [s] (key frame + sweeps), BEV-augmented, then
                cropped to the point-cloud range.
    depth_points: (P_key, 5) float32 every key-frame point, BEV-augmented, not cropped (BEVDepth's depth
                targets), or None when the sample has no cameras.
    gt_boxes:   (K, 9) float32 x, y, z, l, w, h, yaw, vx, vy (gravity centre), BEV-augmented.
    gt_labels:  (K,) int64 class ids (`classes.DETECTION_CLASSES`).
    gt_attributes: (K,) int64 attribute ids, -1 for none.
    bev_aug:    (4, 4) float32 BEV augmentation applied to points, boxes and (through `lidar_to_bev`) cameras.
    lidar_to_ego, ego_to_global: (4, 4) float64 of the key-frame LiDAR sample_data (for evaluation).
    prev_cameras: the previous key frame's cameras (4D students), their camera_to_lidar in *that* frame's LiDAR.
    prev_lidar_to_lidar: (4, 4) previous key-frame LiDAR frame -> current key-frame LiDAR frame.
    """

    sample_token: str
    timestamp: int
    points: torch.Tensor
    cameras: CameraInputs | None
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_attributes: torch.Tensor
    bev_aug: torch.Tensor
    lidar_to_ego: np.ndarray
    ego_to_global: np.ndarray
    prev_cameras: CameraInputs | None = None
    prev_lidar_to_lidar: torch.Tensor | None = None
    view_index: int = 0
    depth_points: torch.Tensor | None = None


@dataclass
class Batch:
    """A collated list of samples. Tensors with a fixed shape are stacked; variable-size ones stay lists.

    points: list of B (P_b, 5); depth_points: list of B (P_key_b, 5) or None; gt_boxes: list of B (K_b, 9);
    gt_labels / gt_attributes: lists of B (K_b,).
    images: (B, N, 3, H, W); intrinsics (B, N, 3, 3); camera_to_lidar (B, N, 4, 4); image_aug (B, N, 3, 3);
    bev_aug (B, 4, 4); prev_images etc. as images, or None; prev_lidar_to_lidar (B, 4, 4) or None.
    """

    sample_tokens: list[str]
    points: list[torch.Tensor]
    gt_boxes: list[torch.Tensor]
    gt_labels: list[torch.Tensor]
    gt_attributes: list[torch.Tensor]
    bev_aug: torch.Tensor
    lidar_to_ego: list[np.ndarray]
    ego_to_global: list[np.ndarray]
    view_indices: list[int] = field(default_factory=list)
    images: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    camera_to_lidar: torch.Tensor | None = None
    image_aug: torch.Tensor | None = None
    prev_images: torch.Tensor | None = None
    prev_intrinsics: torch.Tensor | None = None
    prev_camera_to_lidar: torch.Tensor | None = None
    prev_image_aug: torch.Tensor | None = None
    prev_lidar_to_lidar: torch.Tensor | None = None
    depth_points: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def _map_tensors(self, change) -> "Batch":
        """A copy with `change` applied to every tensor, in a field or a list field (numpy fields stay as they are)."""
        def apply(v):
            if isinstance(v, torch.Tensor):
                return change(v)
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                return [change(t) for t in v]
            return v
        return Batch(**{k: apply(v) for k, v in self.__dict__.items()})

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on `device` (asynchronous from pinned memory)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self, device=None) -> "Batch":
        """A copy in page-locked memory; the DataLoader's pin-memory thread calls it (pin_memory=True on CUDA)."""
        return self._map_tensors(lambda t: t.pin_memory())


@dataclass
class Detections:
    """Decoded boxes of one sample in the LiDAR frame (after undoing any BEV augmentation).

    boxes: (K, 9) x, y, z, l, w, h, yaw, vx, vy; scores: (K,); labels: (K,) class ids;
    attributes: (K,) attribute ids or -1 (then mmdet3d's speed rule picks one: `classes.attribute_from_speed`).
    """

    sample_token: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray | None = None
