"""Hand-made cameras of the camera-student tests (imported by the test modules and conftest, under a name of its own:
`from conftest import` finds whichever test folder's conftest was imported first)."""

from __future__ import annotations

import numpy as np
import torch


def camera_looking_along(yaw: float, height: float = 0.0) -> torch.Tensor:
    """(4, 4) camera -> LiDAR for a level camera at (0, 0, height) whose optical axis points at `yaw` in the LiDAR
    frame (camera x right, y down, z forward)."""
    forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    transform = np.eye(4)
    transform[:3, :3] = np.stack([right, down, forward], axis=1)
    transform[2, 3] = height
    return torch.tensor(transform, dtype=torch.float32)


def intrinsics(focal: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])
