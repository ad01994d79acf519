"""Depth/context nets (BEVDet's 1x1 conv, BEVDepth's camera-aware net) and BEVDepth's LiDAR depth supervision.

BEVDepth's depth net feeds 27 camera parameters through BatchNorm1d and two MLPs whose outputs gate (SE) the depth
and context branches, so one network can serve cameras with different intrinsics and extrinsics. The deformable
conv of the original is replaced by a plain 3x3 conv (no deformable conv in plain torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DepthBins
from .image_neck import conv_bn_relu
from .resnet import BasicBlock
from .view_transformer import CameraGeometry

NUM_CAMERA_PARAMETERS = 27


def camera_parameters(geometry: CameraGeometry) -> torch.Tensor:
    """(B*N, 27): fx, fy, cx, cy; image_aug rows 0-1 (6); bev_aug xy block + z scale (5); camera_to_lidar 3x4 (12)."""
    batch, cameras = geometry.intrinsics.shape[:2]
    intrinsics = geometry.intrinsics.float()
    image_aug = geometry.image_aug.float()
    bev_aug = geometry.bev_aug.float()[:, None].expand(batch, cameras, 4, 4)
    parts = [
        intrinsics[..., 0, 0], intrinsics[..., 1, 1], intrinsics[..., 0, 2], intrinsics[..., 1, 2],
        image_aug[..., 0, 0], image_aug[..., 0, 1], image_aug[..., 0, 2],
        image_aug[..., 1, 0], image_aug[..., 1, 1], image_aug[..., 1, 2],
        bev_aug[..., 0, 0], bev_aug[..., 0, 1], bev_aug[..., 1, 0], bev_aug[..., 1, 1], bev_aug[..., 2, 2],
    ]
    stacked = torch.stack(parts, dim=-1)  # (B, N, 15)
    extrinsics = geometry.camera_to_lidar.float()[..., :3, :].reshape(batch, cameras, 12)  # (B, N, 12)
    return torch.cat([stacked, extrinsics], dim=-1).reshape(batch * cameras, NUM_CAMERA_PARAMETERS)


class PlainDepthNet(nn.Module):
    """BEVDet: one 1x1 conv predicting D depth logits and C context channels."""

    def __init__(self, in_channels: int, context_channels: int, depth_bins: int):
        super().__init__()
        self.depth_bins = depth_bins
        self.conv = nn.Conv2d(in_channels, depth_bins + context_channels, 1)

    def forward(self, features: torch.Tensor, geometry: CameraGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*N, Cin, Hf, Wf) -> depth logits (B*N, D, Hf, Wf), context (B*N, C, Hf, Wf)."""
        out = self.conv(features)
        return out[:, :self.depth_bins], out[:, self.depth_bins:]


