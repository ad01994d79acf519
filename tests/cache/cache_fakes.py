"""Tiny fakes for the cache tests: a deterministic BEV conv "teacher" and a synthetic point source.

Imported by the cache tests as `cache_fakes` (a unique module name: tests/ has no packages)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillbev.pipeline.cache.extract import extract_teacher_cache
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest
from distillbev.pipeline.data.digest import InputDigests
from distillbev.pipeline.data.loading import read_points
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVGrid

LAYERS = ["backbone1", "backbone2", "neck"]
POINT_LOADING = {"num_sweeps": 1, "sweep_selection": "nearest", "point_cloud_range": [-8.0, -8.0, -2.0, 8.0, 8.0, 3.0]}
NUM_SAMPLES = 5


@dataclass
class FakeOutputs:
    """Same fields as the teacher's TeacherOutputs."""

    features: dict[str, torch.Tensor]
    heatmap: torch.Tensor
    head: list[dict]
    occupancy: torch.Tensor


class FakeTeacher:
    """A fixed function of the point cloud: pillar canvas 4 x 16 x 16 over [-8, 8) m at 1 m, then fixed convs.

    backbone1 8 @ 8x8, backbone2 16 @ 4x4, neck 12 @ 8x8, heatmap logits 10 @ 8x8, occupancy 16x16.
    """

    def __init__(self, seed: int = 0) -> None:
        self.grid = BEVGrid(-8.0, 8.0, -8.0, 8.0, 1.0)
        g = torch.Generator().manual_seed(seed)
        self.w0 = torch.randn(6, 4, 3, 3, generator=g) * 0.5
        self.w1 = torch.randn(8, 6, 3, 3, generator=g) * 0.3
        self.w2 = torch.randn(16, 8, 3, 3, generator=g) * 0.3
        self.w_neck = torch.randn(12, 24, 1, 1, generator=g) * 0.3
        self.w_heat = torch.randn(10, 12, 3, 3, generator=g) * 0.3
        self.calls = 0

    def canvas(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 5) -> (4, Y, X): point count, mean z, mean intensity, occupancy."""
        y_cells, x_cells = self.grid.shape
        ix = torch.floor((points[:, 0] - self.grid.x_min) / self.grid.resolution).long()
        iy = torch.floor((points[:, 1] - self.grid.y_min) / self.grid.resolution).long()
        keep = (ix >= 0) & (ix < x_cells) & (iy >= 0) & (iy < y_cells)
        flat = (iy * x_cells + ix)[keep]
        count = torch.zeros(y_cells * x_cells).index_add_(0, flat, torch.ones(len(flat)))
        zsum = torch.zeros(y_cells * x_cells).index_add_(0, flat, points[keep, 2])
        intensity = torch.zeros(y_cells * x_cells).index_add_(0, flat, points[keep, 3]) / count.clamp(min=1)
        occupied = (count > 0).float()
        mean_z = zsum / count.clamp(min=1)
        return torch.stack([count, mean_z, intensity, occupied]).reshape(4, y_cells, x_cells)

    def __call__(self, points_list: list[torch.Tensor]) -> FakeOutputs:
        self.calls += 1
        x = torch.stack([self.canvas(p.float()) for p in points_list])  # (B, 4, 16, 16)
        c0 = F.relu(F.conv2d(x, self.w0, padding=1))  # (B, 6, 16, 16)
        b1 = F.relu(F.conv2d(c0, self.w1, stride=2, padding=1))  # (B, 8, 8, 8)
        b2 = F.relu(F.conv2d(b1, self.w2, stride=2, padding=1))  # (B, 16, 4, 4)
        up = F.interpolate(b2, scale_factor=2, mode="nearest")  # (B, 16, 8, 8)
        neck = F.relu(F.conv2d(torch.cat([b1, up], dim=1), self.w_neck))  # (B, 12, 8, 8)
        heatmap = F.conv2d(neck, self.w_heat, padding=1)  # (B, 10, 8, 8)
        return FakeOutputs(features={"backbone1": b1, "backbone2": b2, "neck": neck}, heatmap=heatmap, head=[],
                           occupancy=x[:, 3] > 0)


def base_points(index: int) -> np.ndarray:
    """(200, 5) deterministic points of sample `index` inside the fake grid."""
    rng = np.random.default_rng(1000 + index)
    points = np.zeros((200, 5), dtype=np.float64)
    points[:, 0:2] = rng.uniform(-7.0, 7.0, size=(200, 2))
    points[:, 2] = rng.uniform(-1.0, 2.0, size=200)
    points[:, 3] = rng.uniform(0.0, 1.0, size=200)
    return points


def token_of(index: int) -> str:
    return f"token-{index:03d}"


def load_points(index: int, bev_aug: BEVAugmentation) -> tuple[str, torch.Tensor]:
    return token_of(index), torch.from_numpy(bev_aug.apply_points(base_points(index))).float()


class FilePoints:
    """The fake samples as .pcd.bin files in `folder`, one per sample, read back as the stage's loader reads them:
    with the SHA-256 of the bytes read (a `load_points` returning (token, points, InputDigests))."""

    def __init__(self, folder: Path, count: int = NUM_SAMPLES) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            base_points(index).astype(np.float32).tofile(self.path(index))

    def path(self, index: int) -> Path:
        return self.folder / f"sample-{index:03d}.pcd.bin"

    def __call__(self, index: int, bev_aug: BEVAugmentation) -> tuple[str, torch.Tensor, InputDigests]:
        digests = InputDigests()
        points = read_points(self.path(index), token_of(index), digests).astype(np.float64)
        return token_of(index), torch.from_numpy(bev_aug.apply_points(points)).float(), digests


def head_state() -> dict[str, np.ndarray]:
    return {"task_heads.0.heatmap.1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
            "task_heads.0.heatmap.1.bias": np.array([-2.19, -2.19], dtype=np.float32),
            "shared_conv.1.num_batches_tracked": np.array(7, dtype=np.int64)}


def probe_teacher(run_teacher, points: torch.Tensor, grid: BEVGrid,
                  layers: list[str]) -> tuple[list[LayerSpec], tuple[int, int], tuple[int, int]]:
    """Run a teacher once to learn the stored shapes: (layer specs, heatmap (Yh, Xh), occupancy (Y, X))."""
    with torch.no_grad():
        outputs = run_teacher([points])
    specs = []
    for name in layers:
        _, channels, y, x = outputs.features[name].shape
        specs.append(LayerSpec(name, int(channels), (int(y), int(x)), (grid.x_max - grid.x_min) / x, grid.num_x / x))
    return specs, tuple(outputs.heatmap.shape[-2:]), tuple(outputs.occupancy.shape[-2:])


def make_manifest(teacher: FakeTeacher, dtype: str = "fp16", views: int = 3, seed: int = 7,
                  sample_count: int = NUM_SAMPLES, sha: str = "a" * 64, split: str = "mini_train",
                  fingerprint: str = "f" * 64) -> dict:
    specs, heatmap_shape, occupancy_shape = probe_teacher(teacher, load_points(0, BEVAugmentation())[1],
                                                          teacher.grid, LAYERS)
    return build_manifest(teacher_config={"name": "fake", "seed": 0}, checkpoint_path="/ckpt/fake.pth",
                          checkpoint_sha256=sha, grid=teacher.grid, layers=specs, heatmap_shape=heatmap_shape,
                          occupancy_shape=occupancy_shape, dtype=dtype,
                          views=ViewConfig(count=views, seed=seed, flip_x_prob=0.5, flip_y_prob=0.5),
                          dataset={"dataroot": "/data/fake", "version": "v1.0-mini", "split": split,
                                   "num_sweeps": 1, "fingerprint": fingerprint, "point_loading": POINT_LOADING},
                          sample_tokens=[token_of(i) for i in range(sample_count)])


def run_extract(path: Path, manifest: dict, teacher=None, points=load_points, **kwargs):
    teacher = teacher if teacher is not None else FakeTeacher()
    tokens = [token_of(i) for i in range(manifest["sample_count"])]
    kwargs.setdefault("progress", False)
    return extract_teacher_cache(path, manifest=manifest, sample_tokens=tokens, head_state=head_state(),
                                 run_teacher=teacher, load_points=points, **kwargs)


NOT_CHUNKS = ("zarr.json", "distillbev_cache.json", "distillbev.lock")  # metadata, marker, lock


def chunk_files(path: Path) -> dict[str, bytes]:
    """Every chunk file of a store (everything but metadata, the marker and the lock) -> its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in NOT_CHUNKS}


