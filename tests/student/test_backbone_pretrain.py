"""Backbone pretraining (pipeline/student/pretrain.py): image-centre targets of hand-placed boxes, the loss on a
hand-computed case, the schedule, and `pretrain-backbone` end to end into a student's `backbone.pretrained`."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from module_loader import load_tests_module
from student_helpers import camera_looking_along, intrinsics

from distillbev.pipeline.student.config import BackbonePretrainConfig
from distillbev.pipeline.student.pretrain import ImageCentreTargets, image_centre_targets, pretrain_losses
from distillbev.pipeline.student.pretrain_run import pretrain_lr

IMAGE = (48, 96)  # (H, W): 6 x 12 cells at stride 8
CAR, CONE = 0, 8


def centre_targets(boxes: list[list[float]], labels: list[int], bev_aug: torch.Tensor | None = None
                   ) -> ImageCentreTargets:
    """One sample, one level camera at the LiDAR origin looking along +x, focal 40 px, principal point (48, 24)."""
    box_tensor = torch.tensor([b + [0.0, 0.0] for b in boxes], dtype=torch.float32)  # (K, 9): no velocity
    return image_centre_targets([box_tensor], [torch.tensor(labels)], intrinsics(40.0, 48.0, 24.0)[None, None],
                                camera_looking_along(0.0)[None, None], torch.eye(3)[None, None],
                                torch.eye(4)[None] if bev_aug is None else bev_aug[None], IMAGE, 8, 10, 60.0,
                                min_overlap=0.7, min_radius=1)


def test_a_box_ahead_peaks_at_its_projected_centre_with_its_depth():
    # Centre (10, 0, 0) -> camera (0, 0, 10) -> pixel (48, 24) -> cell (row 24 // 8, col 48 // 8) = (3, 6).
    targets = centre_targets([[10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]], [CAR])
    assert targets.num_centres == 1
    assert targets.heatmap.shape == (1, 10, 6, 12)
    assert targets.heatmap[0, CAR, 3, 6] == 1.0
    assert targets.heatmap[0, 1:].sum() == 0.0  # no other class channel
    assert targets.centre_mask[0].nonzero().tolist() == [[3, 6]]
    assert targets.log_depth[0, 3, 6].item() == pytest.approx(math.log(10.0))


def test_boxes_behind_outside_or_beyond_range_get_no_peak():
    targets = centre_targets([[-10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0],  # behind the camera
                              [10.0, 30.0, 0.0, 4.0, 2.0, 1.5, 0.0],  # u = 48 - 40 * 30 / 10 = -72: left of the image
                              [70.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0],   # 70 m: past max_depth 60 m
                              [1.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]],   # its rear corners are behind the camera
                             [CAR, CAR, CAR, CAR])
    assert targets.num_centres == 0
    assert targets.heatmap.sum() == 0.0 and not targets.centre_mask.any()


def test_the_nearer_of_two_centres_in_one_cell_keeps_the_depth():
    # Both project to pixel (48, 24); the cone at 20 m is drawn first, the car at 10 m overwrites the depth.
    targets = centre_targets([[20.0, 0.0, 0.0, 0.4, 0.4, 0.8, 0.0], [10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]],
                             [CONE, CAR])
    assert targets.num_centres == 2
    assert targets.heatmap[0, CAR, 3, 6] == 1.0 and targets.heatmap[0, CONE, 3, 6] == 1.0
    assert targets.log_depth[0, 3, 6].item() == pytest.approx(math.log(10.0))


def test_the_bev_augmentation_is_undone_before_projecting():
    # A y-flip: the box at y = -2 in the augmented frame is at y = +2 in the LiDAR frame, camera x = -2, so
    # u = 48 + 40 * (-2) / 10 = 40 -> column 5 (column 7 if the flip were ignored).
    flip = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0]))
    targets = centre_targets([[10.0, -2.0, 0.0, 4.0, 2.0, 1.5, 0.0]], [CAR], bev_aug=flip)
    assert targets.centre_mask[0].nonzero().tolist() == [[3, 5]]


def test_peaks_get_at_least_the_minimum_radius():
    # At 6 m the box spans u 32..64, v 18..30 (4 x 1.5 cells): CenterNet's radius at overlap 0.7 is 0.607 cells,
    # so min_radius 1 applies: sigma = 3 / 6, the four neighbours get exp(-1 / (2 * 0.25)) = exp(-2), the diagonal
    # ones exp(-4), nothing further.
    targets = centre_targets([[6.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.0]], [CAR])
    heatmap = targets.heatmap[0, CAR]
    assert heatmap[3, 6] == 1.0
    for row, col in ((2, 6), (4, 6), (3, 5), (3, 7)):
        assert heatmap[row, col].item() == pytest.approx(math.exp(-2.0), rel=1e-6)
    assert heatmap[2, 5].item() == pytest.approx(math.exp(-4.0), rel=1e-6)
    assert heatmap.sum().item() == pytest.approx(1 + 4 * math.exp(-2.0) + 4 * math.exp(-4.0), rel=1e-6)


def test_pretrain_losses_by_hand():
    # Logits 0 -> p = 0.5 at a peak and at a background cell: each term is -log(0.5) * 0.5^2 = 0.173287;
    # one centre, so the heatmap loss is their sum. Depth: |2.0 - log 10| = 0.302585, times weight 2.
    targets = ImageCentreTargets(heatmap=torch.tensor([[[[1.0, 0.0]]]]), log_depth=torch.tensor([[[math.log(10.0), 0.0]]]),
                                 centre_mask=torch.tensor([[[True, False]]]), num_centres=1)
    losses = pretrain_losses(torch.zeros(1, 1, 1, 2), torch.tensor([[[[2.0, 5.0]]]]), targets, depth_weight=2.0)
    assert losses["heatmap"].item() == pytest.approx(2 * math.log(2.0) * 0.25, rel=1e-4)
    assert losses["depth"].item() == pytest.approx(2.0 * (math.log(10.0) - 2.0), rel=1e-5)


def test_pretrain_schedule_warms_up_then_decays_to_zero():
    config = BackbonePretrainConfig(lr=1e-3, warmup_iters=10)
    assert pretrain_lr(config, 0, 110) == pytest.approx(1e-4)
    assert pretrain_lr(config, 10, 110) == pytest.approx(1e-3)
    assert pretrain_lr(config, 60, 110) == pytest.approx(5e-4)  # half way through the cosine
    assert pretrain_lr(config, 110, 110) == pytest.approx(0.0, abs=1e-12)


def test_pretrain_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pretrain.epochs must be at least 1"):
        BackbonePretrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"pretrain.min_overlap must be in \(0, 1\)"):
        BackbonePretrainConfig(min_overlap=1.0)
    with pytest.raises(ValueError, match="pretrain.min_radius must be at least 0"):
        BackbonePretrainConfig(min_radius=-1)


def _tiny_module():
    return load_tests_module("distill/test_distill_equivalence.py")


@pytest.mark.slow
def test_pretrain_backbone_cli_writes_weights_the_student_loads(tmp_path):
    from click.testing import CliRunner

    from distillbev.cli import cli
    from distillbev.pipeline.config import dump_config
    from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
    from distillbev.pipeline.student.model import CameraStudent

    dataroot = tmp_path / "synthetic"
    generate_dataset(dataroot, SyntheticConfig(num_scenes=2, samples_per_scene=2, val_scenes=1, sweeps_per_key_frame=0,
                                               objects_per_scene=16, visibility_range=20.0, lidar_azimuth_steps=512),
                     progress=False)
    config = _tiny_module().tiny_student_config(dataroot)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, num_workers=0))
    dump_config(config, tmp_path / "student.yaml")
    out = tmp_path / "backbone"
    argv = ["pretrain-backbone", "--config", str(tmp_path / "student.yaml"), "--dataroot", str(dataroot),
            "--out", str(out), "--set", "pretrain.epochs=2", "--set", "pretrain.batch_size=1",
            "--set", "pretrain.num_workers=0", "--set", "pretrain.warmup_iters=1"]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 4  # 2 train key frames x 2 epochs at batch 1
    assert set(summary["val"]) == {"heatmap", "depth"} and all(np.isfinite(v) for v in summary["val"].values())
    assert json.loads((out / "pretrain_summary.json").read_text()) == summary
    log = [json.loads(line) for line in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(np.isfinite(r["heatmap"]) and np.isfinite(r["depth"]) for r in log)
    assert sum(r["centres"] for r in log) > 0  # the tiny world's boxes project into its cameras

    state = torch.load(out / "backbone.pth", weights_only=True)
    model_config = dataclasses.replace(config.model, backbone=dataclasses.replace(
        config.model.backbone, pretrained=str(out / "backbone.pth")))
    student = CameraStudent(model_config)
    for key, value in student.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not torch.equal(state["conv1.weight"], CameraStudent(config.model).backbone.conv1.weight.detach())

    # A config that names backbone weights starts from them: at lr 0 the convolutions come out unchanged.
    resumed = CliRunner().invoke(cli, [*argv[:6], str(tmp_path / "from_file"), *argv[7:], "--set", "pretrain.lr=0",
                                       "--set", f"model.backbone.pretrained={out / 'backbone.pth'}"],
                                 catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert torch.equal(torch.load(tmp_path / "from_file" / "backbone.pth", weights_only=True)["conv1.weight"],
                       state["conv1.weight"])

    log_before = (out / "pretrain_log.jsonl").read_bytes()
    again = CliRunner().invoke(cli, argv)
    assert again.exit_code != 0 and "backbone.pth: already exists; choose another --out" in str(again.exception)
    assert (out / "pretrain_log.jsonl").read_bytes() == log_before  # the finished run is left as it was
