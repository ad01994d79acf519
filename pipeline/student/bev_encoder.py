"""The students' BEV encoder (BEVDet's ResNetForBEVDet) and BEV neck (FPN_LSS with the extra BN+ReLU).

Stages of residual BasicBlocks with strides 2, 2, 2 give backbone0 (Y/2), backbone1 (Y/4), backbone2 (Y/8); the
neck upsamples backbone2 to backbone0's size, concatenates, convolves and upsamples x2 back to the input grid. The
final BN+ReLU (DistillBEV's `extra_norm_act=True`) makes the pre-head feature non-negative like the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock


def residual_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNetForBEVDet stage: the first block changes width/stride through a plain 3x3 conv shortcut."""
    shortcut = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
    layers = [BasicBlock(in_channels, out_channels, stride, shortcut)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class BEVEncoder(nn.Module):
    """Residual BEV backbone; returns the three stage outputs."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (128, 256, 512),
                 blocks: tuple[int, ...] = (2, 2, 2), strides: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        stages = []
        current = in_channels
        for width, count, stride in zip(channels, blocks, strides):
            stages.append(residual_stage(current, width, count, stride))
            current = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(channels)

    def forward(self, bev: torch.Tensor) -> list[torch.Tensor]:
        """(B, Cin, Y, X) -> [(B, C0, Y/2, X/2), (B, C1, Y/4, X/4), (B, C2, Y/8, X/8)]."""
        outputs = []
        x = bev
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class BEVNeck(nn.Module):
    """FPN_LSS on BEV: fuse backbone2 (upsampled to backbone0) with backbone0, then upsample x2."""

    def __init__(self, low_channels: int, high_channels: int, out_channels: int = 256):
        super().__init__()
        mid = out_channels * 2  # FPN_LSS doubles the width when an extra upsample follows
        self.fuse = nn.Sequential(
            nn.Conv2d(low_channels + high_channels, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        )
        self.output = nn.Sequential(
            nn.Conv2d(mid, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )
        self.out_channels = out_channels

    def forward(self, backbone0: torch.Tensor, backbone2: torch.Tensor) -> torch.Tensor:
        """(B, C0, Y/2, X/2), (B, C2, Y/8, X/8) -> (B, out, Y, X)."""
        high = F.interpolate(backbone2, size=backbone0.shape[-2:], mode="bilinear", align_corners=True)
        x = self.fuse(torch.cat([high, backbone0], dim=1))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.output(x)
