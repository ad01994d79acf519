"""Fixtures of the real-key-frame tests: the split index read from the vendored mmdet3d info file and the datasets
built on it (the vendored dataroot has no devkit tables: the one sample is a scene start without sweeps)."""

from __future__ import annotations

import pytest
from real_keyframe import SPLIT, real_data_config, real_index


@pytest.fixture(scope="session")
def camera_index():
    """The split index with the six cameras (CAMERA_CHANNELS order)."""
    return real_index()


@pytest.fixture(scope="session")
def lidar_index():
    """The split index without cameras (the teacher's)."""
    return real_index(camera_channels=())


@pytest.fixture(scope="session")
def camera_dataset(camera_index):
    """Test-mode dataset of the key frame with images."""
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset

    return NuScenesDetectionDataset(real_data_config(), SPLIT, "test", index=camera_index)


@pytest.fixture(scope="session")
def camera_sample(camera_dataset):
    """The key frame's test-mode Sample (identity BEV augmentation, deterministic image crop)."""
    return camera_dataset.get(0)
