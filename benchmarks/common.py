"""Shared by the benchmarks: the machine header printed with every table, and inputs of the real nuScenes shapes
filled with random values (for costs that do not depend on the data's content)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys

import numpy as np
import torch

from distillbev.pipeline.cache.extract import spatial_attention
from distillbev.pipeline.heads.center_head import clip_sigmoid
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest, view_augmentations
from distillbev.pipeline.cache.writer import SampleViewRecord, SampleViewWriter, finalize_store, prepare_store
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.types import CameraInputs, Sample
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVGrid


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def machine_header() -> str:
    """One markdown paragraph: date, command, CPU, cores, torch version and threads, load average."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", *sys.argv])
    return (f"{now}; `{command}`; CPU {cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
            f"; load average at start {load_average()} (1/5/15 min; the machine is shared)")


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic inputs of the real nuScenes shapes (for costs that do not depend on the data's content)
# ---------------------------------------------------------------------------------------------------------------
NUSCENES_IMAGE = (900, 1600)  # (H, W) of a nuScenes camera image


def ring_of_cameras(count: int = 6, height: float = 1.6) -> np.ndarray:
    """(N, 4, 4) camera -> LiDAR of level cameras at `height` looking out every 360/N degrees (x right, y down, z
    forward), a stand-in for the nuScenes rig."""
    out = np.zeros((count, 4, 4), dtype=np.float32)
    for n in range(count):
        yaw = 2 * np.pi * n / count
        forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        out[n, :3, :3] = np.stack([right, [0.0, 0.0, -1.0], forward], axis=1)
        out[n, 2, 3] = height
        out[n, 3, 3] = 1.0
    return out


def lidar_like_points(rng: np.random.Generator, count: int, half_extent: float) -> np.ndarray:
    """(count, 5) x, y, z, intensity, time lag: dense near the sensor, thinning with range like a spinning LiDAR
    (so the pillar count is realistic), mostly ground with some points on objects."""
    radius = 1.5 + (half_extent - 1.5) * rng.random(count) ** 2
    angle = rng.random(count) * 2 * np.pi
    on_object = rng.random(count) < 0.3
    z = np.where(on_object, rng.uniform(-1.8, 1.0, count), rng.normal(-1.8, 0.05, count))
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle), z, rng.random(count),
                       0.05 * rng.integers(0, 10, count)], axis=1).astype(np.float32)
    return points


class FullShapeDataset:
    """Samples of the full nuScenes shapes filled with random values, with the interface `DistillationDataset` uses
    (`config`, `sample_tokens`, `get(index, bev_aug, rng)`): 6 cameras at `final_size` (and the previous frame),
    `num_points` LiDAR-like points, 30 GT boxes. Images are drawn, not decoded, so the data time excludes JPEG work.
    """

    def __init__(self, config: DataConfig, num_samples: int, num_points: int, previous_frame: bool) -> None:
        self.config = config
        self.sample_tokens = [f"full-shape-{i}" for i in range(num_samples)]
        self.num_points = num_points
        self.previous_frame = previous_frame
        self.camera_to_lidar = torch.from_numpy(ring_of_cameras(len(config.camera_channels)))

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def _cameras(self, rng: np.random.Generator) -> CameraInputs:
        count = len(self.config.camera_channels)
        height, width = self.config.final_size
        scale = width / NUSCENES_IMAGE[1]  # resize the 1600-wide image to final width, keep the bottom rows
        crop_top = NUSCENES_IMAGE[0] * scale - height
        image_aug = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, -crop_top], [0.0, 0.0, 1.0]])
        intrinsics = torch.tensor([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]])
        images = rng.standard_normal((count, 3, height, width), dtype=np.float32)
        return CameraInputs(images=torch.from_numpy(images), intrinsics=intrinsics.expand(count, 3, 3).clone(),
                            camera_to_lidar=self.camera_to_lidar.clone(),
                            image_aug=image_aug.expand(count, 3, 3).clone(),
                            channels=tuple(self.config.camera_channels))

    def get(self, index: int, bev_aug: BEVAugmentation | None = None, with_images: bool | None = None,
            rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else np.random.default_rng(index)
        bev_aug = bev_aug or BEVAugmentation()
        half_extent = self.config.point_cloud_range[3]
        points = bev_aug.apply_points(lidar_like_points(rng, self.num_points, half_extent))
        boxes = np.zeros((30, 9), dtype=np.float64)
        boxes[:, :2] = rng.uniform(-0.8 * half_extent, 0.8 * half_extent, (30, 2))
        boxes[:, 2] = -1.0
        boxes[:, 3:6] = rng.uniform([0.5, 0.5, 1.0], [5.0, 2.5, 2.5], (30, 3))
        boxes[:, 6] = rng.uniform(-np.pi, np.pi, 30)
        boxes = bev_aug.apply_boxes(boxes)
        previous_shift = torch.eye(4)
        previous_shift[0, 3] = -3.0  # the ego moved 3 m forward since the previous key frame
        return Sample(
            sample_token=self.sample_tokens[index], timestamp=index,
            points=torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)), cameras=self._cameras(rng),
            gt_boxes=torch.from_numpy(boxes.astype(np.float32)),
            gt_labels=torch.from_numpy(rng.integers(0, 10, 30)), gt_attributes=torch.full((30,), -1),
            bev_aug=torch.from_numpy(bev_aug.matrix().astype(np.float32)), lidar_to_ego=np.eye(4),
            ego_to_global=np.eye(4), prev_cameras=self._cameras(rng) if self.previous_frame else None,
            prev_lidar_to_lidar=previous_shift if self.previous_frame else None)


