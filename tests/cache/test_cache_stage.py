"""`distillbev extract-teacher` end to end on the hand-made tiny nuScenes dataroot with a tiny random teacher."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.errors import CheckpointError, DataError


CONFIG = """
data:
  version: v1.0-tiny
  num_sweeps: 2
  point_cloud_range: [-12.8, -12.8, -5.0, 12.8, 12.8, 3.0]
  load_images: false
model:
  point_cloud_range: [-12.8, -12.8, -5.0, 12.8, 12.8, 3.0]
  pillar_size: [0.4, 0.4]
  pillar_channels: 8
  backbone_channels: [8, 16, 16]
  backbone_layer_nums: [1, 1, 1]
  neck_channels: [8, 8, 8]
  neck_upsample_strides: [1.0, 2.0, 4.0]
  head:
    grid: {x_min: -12.8, x_max: 12.8, y_min: -12.8, y_max: 12.8, resolution: 0.8}
    shared_channels: 8
    head_channels: 8
"""


@pytest.fixture(scope="module")
def tiny_dataroot(tiny_slice):
    return tiny_slice.dataroot


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    folder = tmp_path_factory.mktemp("teacher")
    config_path = folder / "teacher.yaml"
    config_path.write_text(CONFIG)
    torch.manual_seed(0)
    model = CenterPointTeacher(load_config(TeacherExperimentConfig, config_path).model)
    checkpoint = folder / "teacher.pth"
    torch.save(model.state_dict(), checkpoint)
    return config_path, checkpoint, model


def _invoke(*args: str):
    from distillbev.stages.extract_teacher import command

    return CliRunner().invoke(command, list(args), catch_exceptions=True)


@pytest.mark.slow
def test_extract_teacher_command(tmp_path, tiny_dataroot, teacher_files):
    config_path, checkpoint, model = teacher_files
    store = tmp_path / "cache.zarr"
    arguments = ["--config", str(config_path), "--dataroot", str(tiny_dataroot), "--checkpoint", str(checkpoint),
                 "--cache", str(store), "--split", "tiny_train", "--views", "2", "--seed", "5", "--workers", "2"]
    result = _invoke(*arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "complete: 4 sample-views (2 samples x 2 views)" in result.output
    cache = TeacherCache.open(store)
    assert cache.num_samples == 2 and cache.num_views == 2
    assert cache.manifest["layers"]["neck"] == {"channels": 24, "shape": [32, 32], "resolution": 0.8, "stride": 2.0}
    assert cache.manifest["views"]["rotation_range"] == [-0.3925, 0.3925]
    assert cache.manifest["dataset"]["split"] == "tiny_train"
    assert cache.manifest["storage"]["dtype"] == "int8" and cache.manifest["storage"]["int8_error"] == 0.03
    targets = cache.read(1, 1)
    assert targets.features["backbone2"].shape == (16, 8, 8) and targets.heatmap.shape == (10, 32, 32)
    assert targets.occupancy.shape == (64, 64) and targets.occupancy.any()
    head = cache.read_teacher_head()
    assert all(torch.equal(head[k], v) for k, v in model.pts_bbox_head.state_dict().items())
    again = _invoke(*arguments)
    assert again.exit_code == 0 and "already complete" in again.output
    refused = _invoke(*arguments[:-4], "--dtype", "fp16")
    assert refused.exit_code != 0 and 'storage.dtype: "int8" -> "fp16"' in str(refused.exception)
    refused = _invoke(*arguments[:-4], "--int8-error", "0.02")
    assert refused.exit_code != 0 and "storage.int8_error: 0.03 -> 0.02" in str(refused.exception)


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path, tiny_dataroot, teacher_files):
    config_path, _, _ = teacher_files
    result = _invoke("--config", str(config_path), "--dataroot", str(tiny_dataroot), "--checkpoint",
                     str(tmp_path / "missing.pth"), "--cache", str(tmp_path / "c.zarr"), "--split", "tiny_train")
    assert isinstance(result.exception, CheckpointError)
    assert "missing.pth" in str(result.exception)
    assert not (tmp_path / "c.zarr").exists()


def test_preflight_reports_checkpoint_and_data_problems_together(tmp_path, teacher_files):
    config_path, _, _ = teacher_files
    result = _invoke("--config", str(config_path), "--dataroot", str(tmp_path), "--checkpoint",
                     str(tmp_path / "missing.pth"), "--cache", str(tmp_path / "c.zarr"), "--split", "tiny_train")
    assert isinstance(result.exception, DataError)
    text = str(result.exception)
    assert text.startswith("pre-flight found 2 problems in the inputs: ") and "\n" not in text
    assert "missing.pth" in text and "v1.0-tiny: version folder not found" in text
    assert text.endswith("nothing was computed or written")
    assert not (tmp_path / "c.zarr").exists()
