"""Trainable student-side adapters (dropped at test time) and the spatial-pool conv g.

- `UpsampleThreeLayerAdapter`: bilinear upsample (align_corners=True) then 3 x [1x1 conv -> BN -> ReLU],
  C_s -> C_s -> C_s -> C_t (the reference's `upsample_3layer` / `ThreeLayer`, BD L99-132, L275-288).
- `Conv1x1Adapter`: one 1x1 conv C_s -> C_t with bias, no BN/ReLU (BD L232-234); it upsamples bilinearly first
  only when the student grid is coarser than the teacher's (the reference's `upsample_1x1conv`).
- `ResampleConv1x1Adapter`: bilinear resampling (align_corners=False: the two grids share their outer edges) onto
  the teacher's (Y, X) at any ratio, then one 1x1 conv with bias; for a student grid that is no integer fraction of
  the teacher's over the same extent (BEVFormer's 200^2 at 0.512 m against a 128^2 teacher at 0.8 m).
- `SpatialPoolConv`: g, a 3x3 conv 1 -> 1 with bias and padding 1, one per layer (BD L348-351).
The teacher is never resized: the upsample factor is teacher size / student size, taken from the shapes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


def upsample_factor(student_shape: tuple[int, int], teacher_shape: tuple[int, int], pair_name: str) -> int:
    """The integer factor f with teacher (Y, X) = f * student (Y, X); a ConfigError if there is none."""
    (student_y, student_x), (teacher_y, teacher_x) = student_shape, teacher_shape
    factor_y, remainder_y = divmod(teacher_y, student_y)
    factor_x, remainder_x = divmod(teacher_x, student_x)
    if remainder_y or remainder_x or factor_y != factor_x or factor_y < 1:
        raise ConfigError(f"distill layer {pair_name!r}: expected the teacher grid to be the student grid times one "
                          f"integer factor (the teacher is never resized), found student {tuple(student_shape)} and "
                          f"teacher {tuple(teacher_shape)}; pick layers whose grids differ by 1, 2, 4, ...")
    return factor_y


def _upsample(factor: int) -> nn.Module:
    """Bilinear align_corners=True upsampling by `factor` (identity for 1)."""
    if factor == 1:
        return nn.Identity()
    return nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=True)


class UpsampleThreeLayerAdapter(nn.Module):
    """(B, C_s, Y, X) -> (B, C_t, f*Y, f*X): upsample, then three 1x1 conv-BN-ReLU blocks (hidden width C_s)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int) -> None:
        super().__init__()
        self.upsample = _upsample(factor)
        blocks = []
        widths = [in_channels, in_channels, in_channels, out_channels]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(width_in, width_out, kernel_size=1), nn.BatchNorm2d(width_out), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*blocks)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(self.upsample(features))


class Conv1x1Adapter(nn.Module):
    """(B, C_s, Y, X) -> (B, C_t, f*Y, f*X): (upsample when f > 1, then) one 1x1 conv with bias."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 1) -> None:
        super().__init__()
        self.upsample = _upsample(factor)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(self.upsample(features))


class ResampleConv1x1Adapter(nn.Module):
    """(B, C_s, Y, X) -> (B, C_t, Y_t, X_t): bilinear resampling onto the teacher grid, then one 1x1 conv with bias."""

    def __init__(self, in_channels: int, out_channels: int, teacher_shape: tuple[int, int]) -> None:
        super().__init__()
        self.teacher_shape = tuple(int(v) for v in teacher_shape)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        if tuple(features.shape[-2:]) != self.teacher_shape:
            features = F.interpolate(features, size=self.teacher_shape, mode="bilinear", align_corners=False)
        return self.conv(features)


class SpatialPoolConv(nn.Module):
    """g: (B, 1, Y, X) -> (B, 1, Y, X), a learnable 3x3 conv applied to the student's channel-mean map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=True)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.conv(pooled)


def build_adapter(kind: str, in_channels: int, out_channels: int, factor: int,
                  teacher_shape: tuple[int, int] | None = None) -> nn.Module:
    """The adapter named in `LayerPairConfig.adapter` (teacher_shape: (Y, X), needed by resample_conv1x1)."""
    if kind == "resample_conv1x1":
        if teacher_shape is None:
            raise ConfigError("distill adapter 'resample_conv1x1' needs the teacher feature's (Y, X)")
        return ResampleConv1x1Adapter(in_channels, out_channels, teacher_shape)
    if kind == "upsample_3layer":
        return UpsampleThreeLayerAdapter(in_channels, out_channels, factor)
    if kind == "conv1x1":
        return Conv1x1Adapter(in_channels, out_channels, factor)
    raise ConfigError(f"distill adapter: expected 'upsample_3layer', 'conv1x1' or 'resample_conv1x1', found {kind!r}")