def extract_slowly(path: Path, manifest: dict) -> None:
    """One worker, about 30 ms per sample-view: a run that a test can SIGKILL part-way."""
    import time

    teacher = FakeTeacher()

    def slow_teacher(points_list):
        time.sleep(0.03)
        return teacher(points_list)

    run_extract(path, manifest, teacher=slow_teacher, workers=1, threads_per_worker=1, background_writer=True)


def store_chunks(location) -> dict[str, bytes]:
    """`chunk_files` for any store location (local folder or object-store URL), read through zarr's store."""
    from distillbev.pipeline.cache.location import StoreLocation

    location = StoreLocation.parse(location)
    return {key: location.get(key) for key in location.keys() if key.rsplit("/", 1)[-1] not in NOT_CHUNKS}


SLOW_EXTRACTION_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from cache_fakes import FakeTeacher, make_manifest, run_extract
teacher = FakeTeacher()
def slow(points):
    time.sleep({seconds!r})
    return teacher(points)
run_extract({store!r}, make_manifest(FakeTeacher(), views=3), teacher=slow, workers={workers!r}, threads_per_worker=1)
"""


def slow_extraction_script(store: str, seconds: float, workers: int) -> str:
    """`python -c` source of an extraction of `make_manifest(views=3)` into `store` that takes `seconds` per
    teacher call: a process a test can SIGKILL part-way."""
    return SLOW_EXTRACTION_SCRIPT.format(tests=str(Path(__file__).parent), store=str(store), seconds=seconds,
                                         workers=workers)
