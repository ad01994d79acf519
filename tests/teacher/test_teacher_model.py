"""CenterPoint-pillar teacher: pillar features by hand, hard-voxelization emulation, per-layer shapes."""

from __future__ import annotations

import pytest
import torch
from teacher_helpers import random_points

from distillbev.pipeline.teacher.model import FEATURE_NAMES, CenterPointTeacher
from distillbev.pipeline.teacher.pillars import PillarFeatureNet, scatter_to_canvas

# 2 x 2 canvas of 0.4 m pillars over [0, 0.8) x [0, 0.8), z in [-5, 3): pillar centre z = -1.
RANGE = (0.0, 0.0, -5.0, 0.8, 0.8, 3.0)
P1 = [0.1, 0.1, 0.0, 0.5, 0.0]  # pillar (ix 0, iy 0)
P2 = [0.3, 0.2, 1.0, 0.7, 0.1]  # pillar (ix 0, iy 0)
P3 = [0.5, 0.1, -1.0, 0.2, 0.05]  # pillar (ix 1, iy 0)
OUTSIDE = [[1.0, 0.1, 0.0, 0.1, 0.0], [0.1, 0.1, 3.5, 0.1, 0.0], [-0.1, 0.5, 0.0, 0.1, 0.0]]


def identity_net(**kwargs) -> PillarFeatureNet:
    """A pillar net whose layer is relu(decorated features): identity linear, BN in eval with unit stats."""
    net = PillarFeatureNet(5, 11, RANGE, (0.4, 0.4), **kwargs)
    with torch.no_grad():
        net.pfn_layers[0].linear.weight.copy_(torch.eye(11))
    net.pfn_layers[0].norm.eps = 0.0
    return net.eval()


