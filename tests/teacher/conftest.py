"""Fixtures of the teacher tests: the shipped configs and a tiny model config."""

from __future__ import annotations

import pytest
from teacher_helpers import NUSCENES_CONFIG, SYNTHETIC_CONFIG, tiny_model_config

from distillbev.pipeline.config import load_config
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherModelConfig


@pytest.fixture(scope="session")
def synthetic_experiment() -> TeacherExperimentConfig:
    return load_config(TeacherExperimentConfig, SYNTHETIC_CONFIG)


@pytest.fixture(scope="session")
def nuscenes_experiment() -> TeacherExperimentConfig:
    return load_config(TeacherExperimentConfig, NUSCENES_CONFIG)


@pytest.fixture
def tiny_config() -> TeacherModelConfig:
    return tiny_model_config()
