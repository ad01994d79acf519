"""SECOND: the 2D BEV backbone of PointPillars / CenterPoint-pillar.

Each stage is Conv3x3(stride)-BN-ReLU followed by `layer_num` x Conv3x3-BN-ReLU, stored as one nn.Sequential so
parameter names are `blocks.{stage}.{3*j}` (conv) and `blocks.{stage}.{3*j+1}` (BN), as in mmdet3d.
"""

from __future__ import annotations

import torch
from torch import nn


class SECOND(nn.Module):
    """Canvas (B, C_in, Y, X) -> one feature map per stage, (B, C_i, Y / s_i, X / s_i) with cumulative stride s_i."""

    def __init__(self, in_channels: int, out_channels: tuple[int, ...], layer_nums: tuple[int, ...],
                 strides: tuple[int, ...], eps: float = 1e-3, momentum: float = 0.01):
        super().__init__()
        blocks = []
        stage_inputs = [in_channels, *out_channels[:-1]]
        for stage_in, stage_out, layer_num, stride in zip(stage_inputs, out_channels, layer_nums, strides):
            layers: list[nn.Module] = [
                nn.Conv2d(stage_in, stage_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(stage_out, eps=eps, momentum=momentum),
                nn.ReLU(inplace=True),
            ]
            for _ in range(layer_num):
                layers += [nn.Conv2d(stage_out, stage_out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(stage_out, eps=eps, momentum=momentum),
                           nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs
