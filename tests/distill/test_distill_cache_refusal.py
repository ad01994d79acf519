"""train-student refuses a cache that does not fit its config before the first step, with a readable diff."""

from __future__ import annotations

from pathlib import Path

import pytest
from module_loader import load_tests_module

from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import open_checked_cache
from distillbev.pipeline.errors import CacheError
from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig


def write_store(path: Path) -> dict:
    """A tiny complete store (tests/inspect/inspect_stores.py): grid +-8 m at 0.5 m, layers backbone1/2 and neck,
    dataset v1.0-mini / mini_val."""
    return load_tests_module("inspect/inspect_stores.py").write_store(path, samples=1, views=1)


def test_a_cache_of_another_grid_and_split_is_refused_naming_each_difference(tmp_path):
    write_store(tmp_path / "cache.zarr")
    cfg = StudentExperimentConfig()  # nuScenes defaults: +-51.2 m, 128^2 head, v1.0-trainval / train
    with pytest.raises(CacheError) as error:
        open_checked_cache(tmp_path / "cache.zarr", cfg)
    message = str(error.value)
    for difference in ("bev_grid.x_min: -8.0 -> -51.2", 'dataset.split: "mini_val" -> "train"',
                       'dataset.version: "v1.0-mini" -> "v1.0-trainval"', "heatmap.shape: [16, 16] -> [128, 128]"):
        assert difference in message


def test_a_cache_without_a_distilled_layer_is_refused(tmp_path):
    manifest = write_store(tmp_path / "cache.zarr")
    cfg = StudentExperimentConfig(distill=DistillConfig(layers=[
        LayerPairConfig(student="backbone0", teacher="backbone0", adapter="upsample_3layer")]))
    cfg.model.bev.x_min, cfg.model.bev.x_max = manifest["bev_grid"]["x_min"], manifest["bev_grid"]["x_max"]
    cfg.model.bev.y_min, cfg.model.bev.y_max = manifest["bev_grid"]["y_min"], manifest["bev_grid"]["y_max"]
    cfg.model.head.grid = type(cfg.model.head.grid)(-8.0, 8.0, -8.0, 8.0, 16.0 / manifest["heatmap"]["shape"][1])
    cfg.data.version, cfg.data.train_split = "v1.0-mini", "mini_val"
    with pytest.raises(CacheError, match=r"distils teacher layers \['backbone0'\] but the cache holds"):
        open_checked_cache(tmp_path / "cache.zarr", cfg)
