"""Teacher checkpoints: strict round trip, mmdet3d-style files, and readable errors for every misfit."""

from __future__ import annotations

import hashlib

import pytest
import torch
from teacher_helpers import random_points, tiny_model_config

from distillbev.pipeline.config import to_dict
from distillbev.pipeline.errors import CheckpointError
from distillbev.pipeline.teacher.checkpoint import (checkpoint_sha256, load_teacher_checkpoint,
                                                    save_teacher_checkpoint)
from distillbev.pipeline.teacher.model import CenterPointTeacher


def randomised(config, seed: int) -> CenterPointTeacher:
    """A model with random weights and random BN statistics (so a lost tensor would show in the outputs)."""
    torch.manual_seed(seed)
    model = CenterPointTeacher(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                tensor.uniform_(-0.2, 0.2)
    return model.eval()


def test_round_trip_is_strict_and_exact(tmp_path, tiny_config):
    source = randomised(tiny_config, seed=1)
    path = save_teacher_checkpoint(source, tmp_path / "teacher.pth", tiny_config, {"epoch": 3})
    target = randomised(tiny_config, seed=2)
    report = load_teacher_checkpoint(target, path)
    assert report.source == "distillbev" and report.num_loaded == len(source.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert report.meta == {"epoch": 3} and report.config == to_dict(tiny_config)
    points = [random_points(300, tiny_config.point_cloud_range)]
    with torch.no_grad():
        expected, actual = source(points), target(points)
    for name in expected.features:
        assert torch.equal(expected.features[name], actual.features[name])
    assert torch.equal(expected.heatmap, actual.heatmap)
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_mmdet3d_style_file_with_ddp_prefix_loads(tmp_path, tiny_config):
    source = randomised(tiny_config, seed=1)
    payload = {"meta": {"mmdet3d_version": "1.4.0"},
               "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
               "optimizer": {"state": {}}}
    torch.save(payload, tmp_path / "mm.pth")
    target = randomised(tiny_config, seed=2)
    report = load_teacher_checkpoint(target, tmp_path / "mm.pth")
    assert report.source == "mmdet3d" and report.stripped_prefix == "module."
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)


def test_shape_mismatch_names_every_key_with_both_shapes(tmp_path, tiny_config):
    state = randomised(tiny_config, seed=1).state_dict()
    state["pts_voxel_encoder.pfn_layers.0.linear.weight"] = torch.zeros(16, 10)  # an old 10-feature pillar layer
    state["pts_bbox_head.shared_conv.bn.weight"] = torch.zeros(7)
    torch.save({"state_dict": state}, tmp_path / "old.pth")
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(randomised(tiny_config, seed=2), tmp_path / "old.pth")
    message = str(error.value)
    assert "2 parameter shape mismatch" in message
    assert "pts_voxel_encoder.pfn_layers.0.linear.weight: checkpoint [16, 10] vs model [16, 11]" in message
    assert "pts_bbox_head.shared_conv.bn.weight: checkpoint [7] vs model [16]" in message
    assert "legacy" in message


def test_missing_and_unexpected_keys(tmp_path, tiny_config):
    state = randomised(tiny_config, seed=1).state_dict()
    del state["pts_neck.deblocks.0.1.weight"]
    state["pts_neck.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    model = randomised(tiny_config, seed=2)
    with pytest.raises(CheckpointError) as error:
        load_teacher_checkpoint(model, tmp_path / "partial.pth")
    message = str(error.value)
    assert "1 missing key(s)" in message and "pts_neck.deblocks.0.1.weight" in message
    assert "1 unexpected key(s)" in message and "pts_neck.extra.weight" in message
    report = load_teacher_checkpoint(model, tmp_path / "partial.pth", strict=False)
    assert report.missing == ["pts_neck.deblocks.0.1.weight"] and report.unexpected == ["pts_neck.extra.weight"]


def test_missing_file_names_the_path(tmp_path, tiny_config):
    path = tmp_path / "nope" / "teacher.pth"
    with pytest.raises(CheckpointError, match="nope/teacher.pth: checkpoint file not found"):
        load_teacher_checkpoint(randomised(tiny_config, seed=0), path)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint_sha256(path)


def test_other_architecture_is_a_clear_error(tmp_path, tiny_config):
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64),
                   "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 512)}
    torch.save(resnet_like, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a CenterPoint-pillar teacher checkpoint.*conv1.weight"):
        load_teacher_checkpoint(randomised(tiny_config, seed=0), tmp_path / "resnet.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_teacher_checkpoint(randomised(tiny_config, seed=0), tmp_path / "garbage.pth")


def test_checkpoint_of_another_teacher_config_fails(tmp_path):
    small = randomised(tiny_model_config(), seed=0)
    save_teacher_checkpoint(small, tmp_path / "small.pth")
    wider = randomised(tiny_model_config(backbone_channels=(16, 32, 64)), seed=0)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_teacher_checkpoint(wider, tmp_path / "small.pth")
