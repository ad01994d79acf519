"""Hand-made cameras and tiny batches for the camera-student tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_helpers import camera_looking_along, intrinsics

from distillbev.pipeline.data.types import Batch


@pytest.fixture
def make_batch():
    """A factory for a random-image Batch with six cameras around the car (and a previous frame if asked)."""

    def build(image_size: tuple[int, int], batch_size: int = 2, num_cameras: int = 6, previous: bool = False,
              seed: int = 0) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        height, width = image_size
        camera_intrinsics = intrinsics(0.9 * width, (width - 1) / 2, (height - 1) / 2)
        cameras = torch.stack([camera_looking_along(2 * np.pi * n / num_cameras, 1.6) for n in range(num_cameras)])
        geometry = dict(
            intrinsics=camera_intrinsics.expand(batch_size, num_cameras, 3, 3).clone(),
            camera_to_lidar=cameras.expand(batch_size, num_cameras, 4, 4).clone(),
            image_aug=torch.eye(3).expand(batch_size, num_cameras, 3, 3).clone(),
        )
        points = [torch.cat([torch.rand(3000, 2, generator=generator) * 40 - 20,
                             torch.rand(3000, 2, generator=generator),
                             torch.zeros(3000, 1)], dim=1) for _ in range(batch_size)]  # key-frame points: lag 0
        boxes = torch.tensor([[6.0, 3.0, 0.8, 4.2, 1.9, 1.6, 0.3, 1.0, 0.0],
                              [-8.0, -5.0, 0.9, 0.7, 0.7, 1.8, 1.0, 0.0, 0.0]])
        batch = Batch(
            sample_tokens=[f"token{b}" for b in range(batch_size)], points=points,
            gt_boxes=[boxes.clone() for _ in range(batch_size)],
            gt_labels=[torch.tensor([0, 8]) for _ in range(batch_size)],
            gt_attributes=[torch.tensor([6, 3]) for _ in range(batch_size)],
            bev_aug=torch.eye(4).expand(batch_size, 4, 4).clone(),
            lidar_to_ego=[np.eye(4)] * batch_size, ego_to_global=[np.eye(4)] * batch_size,
            images=torch.randn(batch_size, num_cameras, 3, height, width, generator=generator), **geometry)
        if previous:
            batch.prev_images = torch.randn(batch_size, num_cameras, 3, height, width, generator=generator)
            batch.prev_intrinsics = geometry["intrinsics"].clone()
            batch.prev_camera_to_lidar = geometry["camera_to_lidar"].clone()
            batch.prev_image_aug = geometry["image_aug"].clone()
            shift = torch.eye(4)
            shift[0, 3] = -1.6  # the car drove 1.6 m forward: previous-frame points sit 1.6 m further back now
            batch.prev_lidar_to_lidar = shift.expand(batch_size, 4, 4).clone()
        return batch

    return build


@pytest.fixture
def hand_camera():
    """The hand-made camera builders: (camera_looking_along(yaw, height), intrinsics(focal, cx, cy))."""
    return camera_looking_along, intrinsics
