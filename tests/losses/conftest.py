"""Tiny factories for the DistillBEV loss tests: one conv1x1 layer pair on a 2x2 grid over a 2 m x 2 m extent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig
from distillbev.pipeline.losses.distill import DistillBEVLoss

EXTENT = (0.0, 2.0, 0.0, 2.0)  # 2 x 2 cells of 1 m


def set_identity(loss: DistillBEVLoss, name: str = "neck") -> None:
    """Make the conv1x1 adapter of `name` the identity and its g conv the identity (centre tap 1, bias 0)."""
    with torch.no_grad():
        conv = loss.layers[name].adapter.conv
        conv.weight.zero_()
        conv.weight[:, :, 0, 0].copy_(torch.eye(conv.weight.shape[0], conv.weight.shape[1]))
        conv.bias.zero_()
        spatial = loss.layers[name].spatial_conv
        if spatial is not None:
            spatial.conv.weight.zero_()
            spatial.conv.weight[0, 0, 1, 1] = 1.0
            spatial.conv.bias.zero_()


@pytest.fixture
def make_neck_loss():
    """Factory: a DistillBEVLoss with one identity conv1x1 'neck' pair of `channels` channels on a (Y, X) grid."""

    def make(channels: int = 2, shape: tuple[int, int] = (2, 2), use_false_positive: bool = False,
             extent: tuple[float, float, float, float] = EXTENT, **switches) -> DistillBEVLoss:
        pair = LayerPairConfig(student="neck", teacher="neck", adapter="conv1x1",
                               use_false_positive=use_false_positive)
        config = dataclasses.replace(DistillConfig(), layers=[pair], **switches)
        loss = DistillBEVLoss(config, {"neck": channels}, {"neck": channels}, {"neck": shape}, {"neck": shape},
                              extent)
        set_identity(loss)
        return loss

    return make
