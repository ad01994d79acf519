"""The student named by a StudentModelConfig: `CameraStudent` for the lift-splat variants, `BEVFormerStudent` for
bevformer. Every place that builds a student (training, benchmarks) goes through `build_student`."""

from __future__ import annotations

from torch import nn

from .bevformer.model import BEVFormerStudent
from .config import StudentModelConfig
from .model import CameraStudent


def build_student(config: StudentModelConfig) -> nn.Module:
    """A CameraStudent or a BEVFormerStudent; both return `StudentOutputs` and have `detection_loss`, `head.decode`,
    `feature_channels` and `feature_shapes`."""
    if config.is_transformer:
        return BEVFormerStudent(config)
    return CameraStudent(config)
