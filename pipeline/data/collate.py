"""`collate_samples`: a list of `Sample`s -> one `Batch` (fixed shapes stacked, variable sizes kept as lists)."""

from __future__ import annotations

import torch

from .types import Batch, CameraInputs, Sample


def _stack_cameras(cameras: list[CameraInputs | None], what: str) -> tuple[torch.Tensor | None, ...]:
    """Stack per-sample cameras into (B, N, ...) tensors, or Nones when no sample has cameras."""
    present = [c is not None for c in cameras]
    if not any(present):
        return None, None, None, None
    if not all(present):
        raise ValueError(f"cannot batch samples where only some have {what}; load them with the same settings")
    return (torch.stack([c.images for c in cameras]),  # (B, N, 3, H, W)
            torch.stack([c.intrinsics for c in cameras]),  # (B, N, 3, 3)
            torch.stack([c.camera_to_lidar for c in cameras]),  # (B, N, 4, 4)
            torch.stack([c.image_aug for c in cameras]))  # (B, N, 3, 3)


def collate_samples(samples: list[Sample]) -> Batch:
    """DataLoader `collate_fn` for `NuScenesDetectionDataset`."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    images, intrinsics, camera_to_lidar, image_aug = _stack_cameras([s.cameras for s in samples], "cameras")
    prev_images, prev_intrinsics, prev_camera_to_lidar, prev_image_aug = _stack_cameras(
        [s.prev_cameras for s in samples], "previous-frame cameras")
    prev_lidar_to_lidar = None
    if prev_images is not None:
        prev_lidar_to_lidar = torch.stack([s.prev_lidar_to_lidar for s in samples])  # (B, 4, 4)
    return Batch(
        sample_tokens=[s.sample_token for s in samples],
        points=[s.points for s in samples],
        gt_boxes=[s.gt_boxes for s in samples],
        gt_labels=[s.gt_labels for s in samples],
        gt_attributes=[s.gt_attributes for s in samples],
        bev_aug=torch.stack([s.bev_aug for s in samples]),  # (B, 4, 4)
        lidar_to_ego=[s.lidar_to_ego for s in samples],
        ego_to_global=[s.ego_to_global for s in samples],
        view_indices=[s.view_index for s in samples],
        images=images,
        intrinsics=intrinsics,
        camera_to_lidar=camera_to_lidar,
        image_aug=image_aug,
        prev_images=prev_images,
        prev_intrinsics=prev_intrinsics,
        prev_camera_to_lidar=prev_camera_to_lidar,
        prev_image_aug=prev_image_aug,
        prev_lidar_to_lidar=prev_lidar_to_lidar,
        depth_points=None if any(s.depth_points is None for s in samples) else [s.depth_points for s in samples],
    )