class SqueezeExcite(nn.Module):
    """Gate a feature map channel-wise by a vector computed from the camera parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.expand = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor) -> torch.Tensor:
        """x (B*N, C, Hf, Wf), gate_input (B*N, C, 1, 1)."""
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(gate_input))))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (dilations 1, 6, 12, 18 plus a global-pool branch), as in BEVDepth."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList()
        for dilation in dilations:
            kernel = 1 if dilation == 1 else 3
            self.branches.append(nn.Sequential(
                nn.Conv2d(channels, channels, kernel, 1, 0 if kernel == 1 else dilation, dilation, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
        self.global_branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1, bias=False),
                                           nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(channels * (len(dilations) + 1), channels, 1, bias=False),
                                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        pooled = self.global_branch(x)
        outputs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outputs, dim=1))


class CameraAwareDepthNet(nn.Module):
    """BEVDepth's depth net: shared 3x3 reduction, camera-parameter SE gates, residual+ASPP depth branch."""

    def __init__(self, in_channels: int, mid_channels: int, context_channels: int, depth_bins: int):
        super().__init__()
        self.reduce_conv = conv_bn_relu(in_channels, mid_channels)
        self.parameter_norm = nn.BatchNorm1d(NUM_CAMERA_PARAMETERS)
        self.context_mlp = nn.Sequential(nn.Linear(NUM_CAMERA_PARAMETERS, mid_channels), nn.ReLU(inplace=True),
                                         nn.Linear(mid_channels, mid_channels))
        self.context_se = SqueezeExcite(mid_channels)
        self.context_conv = nn.Conv2d(mid_channels, context_channels, 1)
        self.depth_mlp = nn.Sequential(nn.Linear(NUM_CAMERA_PARAMETERS, mid_channels), nn.ReLU(inplace=True),
                                       nn.Linear(mid_channels, mid_channels))
        self.depth_se = SqueezeExcite(mid_channels)
        self.depth_conv = nn.Sequential(
            BasicBlock(mid_channels, mid_channels), BasicBlock(mid_channels, mid_channels),
            BasicBlock(mid_channels, mid_channels), ASPP(mid_channels),
            conv_bn_relu(mid_channels, mid_channels),
            nn.Conv2d(mid_channels, depth_bins, 1),
        )

    def forward(self, features: torch.Tensor, geometry: CameraGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*N, Cin, Hf, Wf) -> depth logits (B*N, D, Hf, Wf), context (B*N, C, Hf, Wf)."""
        parameters = self.parameter_norm(camera_parameters(geometry).to(features.dtype))  # (B*N, 27)
        x = self.reduce_conv(features)
        context = self.context_conv(self.context_se(x, self.context_mlp(parameters)[..., None, None]))
        depth = self.depth_conv(self.depth_se(x, self.depth_mlp(parameters)[..., None, None]))
        return depth, context


def depth_targets(points: list[torch.Tensor], geometry: CameraGeometry, image_size: tuple[int, int],
                  stride: int, bins: DepthBins) -> tuple[torch.Tensor, torch.Tensor]:
    """LiDAR points projected into every augmented image -> one-hot depth bins at the feature stride.

    points: list of B (P_b, >=3) in the BEV-augmented LiDAR frame (Sample.points). A point lands on the augmented
    pixel (round(u), round(v)); each feature cell keeps the minimum camera depth of its stride x stride pixels, and
    that depth's bin floor((d - start) / step) is the target (BEVDepth). Cells with no point, or whose depth is
    outside the bins, are invalid.
    Returns one_hot (B*N, D, Hf, Wf) float and valid (B*N, Hf, Wf) bool.
    """
    batch, cameras = geometry.intrinsics.shape[:2]
    height, width = image_size
    feature_h, feature_w = height // stride, width // stride
    device = geometry.intrinsics.device
    camera_to_bev = geometry.bev_aug.double()[:, None] @ geometry.camera_to_lidar.double()  # (B, N, 4, 4)
    bev_to_camera = torch.linalg.inv(camera_to_bev)
    # The projection is done in float64 so a point on a pixel boundary rounds the same way on every device.
    image_projection = geometry.image_aug.double() @ geometry.intrinsics.double()  # (B, N, 3, 3)
    min_depth = torch.full((batch * cameras * feature_h * feature_w,), float("inf"), dtype=torch.float64,
                           device=device)
    for b in range(batch):  # a loop over the (small) batch only; points differ in count per sample
        xyz = points[b][:, :3].double()  # (P, 3)
        in_camera = xyz @ bev_to_camera[b, :, :3, :3].transpose(1, 2) + bev_to_camera[b, :, None, :3, 3]  # (N, P, 3)
        depth = in_camera[..., 2]  # (N, P)
        pixel = in_camera @ image_projection[b].transpose(1, 2)  # (N, P, 3) homogeneous augmented pixels
        safe_depth = torch.where(depth > 1e-6, pixel[..., 2], torch.ones_like(depth))
        u = torch.round(pixel[..., 0] / safe_depth)
        v = torch.round(pixel[..., 1] / safe_depth)
        valid = (depth > 1e-6) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        camera_index = torch.arange(cameras, device=device)[:, None].expand_as(depth)
        row = (v.clamp(0, height - 1) // stride).long()
        col = (u.clamp(0, width - 1) // stride).long()
        flat = ((b * cameras + camera_index) * feature_h + row) * feature_w + col  # (N, P)
        min_depth.scatter_reduce_(0, flat[valid], depth[valid], reduce="amin", include_self=True)
    min_depth = min_depth.view(batch * cameras, feature_h, feature_w)
    bin_index = torch.floor((min_depth - bins.start) / bins.step)
    valid = torch.isfinite(min_depth) & (bin_index >= 0) & (bin_index < bins.count)
    one_hot = F.one_hot(torch.where(valid, bin_index, torch.zeros_like(bin_index)).long(), bins.count)
    one_hot = one_hot.permute(0, 3, 1, 2).float() * valid[:, None].float()  # (B*N, D, Hf, Wf)
    return one_hot, valid


def depth_bce_loss(depth_probabilities: torch.Tensor, one_hot: torch.Tensor, valid: torch.Tensor,
                   weight: float) -> torch.Tensor:
    """BEVDepth's depth BCE as DistillBEV computes it: BCE over every bin of valid cells, averaged over all
    B*N*D*Hf*Wf elements (mmdet's weighted mean), times `weight` (loss_depth_weight = 100).

    depth_probabilities (B*N, D, Hf, Wf) in [0, 1]; one_hot (B*N, D, Hf, Wf); valid (B*N, Hf, Wf).
    """
    # BCE in float32 with clamped probabilities: log(0) would give inf on a confident wrong bin.
    probabilities = depth_probabilities.float().clamp(1e-6, 1.0 - 1e-6)
    elementwise = F.binary_cross_entropy(probabilities, one_hot.float(), reduction="none")
    mask = valid[:, None].to(elementwise.dtype)
    return weight * (elementwise * mask).sum() / elementwise.numel()
