"""Tiny teacher-feature stores for the inspect-cache tests, written directly with the cache writer.

Imported as `inspect_stores` (a unique module name: tests/ has no packages).

The stored maps are smooth, deterministic functions of (sample, view): gaussian bumps at the view's (augmented)
object centres on a weak random background, so rendered figures look like teacher output and two stores built
with the same arguments are byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.checks import marker_format
from distillbev.pipeline.cache.chunks import chunk_coords, encode_chunk, get_chunk_bytes, write_chunks
from distillbev.pipeline.cache.extract import spatial_attention
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest, view_augmentations
from distillbev.pipeline.cache.marker import stored_crc
from distillbev.pipeline.cache.writer import SampleViewRecord, SampleViewWriter, finalize_store, prepare_store
from distillbev.pipeline.geometry.bev import BEVGrid

SMALL_GRID = BEVGrid(-8.0, 8.0, -8.0, 8.0, 0.5)  # canvas 32 x 32
TINY_NUSCENES_GRID = BEVGrid(-25.6, 25.6, -25.6, 25.6, 0.8)  # canvas 64 x 64 around the tiny dataroot's objects
LAYERS = (("backbone1", 6, 2), ("backbone2", 8, 4), ("neck", 5, 2))  # name, channels, stride over the canvas
HEAD_STRIDE = 2
FALSE_POSITIVE_CENTRE = np.array([-3.0, -6.0])  # an un-augmented teacher "detection" with no GT near it


def token_of(index: int) -> str:
    return f"token-{index:03d}"


def default_centres(index: int) -> np.ndarray:
    """(2, 2) un-augmented object centres of sample `index` inside SMALL_GRID."""
    return np.array([[2.0 + 0.5 * index, 3.0], [-4.0, 1.0 - 0.5 * index]])


def _bumps(grid: BEVGrid, shape: tuple[int, int], centres: np.ndarray, sigma: float) -> np.ndarray:
    """(Y, X) sum of unit gaussians of width sigma (metres) at centres (K, 2), on cell centres of a (Y, X) map."""
    cell = grid.with_shape(*shape)
    xs = cell.x_min + (np.arange(shape[1]) + 0.5) * cell.resolution  # (X,)
    ys = cell.y_min + (np.arange(shape[0]) + 0.5) * cell.resolution  # (Y,)
    cells = np.stack(np.meshgrid(xs, ys), axis=-1)  # (Y, X, 2): [..., 0] = x, [..., 1] = y
    out = np.zeros(shape, dtype=np.float64)
    for centre in centres:
        out += np.exp(-((cells - centre) ** 2).sum(axis=-1) / (2 * sigma ** 2))
    return out


def write_store(path: Path, *, tokens: list[str] | None = None, samples: int = 4, views: int = 2,
                dtype: str = "fp16", grid: BEVGrid = SMALL_GRID, layers=LAYERS, centres=default_centres,
                dataset: dict | None = None, seed: int = 3, finalize: bool = True, sha: str = "b" * 64,
                false_positive_centre=FALSE_POSITIVE_CENTRE) -> dict:
    """Write a store of `samples` x `views` sample-views; returns its manifest."""
    tokens = tokens if tokens is not None else [token_of(i) for i in range(samples)]
    canvas = grid.shape
    specs = [LayerSpec(name, channels, (canvas[0] // stride, canvas[1] // stride), grid.resolution * stride,
                       float(stride)) for name, channels, stride in layers]
    head_shape = (canvas[0] // HEAD_STRIDE, canvas[1] // HEAD_STRIDE)
    view_config = ViewConfig(count=views, seed=seed)
    manifest = build_manifest(
        teacher_config={"name": "inspect-test", "backbone_channels": [c for _, c, _ in layers]},
        checkpoint_path="/ckpt/teacher.pth", checkpoint_sha256=sha, grid=grid, layers=specs,
        heatmap_shape=head_shape, occupancy_shape=canvas, dtype=dtype, views=view_config,
        dataset=dataset or {"dataroot": "/nonexistent/dataroot", "version": "v1.0-mini", "split": "mini_val",
                            "num_sweeps": 1, "fingerprint": "f" * 64, "point_loading": {"num_sweeps": 1}},
        sample_tokens=tokens)
    prepare_store(path, manifest, tokens, head_state={"heatmap.bias": np.full((10,), -2.19, dtype=np.float32)})
    writer = SampleViewWriter(path)
    for index, token in enumerate(tokens):
        for view, bev_aug in enumerate(view_augmentations(view_config, index)):
            rng = np.random.default_rng([index, view])
            # (K + 1, 2): the objects, then the false-positive blob
            points = np.concatenate([centres(index), np.asarray(false_positive_centre, dtype=float)[None]])
            points = bev_aug.apply_points(np.concatenate([points, np.zeros((len(points), 1))], axis=1))[:, :2]
            objects = points[:-1]
            features = {}
            for spec in specs:
                bumps = _bumps(grid, spec.shape, points, sigma=1.5)  # (Y, X)
                gains = np.linspace(0.5, 2.0, spec.channels)[:, None, None]
                noise = 0.05 * rng.random((spec.channels, *spec.shape))
                features[spec.name] = (gains * bumps[None] + noise).astype(np.float32)  # (C, Y, X)
            heat = np.clip(_bumps(grid, head_shape, objects, sigma=0.6), 0, 1)  # (Yh, Xh)
            heat = np.maximum(heat, 0.9 * _bumps(grid, head_shape, points[-1:], sigma=0.6))
            heatmap = np.clip(heat[None] * np.linspace(0.3, 1.0, 10)[:, None, None], 1e-4, 1 - 1e-4)
            occupancy = _bumps(grid, canvas, points, sigma=2.0) + 0.3 * rng.random(canvas) > 0.5
            attention = {name: spatial_attention(torch.from_numpy(f)[None])[0].numpy() for name, f in features.items()}
            writer.write(SampleViewRecord(index, view, token, features, heatmap.astype(np.float32), attention,
                                          occupancy))
    if finalize:
        finalize_store(path, tokens)
    return manifest


def rebind(path: Path, sample: int, view: int) -> None:
    """Bind the done marker of (sample, view) to the chunks it holds now, as the writer does after writing them:
    a test that edits a sample-view's values by hand (a known perturbation) must, or every read refuses them."""
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(str(path), mode="r+")
        markers = marker_format(dict(group.attrs))
        crcs = {name: stored_crc(get_chunk_bytes(group[name], chunk_coords(group[name], sample, view)))
                for name in markers.arrays}
        done = group[v2.DONE]
        write_chunks(done, {chunk_coords(done, sample, view): encode_chunk(done, markers.encode(sample, view,
                                                                                                crcs)[None, None])})
