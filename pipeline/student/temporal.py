"""BEVDet4D's two-frame fusion: warp the previous frame's BEV feature into the current frame and concatenate.

Both frames' BEV features are built in their own LiDAR frame under the same BEV augmentation. A current cell at q
(augmented current frame) shows the world point p = bev_aug^-1 q, which in the previous LiDAR frame is
prev_lidar_to_lidar^-1 p and in the previous BEV map sits at bev_aug prev_lidar_to_lidar^-1 bev_aug^-1 q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.bev import BEVRange
from .bev_encoder import residual_stage


def align_previous_bev(previous: torch.Tensor, prev_lidar_to_lidar: torch.Tensor, bev_aug: torch.Tensor,
                       bev: BEVRange) -> torch.Tensor:
    """Resample the previous frame's BEV feature (B, C, Y, X) onto the current frame's grid (bilinear, zeros
    outside). prev_lidar_to_lidar (B, 4, 4) previous LiDAR -> current LiDAR; bev_aug (B, 4, 4)."""
    batch, _, num_y, num_x = previous.shape
    device = previous.device
    aug = bev_aug.double()
    current_to_previous = aug @ torch.linalg.inv(prev_lidar_to_lidar.double()) @ torch.linalg.inv(aug)  # (B, 4, 4)
    grid = bev.grid().with_shape(num_y, num_x)
    x = grid.x_min + (torch.arange(num_x, dtype=torch.float64, device=device) + 0.5) * grid.resolution
    y = grid.y_min + (torch.arange(num_y, dtype=torch.float64, device=device) + 0.5) * grid.resolution
    cell_y, cell_x = torch.meshgrid(y, x, indexing="ij")  # (Y, X)
    # Cell centres on the z = 0 plane: the BEV alignment is planar, as in BEVDet4D.
    centres = torch.stack([cell_x, cell_y, torch.zeros_like(cell_x), torch.ones_like(cell_x)], dim=-1)  # (Y, X, 4)
    sampled = torch.einsum("bij,yxj->byxi", current_to_previous, centres)[..., :2]  # (B, Y, X, 2) metres
    # grid_sample with align_corners=False puts -1/+1 on the outer cell edges, i.e. on x_min / x_max.
    normalised_x = (sampled[..., 0] - grid.x_min) / (grid.x_max - grid.x_min) * 2.0 - 1.0
    normalised_y = (sampled[..., 1] - grid.y_min) / (grid.y_max - grid.y_min) * 2.0 - 1.0
    sample_grid = torch.stack([normalised_x, normalised_y], dim=-1).to(previous.dtype)  # (B, Y, X, 2)
    return F.grid_sample(previous, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class TemporalFusion(nn.Module):
    """Refine both frames with a shared stride-1 residual stage (optional), align the previous one, concatenate.

    `pre_process_before_align` (the reference's `before=True`, default) refines the previous frame in its own grid
    and then resamples it; otherwise the resampled previous frame is refined. The previous frame carries no
    gradient: the caller computes it under no_grad and this module detaches it again (DistillBEV's
    `detach=True`), so only the current frame trains the image network.
    """

    def __init__(self, channels: int, bev: BEVRange, pre_process: bool = True, pre_process_before_align: bool = True):
        super().__init__()
        self.bev = bev
        self.pre_process = residual_stage(channels, channels, 2, 1) if pre_process else None
        self.before_align = pre_process_before_align
        self.out_channels = 2 * channels

    def forward(self, current: torch.Tensor, previous: torch.Tensor, prev_lidar_to_lidar: torch.Tensor,
                bev_aug: torch.Tensor) -> torch.Tensor:
        """current, previous (B, C, Y, X) -> (B, 2C, Y, X) = [current, aligned previous]."""
        previous = previous.detach()
        if self.pre_process is not None:
            current = self.pre_process(current)
            if self.before_align:
                with torch.no_grad():
                    previous = self.pre_process(previous)
        aligned = align_previous_bev(previous, prev_lidar_to_lidar, bev_aug, self.bev)
        if self.pre_process is not None and not self.before_align:
            with torch.no_grad():
                aligned = self.pre_process(aligned)
        return torch.cat([current, aligned.detach()], dim=1)
