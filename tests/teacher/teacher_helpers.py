"""Shared helpers of the teacher tests (imported by the test modules and conftest)."""

from __future__ import annotations

from pathlib import Path

import torch

from distillbev.pipeline.geometry.bev import BEVGrid
from distillbev.pipeline.heads.center_head import CenterHeadConfig
from distillbev.pipeline.teacher.config import TeacherModelConfig

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC_CONFIG = REPO / "configs" / "synthetic" / "teacher.yaml"
NUSCENES_CONFIG = REPO / "configs" / "nuscenes" / "teacher_pillar02.yaml"


def random_points(count: int, point_cloud_range, seed: int = 0) -> torch.Tensor:
    """(count, 5) points uniform inside the range: x, y, z, intensity in [0, 1), time lag in [0, 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    x_min, y_min, z_min, x_max, y_max, z_max = point_cloud_range
    unit = torch.rand(count, 5, generator=generator)
    low = torch.tensor([x_min, y_min, z_min, 0.0, 0.0])
    span = torch.tensor([x_max - x_min, y_max - y_min, z_max - z_min, 1.0, 0.5])
    return unit * span + low


def tiny_model_config(**overrides) -> TeacherModelConfig:
    """+-12.8 m at 0.4 m pillars (64x64 canvas) -> 32x32 head grid at 0.8 m; narrow layers for fast tests."""
    head = CenterHeadConfig(grid=BEVGrid(-12.8, 12.8, -12.8, 12.8, 0.8), shared_channels=16, head_channels=16,
                            post_center_range=(-20.0, -20.0, -10.0, 20.0, 20.0, 10.0))
    values = dict(point_cloud_range=(-12.8, -12.8, -5.0, 12.8, 12.8, 3.0), pillar_size=(0.4, 0.4),
                  pillar_channels=16, backbone_channels=(16, 32, 32), backbone_layer_nums=(1, 1, 1),
                  backbone_strides=(2, 2, 2), neck_channels=(16, 16, 16), neck_upsample_strides=(1.0, 2.0, 4.0),
                  head=head)
    values.update(overrides)
    return TeacherModelConfig(**values)


def synthetic_teacher_data(root, num_scenes: int):
    """A synthetic dataroot at `root` (num_scenes of 2 key frames, 1 val scene, 1 sweep per key frame) and the
    LiDAR-only `DataConfig` the micro teacher trains on (+-12.8 m, 1 sweep)."""
    from distillbev.pipeline.data.config import DataConfig
    from distillbev.pipeline.synthetic import generate

    generate.generate_dataset(root, generate.SyntheticConfig(num_scenes=num_scenes, samples_per_scene=2, val_scenes=1,
                                                             sweeps_per_key_frame=1), progress=False)
    return DataConfig(dataroot=str(root), version="v1.0-synthetic", train_split="synth_train",
                      val_split="synth_val", num_sweeps=1, sweep_candidates=1, load_images=False,
                      point_cloud_range=(-12.8, -12.8, -5.0, 12.8, 12.8, 3.0))
