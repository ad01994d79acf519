"""Views: drawn reproducibly per sample, view 0 the identity, and the cache replays them exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from cache_fakes import FakeTeacher, base_points, probe_teacher, run_extract

from distillbev.pipeline.cache.manifest import ViewConfig, view_augmentations
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.geometry.bev import BEVAugmentation, sample_bev_augmentation


def test_views_are_reproducible_and_start_with_identity():
    views = ViewConfig(count=4, seed=11)
    first = view_augmentations(views, 5)
    assert first[0] == BEVAugmentation() and first[0].is_identity
    assert first == view_augmentations(views, 5)
    assert first != view_augmentations(views, 6)
    rng = np.random.default_rng([11, 5])  # the documented recipe, drawn by hand
    by_hand = [sample_bev_augmentation(rng, (-0.3925, 0.3925), (0.95, 1.05), 0.5, 0.5) for _ in range(3)]
    assert first[1:] == by_hand
    assert all(-0.3925 <= a.rotation <= 0.3925 and 0.95 <= a.scale <= 1.05 for a in first[1:])


def test_flip_view_replays_the_teacher_on_the_flipped_cloud(tmp_path, teacher):
    from cache_fakes import make_manifest

    # a view set with certain flips and no rotation/scale noise, so the flip view is exactly known
    manifest = make_manifest(teacher, views=2, seed=3)
    manifest["views"].update(rotation_range=[0.0, 0.0], scale_range=[1.0, 1.0], flip_x_prob=1.0, flip_y_prob=0.0)
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest, threads_per_worker=1)
    cache = TeacherCache.open(path)
    targets = cache.read(2, 1)
    assert targets.bev_aug == BEVAugmentation(0.0, 1.0, True, False)
    flipped = base_points(2).copy()
    flipped[:, 1] = -flipped[:, 1]  # flip_x mirrors y -> -y
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            outputs = FakeTeacher()([torch.from_numpy(flipped).float()])
    finally:
        torch.set_num_threads(previous)
    for layer, values in targets.features.items():
        assert torch.equal(values, outputs.features[layer][0].half().float()), layer
    identity = cache.read(2, 0)
    # the flipped cloud is not the mirrored identity map in general: the cache must hold the real flip view
    assert not torch.equal(identity.features["neck"].flip(-2), targets.features["neck"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("distillbev.pipeline.teacher.model") is None,
                    reason="the CenterPoint teacher module is not available")
def test_real_teacher_flip_view_replay(tmp_path):
    from distillbev.pipeline.cache.extract import extract_teacher_cache
    from distillbev.pipeline.cache.manifest import build_manifest
    from distillbev.pipeline.geometry.bev import BEVGrid
    from distillbev.pipeline.heads.center_head import CenterHeadConfig
    from distillbev.pipeline.teacher.config import TeacherModelConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    torch.manual_seed(0)
    config = TeacherModelConfig(point_cloud_range=(-6.4, -6.4, -5.0, 6.4, 6.4, 3.0), pillar_size=(0.4, 0.4),
                                pillar_channels=8, backbone_channels=(8, 16, 16), backbone_layer_nums=(1, 1, 1),
                                neck_channels=(8, 8, 8), neck_upsample_strides=(1.0, 2.0, 4.0),
                                head=CenterHeadConfig(grid=BEVGrid(-6.4, 6.4, -6.4, 6.4, 0.8), shared_channels=8,
                                                      head_channels=8))
    model = CenterPointTeacher(config).eval()
    layers = ["backbone1", "backbone2", "neck"]

    def points_of(index, bev_aug):
        rng = np.random.default_rng(index)
        points = np.zeros((400, 5))
        points[:, :2] = rng.uniform(-5.0, 5.0, size=(400, 2))
        points[:, 2:4] = rng.uniform(0, 1, size=(400, 2))
        return f"s{index}", torch.from_numpy(bev_aug.apply_points(points)).float()

    grid = config.canvas_grid
    specs, heatmap_shape, occupancy_shape = probe_teacher(model, points_of(0, BEVAugmentation())[1], grid, layers)
    assert [s.shape for s in specs] == [(8, 8), (4, 4), (16, 16)] and occupancy_shape == (32, 32)
    # extract-teacher builds the manifest from the model's static shapes: they must match what it outputs
    assert [model.feature_shapes[name] for name in layers] == [s.shape for s in specs]
    assert heatmap_shape == config.head_grid.shape and occupancy_shape == grid.shape
    manifest = build_manifest(teacher_config={}, checkpoint_path="", checkpoint_sha256="", grid=grid, layers=specs,
                              heatmap_shape=heatmap_shape, occupancy_shape=occupancy_shape, dtype="fp16",
                              views=ViewConfig(count=2, seed=0, rotation_range=(0.0, 0.0), scale_range=(1.0, 1.0),
                                               flip_x_prob=0.0, flip_y_prob=1.0),
                              dataset={"dataroot": "", "version": "", "split": "", "num_sweeps": 1,
                                       "fingerprint": "", "point_loading": {}}, sample_tokens=["s0"])
    path = tmp_path / "cache.zarr"
    extract_teacher_cache(path, manifest=manifest, sample_tokens=["s0"],
                          head_state={k: v.numpy() for k, v in model.pts_bbox_head.state_dict().items()},
                          run_teacher=model, load_points=points_of, threads_per_worker=1, progress=False)
    cache = TeacherCache.open(path)
    targets = cache.read(0, 1)
    assert targets.bev_aug == BEVAugmentation(0.0, 1.0, False, True)
    with torch.no_grad():
        outputs = model([points_of(0, BEVAugmentation(0.0, 1.0, False, True))[1]])
    for layer in layers:
        want = outputs.features[layer][0]
        assert torch.allclose(targets.features[layer], want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert torch.equal(targets.occupancy, outputs.occupancy[0])
    assert set(cache.read_teacher_head()) == set(model.pts_bbox_head.state_dict())
