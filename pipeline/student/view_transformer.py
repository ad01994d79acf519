"""Lift-splat: frustum geometry (augmented pixel, depth) -> BEV cell, and vectorised BEV pooling.

Pixel convention: pixel centres sit at integer coordinates (OpenCV / nuScenes intrinsics). Image feature cell
(i, j) at stride s covers augmented pixels [j*s, (j+1)*s) x [i*s, (i+1)*s), so its centre is j*s + (s-1)/2.
A frustum point (u, v, d) in augmented pixels is mapped: undo `image_aug` -> original pixels -> camera ray
K^-1 [u, v, 1] scaled to depth d (camera z) -> `camera_to_lidar` -> `bev_aug` -> BEV cell of the student's grid, so
the lifted features follow the same BEV augmentation as the GT boxes and the teacher's points.
Depth bin k covers [start + k*step, start + (k+1)*step) and is lifted at its centre (start + (k+0.5)*step), so the
lifted depth and the depth supervision target (depth_net.depth_targets) agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..geometry.bev import BEVRange
from .config import DepthBins


@dataclass
class CameraGeometry:
    """Camera geometry of one frame of a batch.

    intrinsics (B, N, 3, 3) of the original image; camera_to_lidar (B, N, 4, 4) camera -> LiDAR frame (before BEV
    augmentation); image_aug (B, N, 3, 3) original pixels -> augmented pixels; bev_aug (B, 4, 4) LiDAR -> augmented
    LiDAR frame.
    """

    intrinsics: torch.Tensor
    camera_to_lidar: torch.Tensor
    image_aug: torch.Tensor
    bev_aug: torch.Tensor


def depth_bin_centres(bins: DepthBins, device: torch.device | None = None) -> torch.Tensor:
    """(D,) metres: the depth each bin is lifted at."""
    index = torch.arange(bins.count, dtype=torch.float32, device=device)
    return bins.start + (index + 0.5) * bins.step


def feature_pixel_centres(image_size: tuple[int, int], stride: int,
                          device: torch.device | None = None) -> torch.Tensor:
    """(Hf, Wf, 2) augmented-image pixel (u, v) at the centre of every image feature cell."""
    height, width = image_size
    v = torch.arange(height // stride, dtype=torch.float32, device=device) * stride + (stride - 1) / 2.0
    u = torch.arange(width // stride, dtype=torch.float32, device=device) * stride + (stride - 1) / 2.0
    grid_v, grid_u = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([grid_u, grid_v], dim=-1)


def undo_image_aug(pixels: torch.Tensor, image_aug: torch.Tensor) -> torch.Tensor:
    """Augmented pixels (B, N, ..., 2) -> original-image pixels, with image_aug (B, N, 3, 3) original -> augmented."""
    batch, cameras = image_aug.shape[:2]
    inverse = torch.linalg.inv(image_aug.double()).to(pixels.dtype)  # (B, N, 3, 3)
    extra_dims = pixels.dim() - 3
    homogeneous = torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)  # (B, N, ..., 3)
    inverse = inverse.view(batch, cameras, *([1] * extra_dims), 3, 3)
    original = (inverse @ homogeneous.unsqueeze(-1)).squeeze(-1)  # (B, N, ..., 3)
    # Dividing by the third coordinate keeps this exact for a general homography, not only an affine map.
    return original[..., :2] / original[..., 2:3]


def frustum_points(geometry: CameraGeometry, image_size: tuple[int, int], stride: int,
                   bins: DepthBins) -> torch.Tensor:
    """LiDAR-frame (BEV-augmented) xyz of every frustum point: (B, N, D, Hf, Wf, 3)."""
    device = geometry.intrinsics.device
    batch, cameras = geometry.intrinsics.shape[:2]
    pixels = feature_pixel_centres(image_size, stride, device)  # (Hf, Wf, 2)
    pixels = pixels.expand(batch, cameras, *pixels.shape)  # (B, N, Hf, Wf, 2)
    original = undo_image_aug(pixels, geometry.image_aug.float())  # (B, N, Hf, Wf, 2)
    homogeneous = torch.cat([original, torch.ones_like(original[..., :1])], dim=-1)  # (B, N, Hf, Wf, 3)
    # Augmented LiDAR <- camera, then the camera ray at unit depth rotated into that frame.
    camera_to_bev = geometry.bev_aug.float()[:, None] @ geometry.camera_to_lidar.float()  # (B, N, 4, 4)
    ray_to_bev = camera_to_bev[..., :3, :3] @ torch.linalg.inv(geometry.intrinsics.float())  # (B, N, 3, 3)
    directions = (ray_to_bev[:, :, None, None] @ homogeneous.unsqueeze(-1)).squeeze(-1)  # (B, N, Hf, Wf, 3)
    origins = camera_to_bev[..., :3, 3]  # (B, N, 3)
    depths = depth_bin_centres(bins, device)  # (D,)
    return (origins[:, :, None, None, None, :]
            + depths.view(1, 1, -1, 1, 1, 1) * directions[:, :, None])  # (B, N, D, Hf, Wf, 3)


def bev_pool(depth: torch.Tensor, context: torch.Tensor, points: torch.Tensor, bev: BEVRange) -> torch.Tensor:
    """Splat depth-weighted context into BEV cells by summation (BEVPoolv2's gather + scatter, no Python loop).

    depth (B*N, D, Hf, Wf) probabilities; context (B*N, C, Hf, Wf); points (B, N, D, Hf, Wf, 3) from
    `frustum_points`. Returns (B, C, Y, X). Points outside the grid or the z slab are dropped.
    """
    batch, cameras, bins, height, width, _ = points.shape
    channels = context.shape[1]
    grid = bev.grid()
    num_y, num_x = grid.shape
    flat_points = points.reshape(-1, 3)  # (B*N*D*Hf*Wf, 3)
    ix = torch.floor((flat_points[:, 0] - bev.x_min) / bev.resolution).long()
    iy = torch.floor((flat_points[:, 1] - bev.y_min) / bev.resolution).long()
    z = flat_points[:, 2]
    valid = ((ix >= 0) & (ix < num_x) & (iy >= 0) & (iy < num_y) & (z >= bev.z_min) & (z < bev.z_max))
    kept = torch.nonzero(valid, as_tuple=False).squeeze(1)  # (P,) flat frustum indices
    # A flat frustum index is ((b*N + n)*D + d)*Hf*Wf + pixel; the context row is (b*N + n)*Hf*Wf + pixel.
    pixels_per_camera = height * width
    camera_index = kept // (bins * pixels_per_camera)
    pixel_index = kept % pixels_per_camera
    batch_index = camera_index // cameras
    cell = batch_index * (num_y * num_x) + iy[kept] * num_x + ix[kept]  # (P,)
    depth_weight = depth.reshape(-1)[kept]  # (P,)
    context_rows = context.permute(0, 2, 3, 1).reshape(-1, channels)  # (B*N*Hf*Wf, C)
    values = depth_weight[:, None] * context_rows[camera_index * pixels_per_camera + pixel_index]  # (P, C)
    pooled = torch.zeros(batch * num_y * num_x, channels, dtype=values.dtype, device=values.device)
    pooled = pooled.index_add(0, cell, values)
    return pooled.view(batch, num_y, num_x, channels).permute(0, 3, 1, 2).contiguous()  # (B, C, Y, X)


class LiftSplat(nn.Module):
    """Lift (depth distribution x context) and splat onto the BEV grid; holds only geometry settings."""

    def __init__(self, image_size: tuple[int, int], stride: int, bins: DepthBins, bev: BEVRange):
        super().__init__()
        self.image_size = tuple(image_size)
        self.stride = stride
        self.bins = bins
        self.bev = bev

    def forward(self, depth: torch.Tensor, context: torch.Tensor, geometry: CameraGeometry) -> torch.Tensor:
        """depth (B*N, D, Hf, Wf), context (B*N, C, Hf, Wf) -> BEV features (B, C, Y, X)."""
        expected = (self.image_size[0] // self.stride, self.image_size[1] // self.stride)
        if tuple(depth.shape[-2:]) != expected:
            raise ValueError(f"image feature map {tuple(depth.shape[-2:])} does not match image_size "
                             f"{self.image_size} / stride {self.stride} = {expected}")
        # Geometry and the splat sum stay float32 under a bf16 autocast: bf16 frustum coordinates would be off by
        # up to 0.25 m at 50 m (8 mantissa bits), and a bf16 sum of hundreds of frustum points per cell loses them.
        with torch.autocast(device_type=depth.device.type, enabled=False):
            points = frustum_points(geometry, self.image_size, self.stride, self.bins)
            return bev_pool(depth.float(), context.float(), points, self.bev)
