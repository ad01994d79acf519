"""Spatial / channel attention on hand-computed maps, and the adapters' shapes and upsampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.losses.adapters import (Conv1x1Adapter, UpsampleThreeLayerAdapter, build_adapter,
                                                 upsample_factor)
from distillbev.pipeline.losses.attention import blend_spatial_attention, channel_attention, spatial_attention


def test_spatial_attention_by_hand():
    # (B=1, C=2, Y=1, X=2): cell 0 has |1|, |-1| -> mean 1 -> 1/0.5 = 2; cell 1 is zero -> 0.
    features = torch.tensor([[[[1.0, 0.0]], [[-1.0, 0.0]]]])
    attention = spatial_attention(features, temperature=0.5)
    e2 = math.exp(2.0)
    expected = torch.tensor([[[2 * e2 / (e2 + 1), 2 / (e2 + 1)]]])
    assert attention.shape == (1, 1, 2)
    assert torch.allclose(attention, expected)
    assert abs(float(attention.mean()) - 1.0) < 1e-6


def test_spatial_attention_mean_is_one_and_detached():
    features = torch.randn(2, 3, 4, 5, requires_grad=True)
    attention = spatial_attention(features, 0.5)
    assert not attention.requires_grad
    assert torch.allclose(attention.mean(dim=(1, 2)), torch.ones(2))


def test_blend_is_weighted_average():
    teacher, student = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    assert blend_spatial_attention(teacher, student, 1.0).tolist() == [[[1.0, 1.0]]]
    assert blend_spatial_attention(teacher, student, 3.0).tolist() == [[[0.5, 1.5]]]


def test_channel_attention_by_hand():
    # channel 0: |1|, |-3| -> mean 2 -> 4; channel 1: zeros -> 0; Ac = 2 * softmax([4, 0]).
    teacher = torch.tensor([[[[1.0, -3.0]], [[0.0, 0.0]]]], requires_grad=True)
    attention = channel_attention(teacher, 0.5)
    e4 = math.exp(4.0)
    assert torch.allclose(attention, torch.tensor([[2 * e4 / (e4 + 1), 2 / (e4 + 1)]]))
    assert not attention.requires_grad


def test_upsample_factor_from_shapes():
    assert upsample_factor((32, 32), (128, 128), "backbone1") == 4
    assert upsample_factor((8, 8), (16, 16), "backbone1") == 2
    assert upsample_factor((16, 16), (16, 16), "neck") == 1
    with pytest.raises(ConfigError, match="teacher is never resized"):
        upsample_factor((16, 16), (8, 8), "neck")
    with pytest.raises(ConfigError):
        upsample_factor((16, 16), (40, 40), "neck")


def test_three_layer_adapter_shapes_and_layers():
    adapter = build_adapter("upsample_3layer", in_channels=6, out_channels=4, factor=2)
    assert isinstance(adapter, UpsampleThreeLayerAdapter)
    convs = [m for m in adapter.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(6, 6, (1, 1)), (6, 6, (1, 1)),
                                                                             (6, 4, (1, 1))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in adapter.modules()) == 3
    out = adapter(torch.randn(2, 6, 3, 5))
    assert out.shape == (2, 4, 6, 10)
    assert bool((out >= 0).all())  # ends with ReLU


def test_conv1x1_adapter_upsamples_bilinear_align_corners():
    adapter = build_adapter("conv1x1", 2, 2, factor=2)
    assert isinstance(adapter, Conv1x1Adapter)
    with torch.no_grad():
        adapter.conv.weight.copy_(torch.eye(2)[:, :, None, None])
        adapter.conv.bias.zero_()
    features = torch.arange(8.0).reshape(1, 2, 2, 2)
    expected = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=True)
    assert torch.allclose(adapter(features), expected)
    # align_corners=True keeps the corner values exactly.
    assert float(adapter(features)[0, 0, -1, -1].detach()) == 3.0
    assert isinstance(build_adapter("conv1x1", 2, 3, factor=1).upsample, torch.nn.Identity)
    with pytest.raises(ConfigError):
        build_adapter("mlp", 2, 3, factor=1)