def write_random_cache(path, layers: list[LayerSpec], grid: BEVGrid, heatmap_shape: tuple[int, int],
                       sample_tokens: list[str], views: int, seed: int = 0, dtype: str = "fp16") -> None:
    """A complete teacher cache (`dtype` fp16 or int8) of ReLU'd random maps at the given layer shapes (every
    sample-view written)."""
    generator = torch.Generator().manual_seed(seed)
    view_config = ViewConfig(count=views, seed=seed)
    manifest = build_manifest(teacher_config={}, checkpoint_path="random", checkpoint_sha256="", grid=grid,
                              layers=layers, heatmap_shape=heatmap_shape, occupancy_shape=grid.shape, dtype=dtype,
                              views=view_config, sample_tokens=sample_tokens,
                              dataset={"dataroot": "", "version": "full-shape", "split": "bench", "num_sweeps": 9,
                                       "fingerprint": "", "point_loading": {}})
    prepare_store(path, manifest, sample_tokens, {}, overwrite=True)
    writer = SampleViewWriter(path)
    for index, token in enumerate(sample_tokens):
        for view in range(len(view_augmentations(view_config, index))):
            features = {layer.name: torch.relu(torch.randn(layer.channels, *layer.shape, generator=generator))
                        for layer in layers}
            heatmap = clip_sigmoid(torch.randn(10, *heatmap_shape, generator=generator) - 3)
            writer.write(SampleViewRecord(
                sample_index=index, view=view, sample_token=token,
                features={k: v.numpy() for k, v in features.items()}, heatmap=heatmap.numpy(),
                attention={k: spatial_attention(v[None])[0].numpy() for k, v in features.items()},
                occupancy=(torch.rand(*grid.shape, generator=generator) < 0.15).numpy()))
    finalize_store(path, sample_tokens)


def trained_teacher(config_path, checkpoint, dataroot, split: str):
    """(experiment config, teacher in eval mode with `checkpoint` loaded, test-mode dataset of `split` without
    images) for the benchmarks that measure a trained teacher on its own data."""
    import dataclasses

    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.teacher.checkpoint import load_teacher_checkpoint
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    config = load_config(TeacherExperimentConfig, config_path, overrides=[])
    data_config = dataclasses.replace(config.data, dataroot=str(dataroot), load_images=False)
    model = CenterPointTeacher(config.model)
    load_teacher_checkpoint(model, checkpoint)
    model.eval()
    return config, model, NuScenesDetectionDataset(data_config, split, mode="test")
