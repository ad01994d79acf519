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


class FeaturePyramid(nn.Module):
    """mmdet's FPN as BEVFormer configures it: a 1x1 lateral conv per input level, top-down nearest upsampling and
    addition, a 3x3 output conv per level, then `num_extra` stride-2 3x3 convs on the last output (ReLU before each,
    add_extra_convs='on_output', relu_before_extra_convs=True). Convs have biases and no norm.

    forward: inputs, finest first, of (B*N, C_i, H_i, W_i) -> len(inputs) + num_extra maps (B*N, C, H_l, W_l).
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, num_extra: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels])
        self.extra = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
                                    for _ in range(num_extra)])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, inputs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral, inputs)]
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + F.interpolate(laterals[level],
                                                                      size=laterals[level - 1].shape[-2:],
                                                                      mode="nearest")
        outputs = [conv(x) for conv, x in zip(self.output, laterals)]
        for conv in self.extra:
            outputs.append(conv(F.relu(outputs[-1])))
        return outputs
