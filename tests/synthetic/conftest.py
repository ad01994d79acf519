"""One tiny synthetic dataroot (2 scenes x 3 key frames, 1 train + 1 val scene) shared by the synthetic tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

TINY_CONFIG = dict(num_scenes=2, samples_per_scene=3, val_scenes=1, seed=3)


@pytest.fixture(scope="session")
def synthetic_config() -> SyntheticConfig:
    return SyntheticConfig.boxes(**TINY_CONFIG)


@pytest.fixture(scope="session")
def synthetic_dataroot(tmp_path_factory: pytest.TempPathFactory, synthetic_config: SyntheticConfig) -> tuple[Path, dict]:
    """(dataroot, summary) of the tiny dataset, generated once per session."""
    root = tmp_path_factory.mktemp("synthetic_dataroot")
    summary = generate_dataset(root, synthetic_config, progress=False)
    return root, summary


@pytest.fixture(scope="session")
def nusc(synthetic_dataroot, synthetic_config):
    from nuscenes.nuscenes import NuScenes

    root, _ = synthetic_dataroot
    return NuScenes(version=synthetic_config.version, dataroot=str(root), verbose=False)
