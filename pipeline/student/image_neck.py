"""BEVDet's image neck: fuse the stride-32 and stride-16 backbone features into one stride-16 feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImageNeck(nn.Module):
    """Upsample the stride-32 map x2, concatenate with the stride-16 map, two 3x3 conv-BN-ReLU (FPN_LSS layout)."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels[0] + in_channels[1], out_channels),
            conv_bn_relu(out_channels, out_channels),
        )

    def forward(self, stride16: torch.Tensor, stride32: torch.Tensor) -> torch.Tensor:
        """(B*N, C3, H/16, W/16), (B*N, C4, H/32, W/32) -> (B*N, C, H/16, W/16)."""
        upsampled = F.interpolate(stride32, size=stride16.shape[-2:], mode="bilinear", align_corners=True)
        return self.convs(torch.cat([stride16, upsampled], dim=1))
