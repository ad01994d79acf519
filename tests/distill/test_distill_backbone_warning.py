"""A student run whose image backbone starts from random weights says so loudly; one with weights stays quiet."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from distillbev.pipeline.config import load_config
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import warn_if_random_backbone

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nuscenes"


@pytest.mark.parametrize("name", ["bevdet", "bevdepth", "bevdet4d", "bevdepth4d", "bevformer"])
def test_every_nuscenes_student_config_without_weights_warns(name, caplog):
    cfg = load_config(StudentExperimentConfig, CONFIGS / f"student_{name}.yaml")
    assert cfg.model.backbone.pretrained is None  # the shipped configs name no file: the user must give one
    with caplog.at_level(logging.WARNING, logger="distillbev.pipeline.distill.run"):
        warn_if_random_backbone(cfg)
    text = caplog.text
    assert "RANDOM weights" in text and "ResNet-50" in text and "model.backbone.pretrained" in text


def test_a_student_with_backbone_weights_does_not_warn(caplog, tmp_path):
    weights = tmp_path / "resnet50.pth"
    cfg = load_config(StudentExperimentConfig, CONFIGS / "student_bevdet.yaml",
                      [f"model.backbone.pretrained={weights}"])
    with caplog.at_level(logging.WARNING, logger="distillbev.pipeline.distill.run"):
        warn_if_random_backbone(cfg)
    assert caplog.text == ""
