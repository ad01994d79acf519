"""Teacher training: overfitting a fixed batch, the schedule, resumable run state, configs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from teacher_helpers import NUSCENES_CONFIG, SYNTHETIC_CONFIG, random_points, tiny_model_config

from distillbev.pipeline.config import load_config
from distillbev.pipeline.data.types import Batch
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.geometry.bev import BEVGrid
from distillbev.pipeline.heads.center_head import CenterHeadConfig
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherTrainConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.pipeline.teacher.train import (build_optimizer, build_scheduler, learning_rate_factor,
                                               load_run_state, save_run_state, train_one_epoch, train_step)


def micro_config():
    """+-6.4 m, 0.4 m pillars (32x32 canvas), head 16x16 at 0.8 m, two tasks: fast enough for a test loop."""
    head = CenterHeadConfig(grid=BEVGrid(-6.4, 6.4, -6.4, 6.4, 0.8), tasks=(("car",), ("pedestrian",)),
                            shared_channels=16, head_channels=8, nms_radius=(4.0, 0.175),
                            post_center_range=(-10.0, -10.0, -10.0, 10.0, 10.0, 10.0))
    return tiny_model_config(point_cloud_range=(-6.4, -6.4, -5.0, 6.4, 6.4, 3.0), head=head,
                             backbone_channels=(16, 16, 32), neck_channels=(16, 16, 16))


def scene(boxes: torch.Tensor, config, seed: int) -> torch.Tensor:
    """Ground points plus 60 points inside every box (P, 5)."""
    generator = torch.Generator().manual_seed(seed)
    ground = random_points(300, config.point_cloud_range, seed)
    ground[:, 2] = -1.8
    parts = [ground]
    for box in boxes:
        local = (torch.rand(60, 3, generator=generator) - 0.5) * box[3:6]
        cos, sin = torch.cos(box[6]), torch.sin(box[6])
        xy = torch.stack([cos * local[:, 0] - sin * local[:, 1], sin * local[:, 0] + cos * local[:, 1]], 1)
        parts.append(torch.cat([xy + box[:2], local[:, 2:3] + box[2], torch.rand(60, 2, generator=generator)], 1))
    return torch.cat(parts)


def fixed_batch(config):
    boxes = [torch.tensor([[2.0, 1.5, -1.0, 4.5, 1.9, 1.6, 0.3, 1.0, 0.0], [-3.0, -3.5, -0.9, 0.7, 0.7, 1.8, 0, 0, 0]]),
             torch.tensor([[-2.5, 3.0, -1.0, 4.2, 1.8, 1.5, 2.0, 0.0, 0.0]])]
    labels = [torch.tensor([0, 8]), torch.tensor([0])]
    points = [scene(b, config, seed) for seed, b in enumerate(boxes)]
    return points, boxes, labels


def make_batch(points, boxes, labels) -> Batch:
    return Batch(sample_tokens=[f"s{i}" for i in range(len(points))], points=points, gt_boxes=boxes,
                 gt_labels=labels, gt_attributes=[torch.full((len(lb),), -1) for lb in labels],
                 bev_aug=torch.eye(4).repeat(len(points), 1, 1), lidar_to_ego=[np.eye(4)] * len(points),
                 ego_to_global=[np.eye(4)] * len(points))


@pytest.mark.slow
def test_training_overfits_a_fixed_batch():
    torch.manual_seed(0)
    config = micro_config()
    model = CenterPointTeacher(config)
    optimizer = build_optimizer(model, TeacherTrainConfig(lr=3e-3, weight_decay=0.0))
    points, boxes, labels = fixed_batch(config)
    losses = [train_step(model, points, boxes, labels, optimizer, grad_clip=35.0)["loss"] for _ in range(25)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] / 8, losses
    model.eval()
    with torch.no_grad():
        detections = model.pts_bbox_head.decode(model(points).head, ["a", "b"])
    # after overfitting, the best car detection of sample 1 sits on its box centre
    cars = detections[1].boxes[detections[1].labels == 0]
    assert len(cars) and np.linalg.norm(cars[0, :2] - np.array([-2.5, 3.0])) < 0.8


def test_learning_rate_schedules():
    onecycle = TeacherTrainConfig(schedule="onecycle", warmup_fraction=0.4)
    factors = [learning_rate_factor(step, 101, onecycle) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[40] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(1e-4) and max(factors) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:40], factors[1:41]))
    assert all(a >= b for a, b in zip(factors[40:], factors[41:]))
    cosine = TeacherTrainConfig(schedule="cosine", warmup_fraction=0.0)
    assert learning_rate_factor(0, 11, cosine) == pytest.approx(1.0)
    assert learning_rate_factor(5, 11, cosine) == pytest.approx(0.5)
    assert learning_rate_factor(10, 11, cosine) == pytest.approx(0.0, abs=1e-12)


def test_run_state_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    config = micro_config()
    experiment = TeacherExperimentConfig(model=config, train=TeacherTrainConfig(epochs=2, lr=1e-3, log_every=1))
    model = CenterPointTeacher(config)
    optimizer = build_optimizer(model, experiment.train)
    scheduler = build_scheduler(optimizer, experiment.train, total_steps=4)
    loader = [make_batch(*fixed_batch(config))] * 2
    means = train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 1, experiment.train,
                            tmp_path / "log.jsonl", num_steps=2)
    assert means["steps"] == 2 and np.isfinite(means["loss"])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("loss_heatmap" in r for r in records)
    save_run_state(tmp_path, 1, 2, model, optimizer, scheduler, experiment)
    expected_draw = torch.rand(3)
    assert (tmp_path / "checkpoints" / "epoch_1.pth").is_file()

    torch.manual_seed(123)
    restored = CenterPointTeacher(config)
    restored_optimizer = build_optimizer(restored, experiment.train)
    restored_scheduler = build_scheduler(restored_optimizer, experiment.train, total_steps=4)
    assert load_run_state(tmp_path, restored, restored_optimizer, restored_scheduler) == (1, 2)
    assert torch.equal(torch.rand(3), expected_draw)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)
    assert restored_scheduler.last_epoch == scheduler.last_epoch == 2
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    first = next(iter(optimizer.state.values()))
    restored_first = next(iter(restored_optimizer.state.values()))
    assert torch.equal(first["exp_avg"], restored_first["exp_avg"])


def test_shipped_configs_load_and_mismatched_head_grid_is_rejected():
    synthetic = load_config(TeacherExperimentConfig, SYNTHETIC_CONFIG)
    assert synthetic.model.head_grid.shape == (80, 80) and synthetic.model.canvas_grid.shape == (160, 160)
    assert synthetic.data.load_images is False and synthetic.data.point_cloud_range[3] == 32.0
    full = load_config(TeacherExperimentConfig, NUSCENES_CONFIG, ["train.epochs=3"])
    assert full.train.epochs == 3 and full.model.head_grid.shape == (128, 128)
    with pytest.raises(ConfigError, match="head.grid"):
        load_config(TeacherExperimentConfig, SYNTHETIC_CONFIG, ["model.head.grid.resolution=0.4"])
    with pytest.raises(ConfigError, match="one stride"):
        load_config(TeacherExperimentConfig, SYNTHETIC_CONFIG, ["model.neck_upsample_strides=[1.0, 1.0, 4.0]"])


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    from distillbev.cli import cli

    runner = CliRunner()
    help_result = runner.invoke(cli, ["train-teacher", "--help"])
    assert help_result.exit_code == 0 and "--resume" in help_result.output
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.pth").write_bytes(b"")
    result = runner.invoke(cli, ["train-teacher", "--config", str(SYNTHETIC_CONFIG), "--dataroot", str(tmp_path),
                                 "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, ConfigError) and "--resume" in str(result.exception)
