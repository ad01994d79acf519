"""SECONDFPN: brings every SECOND stage to one resolution and concatenates them.

Stage i goes through `deblocks.{i}` = (upsampler, BN, ReLU). An upsample stride s >= 2 is a ConvTranspose2d with
kernel = stride = s; s <= 1 is a Conv2d with kernel = stride = round(1 / s) (mmdet3d's `use_conv_for_no_stride`).
No biases, like mmdet3d.
"""

from __future__ import annotations

import torch
from torch import nn


class SECONDFPN(nn.Module):
    """List of stage maps (B, C_i, Y_i, X_i) -> (B, sum(out_channels), Y, X)."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: tuple[int, ...],
                 upsample_strides: tuple[float, ...], eps: float = 1e-3, momentum: float = 0.01):
        super().__init__()
        deblocks = []
        for stage_in, stage_out, stride in zip(in_channels, out_channels, upsample_strides):
            if stride > 1:
                factor = int(round(stride))
                upsample: nn.Module = nn.ConvTranspose2d(stage_in, stage_out, factor, stride=factor, bias=False)
            else:
                factor = int(round(1 / stride))
                upsample = nn.Conv2d(stage_in, stage_out, factor, stride=factor, bias=False)
            deblocks.append(nn.Sequential(upsample, nn.BatchNorm2d(stage_out, eps=eps, momentum=momentum),
                                          nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([deblock(x) for deblock, x in zip(self.deblocks, stages)], dim=1)
