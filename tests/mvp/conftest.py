"""A tiny world-2 dataroot with instance masks (2 scenes x 2 key frames, 2 sweeps each), shared by the mvp tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
from distillbev.pipeline.synthetic.masks import MaskErrorModel

# Exact boundaries, so a found object's mask is exactly its visible pixels (IoU 1) and the measured recall is the
# configured detection rate.
SHARP = MaskErrorModel(boundary_sigma=0.0, jitter_sigma=0.0, ragged=0.0)


@pytest.fixture(scope="session")
def street_config() -> SyntheticConfig:
    return SyntheticConfig(num_scenes=2, samples_per_scene=2, val_scenes=1, sweeps_per_key_frame=2, seed=5,
                                  mask_errors=SHARP)


@pytest.fixture(scope="session")
def street_dataroot(tmp_path_factory: pytest.TempPathFactory, street_config: SyntheticConfig) -> Path:
    root = tmp_path_factory.mktemp("street") / "data"
    generate_dataset(root, street_config, progress=False)
    return root
