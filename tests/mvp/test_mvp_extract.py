"""`distillbev extract-teacher` with an MVP teacher: 17-dim points through the same cache, named in its manifest;
a missing virtual-point file stops the pre-flight before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.loading import load_nuscenes, read_points, split_sample_tokens
from distillbev.pipeline.data.preflight import check_split_inputs
from distillbev.pipeline.data.virtual_points import virtual_path, write_virtual_points

from test_mvp_loader import hand_made

SPLIT = "synth_train"
CONFIG = """
data:
  version: v1.0-synthetic
  train_split: synth_train
  val_split: synth_val
  num_sweeps: 2
  point_features: mvp
  point_cloud_range: [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
  load_images: false
model:
  point_cloud_range: [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
  point_features: 17
  pillar_size: [0.8, 0.8]
  pillar_channels: 8
  backbone_channels: [8, 16, 16]
  backbone_layer_nums: [1, 1, 1]
  neck_channels: [8, 8, 8]
  neck_upsample_strides: [1.0, 2.0, 4.0]
  head:
    grid: {x_min: -25.6, x_max: 25.6, y_min: -25.6, y_max: 25.6, resolution: 1.6}
    shared_channels: 8
    head_channels: 8
"""


@pytest.fixture()
def mvp_files(street_dataroot: Path, tmp_path: Path):
    """A copy of the tiny street world with a hand-made virtual-point file for every LiDAR record of the split, a
    tiny random MVP teacher's config and checkpoint."""
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    root = tmp_path / "data"
    shutil.copytree(street_dataroot, root)
    lidar = DataConfig(dataroot=str(root), version="v1.0-synthetic", num_sweeps=2, sweep_candidates=2,
                       load_images=False)
    index = NuScenesDetectionDataset(lidar, SPLIT, "test").index
    for i in range(len(index)):
        paths = [index.path(index.lidar, i)] + [index.path(index.sweeps, i, j) for j in range(index.sweep_counts[i])]
        for path in paths:
            write_virtual_points(virtual_path(path), hand_made(read_points(path, "test")))
    config_path = tmp_path / "teacher_mvp.yaml"
    config_path.write_text(CONFIG)
    torch.manual_seed(0)
    model = CenterPointTeacher(load_config(TeacherExperimentConfig, config_path).model)
    checkpoint = tmp_path / "teacher.pth"
    torch.save(model.state_dict(), checkpoint)
    return root, config_path, checkpoint


def _extract(root: Path, config_path: Path, checkpoint: Path, store: Path):
    from distillbev.stages.extract_teacher import command

    arguments = ["--config", str(config_path), "--dataroot", str(root), "--checkpoint", str(checkpoint), "--cache",
                 str(store), "--split", SPLIT, "--views", "2", "--workers", "1"]
    return CliRunner().invoke(command, arguments, catch_exceptions=True)


@pytest.mark.slow
def test_an_mvp_teacher_fills_the_same_cache_and_its_manifest_says_so(mvp_files, tmp_path) -> None:
    root, config_path, checkpoint = mvp_files
    store = tmp_path / "mvp.zarr"
    result = _extract(root, config_path, checkpoint, store)
    assert result.exit_code == 0, result.output + repr(result.exception)
    cache = TeacherCache.open(store)
    loading = cache.manifest["dataset"]["point_loading"]
    assert loading["point_features"] == "mvp" and loading["point_dims"] == 17
    assert cache.manifest["teacher"]["config"]["point_features"] == 17
    nusc = load_nuscenes(root, "v1.0-synthetic")
    tokens = split_sample_tokens(nusc, SPLIT)
    # the fingerprint covers the virtual files (the LiDAR-only fingerprint of the same split differs)
    assert cache.manifest["dataset"]["fingerprint"] == check_split_inputs(nusc, tokens, 2, 2, virtual=True).fingerprint
    assert cache.manifest["dataset"]["fingerprint"] != check_split_inputs(nusc, tokens, 2, 2).fingerprint
    targets = cache.read(0, 1)
    assert targets.heatmap.shape == (10, 32, 32) and np.isfinite(targets.features["neck"].numpy()).all()


def test_a_missing_virtual_file_stops_the_preflight_and_writes_nothing(mvp_files, tmp_path) -> None:
    root, config_path, checkpoint = mvp_files
    victim = sorted((root / "sweeps" / "LIDAR_TOP_VIRTUAL").iterdir())[0]
    victim.unlink()
    store = tmp_path / "refused.zarr"
    result = _extract(root, config_path, checkpoint, store)
    assert result.exit_code != 0 and not store.exists()
    message = str(result.exception)
    assert "pre-flight found 1 problem" in message and str(victim) in message
    assert "distillbev make-virtual-points" in message and "nothing was computed or written" in message