def test_pillar_features_match_hand_computation():
    net = identity_net()
    points = torch.tensor([P1, P2, P3, *OUTSIDE])
    pillars = net([points])
    canvas, occupancy = scatter_to_canvas(pillars, 1, 2, 2)
    # pillar A: point mean (0.2, 0.15, 0.5), centre (0.2, 0.2, -1); p1 and p2 decorated, then relu, then max
    p1 = [0.1, 0.1, 0.0, 0.5, 0.0, -0.1, -0.05, -0.5, -0.1, -0.1, 1.0]
    p2 = [0.3, 0.2, 1.0, 0.7, 0.1, 0.1, 0.05, 0.5, 0.1, 0.0, 2.0]
    expected_a = torch.tensor(p1).clamp(min=0).maximum(torch.tensor(p2).clamp(min=0))
    # pillar B: one point, zero cluster offset, centre (0.6, 0.2, -1)
    expected_b = torch.tensor([0.5, 0.1, -1.0, 0.2, 0.05, 0, 0, 0, -0.1, -0.1, 0.0]).clamp(min=0)
    assert canvas.shape == (1, 11, 2, 2)
    torch.testing.assert_close(canvas[0, :, 0, 0], expected_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(canvas[0, :, 0, 1], expected_b, atol=1e-6, rtol=0)
    assert canvas[0, :, 1].abs().sum() == 0
    assert occupancy.tolist() == [[[True, True], [False, False]]]


def test_point_order_does_not_change_dynamic_pillars():
    net = identity_net()
    a = scatter_to_canvas(net([torch.tensor([P1, P2, P3])]), 1, 2, 2)[0]
    b = scatter_to_canvas(net([torch.tensor([P3, P2, P1])]), 1, 2, 2)[0]
    torch.testing.assert_close(a, b)


def test_hard_voxelization_keeps_first_points_and_pads():
    net = identity_net(max_points_per_pillar=1)
    canvas = scatter_to_canvas(net([torch.tensor([P1, P2, P3])]), 1, 2, 2)[0]
    # only p1 counts in pillar A (first in input order): its own mean, so zero cluster offset
    expected_a = torch.tensor([0.1, 0.1, 0.0, 0.5, 0.0, 0, 0, 0, -0.1, -0.1, 1.0]).clamp(min=0)
    torch.testing.assert_close(canvas[0, :, 0, 0], expected_a, atol=1e-6, rtol=0)

    padded = identity_net(max_points_per_pillar=3)
    with torch.no_grad():
        padded.pfn_layers[0].norm.bias.fill_(0.05)  # a zero padding row now maps to 0.05 in every channel
    canvas = scatter_to_canvas(padded([torch.tensor([P1, P2, P3])]), 1, 2, 2)[0]
    p1 = torch.tensor([0.1, 0.1, 0.0, 0.5, 0.0, -0.1, -0.05, -0.5, -0.1, -0.1, 1.0]) + 0.05
    p2 = torch.tensor([0.3, 0.2, 1.0, 0.7, 0.1, 0.1, 0.05, 0.5, 0.1, 0.0, 2.0]) + 0.05
    expected_a = p1.clamp(min=0.05).maximum(p2.clamp(min=0.05))
    torch.testing.assert_close(canvas[0, :, 0, 0], expected_a, atol=1e-6, rtol=0)
    assert bool((canvas[0, :, 0, 1] >= 0.05 - 1e-7).all())


def test_hard_voxelization_keeps_first_pillars_per_sample():
    net = identity_net(max_pillars=1)
    clouds = [torch.tensor([P3, P1, P2]), torch.tensor([P1, P3])]
    _, occupancy = scatter_to_canvas(net(clouds), 2, 2, 2)
    # sample 0: pillar B comes first; sample 1: pillar A comes first
    assert occupancy[0].tolist() == [[False, True], [False, False]]
    assert occupancy[1].tolist() == [[True, False], [False, False]]


def test_small_config_layer_shapes(synthetic_experiment):
    config = synthetic_experiment.model
    torch.manual_seed(0)
    model = CenterPointTeacher(config).eval()
    points = [random_points(300, config.point_cloud_range, seed=s) for s in (0, 1)]
    with torch.no_grad():
        outputs = model(points)
    assert {k: tuple(v.shape) for k, v in outputs.features.items()} == {
        "backbone0": (2, 32, 80, 80), "backbone1": (2, 64, 40, 40), "backbone2": (2, 128, 20, 20),
        "neck": (2, 192, 80, 80)}
    assert tuple(outputs.features) == FEATURE_NAMES
    assert {k: (2, c, *model.feature_shapes[k]) for k, c in model.feature_channels.items()} == {
        k: tuple(v.shape) for k, v in outputs.features.items()}
    assert outputs.heatmap.shape == (2, 10, 80, 80)
    assert [tuple(t["heatmap"].shape[1:2]) for t in outputs.head] == [(1,), (2,), (2,), (1,), (2,), (2,)]
    assert {n: tuple(v.shape) for n, v in outputs.head[0].items() if n != "heatmap"} == {
        "reg": (2, 2, 80, 80), "height": (2, 1, 80, 80), "dim": (2, 3, 80, 80), "rot": (2, 2, 80, 80),
        "vel": (2, 2, 80, 80)}
    assert outputs.occupancy.shape == (2, 160, 160) and outputs.occupancy.dtype == torch.bool
    assert 0 < int(outputs.occupancy[0].sum()) <= 300
    torch.testing.assert_close(outputs.heatmap[:, :1], outputs.head[0]["heatmap"])
    assert bool((outputs.features["neck"] >= 0).all())  # SECONDFPN ends in ReLU


def test_samples_are_independent_in_eval(tiny_config):
    torch.manual_seed(0)
    model = CenterPointTeacher(tiny_config).eval()
    a = random_points(200, tiny_config.point_cloud_range, seed=3)
    b = random_points(150, tiny_config.point_cloud_range, seed=4)
    with torch.no_grad():
        alone = model([a])
        together = model([a, b])
    for name in FEATURE_NAMES:
        torch.testing.assert_close(together.features[name][:1], alone.features[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.heatmap[:1], alone.heatmap, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_config_builds_and_runs(nuscenes_experiment):
    config = nuscenes_experiment.model
    model = CenterPointTeacher(config).eval()
    assert sum(p.numel() for p in model.parameters()) == 5_982_854  # mmdet3d's pillar02 model: 5.98M
    with torch.no_grad():
        outputs = model([random_points(400, config.point_cloud_range)])
    assert {k: tuple(v.shape) for k, v in outputs.features.items()} == {
        "backbone0": (1, 64, 256, 256), "backbone1": (1, 128, 128, 128), "backbone2": (1, 256, 64, 64),
        "neck": (1, 384, 128, 128)}
    assert outputs.heatmap.shape == (1, 10, 128, 128)
    assert outputs.occupancy.shape == (1, 512, 512)
