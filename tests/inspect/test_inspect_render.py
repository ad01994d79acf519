"""inspect-cache --render: the figure, its panels, the GT regions on the augmented view, and the no-GT fallback."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from inspect_stores import TINY_NUSCENES_GRID, write_store
from PIL import Image

from distillbev.cli import cli
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.report.cache_render import load_ground_truth, region_labels, render_sample

FALSE_POSITIVE = (18.0, 6.0)  # metres, un-augmented; no tiny-dataroot object is within 5 m of it


@pytest.fixture(scope="module")
def tiny_store(tiny_dataroot, tmp_path_factory):
    """A 2-sample x 3-view store of the tiny dataroot's split, with heatmap peaks on its GT box centres."""
    root, tokens, version = tiny_dataroot
    config = DataConfig(dataroot=str(root), version=version, num_sweeps=0, sweep_candidates=0, load_images=False)
    dataset = NuScenesDetectionDataset(config, "tiny_train", mode="test")
    assert list(dataset.sample_tokens) == tokens
    boxes = [dataset.annotations(i)[0] for i in range(len(dataset))]
    path = tmp_path_factory.mktemp("render") / "tiny.zarr"
    write_store(path, tokens=tokens, views=3, grid=TINY_NUSCENES_GRID, centres=lambda i: boxes[i][:, :2],
                dataset={"dataroot": str(root), "version": version, "split": "tiny_train", "num_sweeps": 0,
                         "fingerprint": "f" * 64, "point_loading": {"num_sweeps": 0}},
                false_positive_centre=FALSE_POSITIVE)
    return path, boxes


LAYER_AND_HEATMAP_TITLES = [
    "backbone1: L2 norm over C (6x32x32, 1.6 m)", "backbone1: attention (32x32, mean 1)",
    "backbone2: L2 norm over C (8x16x16, 3.2 m)", "backbone2: attention (16x16, mean 1)",
    "neck: L2 norm over C (5x32x32, 1.6 m)", "neck: attention (32x32, mean 1)",
    "heatmap: max over 10 classes (32x32, 10 GT boxes)"]


def test_render_writes_a_png_with_every_panel(tiny_store, tmp_path):
    path, _ = tiny_store
    result = render_sample(path, "1", tmp_path / "figure.png", view=2)
    assert result.warnings == [] and result.sample_index == 1 and result.view == 2
    assert result.titles[:7] == LAYER_AND_HEATMAP_TITLES
    assert result.titles[7].startswith("regions on head grid (32x32): fg ")
    assert result.titles[8].startswith("occupancy (64x64, ")
    with Image.open(result.path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 1200 <= width <= 2000 and 1000 <= height <= 1800
    # the regions count every head cell once
    counts = [int(part.split()[-1]) for part in result.titles[7].split(": ")[1].split(", ")]
    assert sum(counts) == 32 * 32 and counts[0] > 0


@pytest.mark.parametrize("view", [0, 1, 2])
def test_regions_follow_the_view_augmentation(tiny_store, view):
    """The store's heatmap peaks sit on the AUGMENTED box centres, so with correctly augmented GT the only
    false-positive cells are around the one blob that has no box; un-augmented GT would leave peaks uncovered."""
    path, _ = tiny_store
    cache = TeacherCache.open(path)
    targets = cache.read(0, view)
    truth = load_ground_truth(cache.manifest, targets.sample_token, targets.bev_aug)
    regions = region_labels(truth, targets.heatmap.numpy(), TINY_NUSCENES_GRID)
    head = TINY_NUSCENES_GRID.with_shape(32, 32)
    blob = targets.bev_aug.apply_points(np.array([[*FALSE_POSITIVE, 0.0]]))[0, :2]
    false_positive = np.argwhere(regions == 2)  # (N, 2) rows (iy, ix)
    assert len(false_positive) > 0
    centres = np.stack([head.x_min, head.y_min]) + (false_positive[:, ::-1] + 0.5) * head.resolution  # (N, 2) x, y
    assert np.linalg.norm(centres - blob, axis=1).max() < 3 * head.resolution
    assert (regions == 1).sum() > 20  # the large boxes cover several head cells


def test_render_without_dataroot_draws_the_rest(tmp_path, store, caplog):
    result = render_sample(store, "token-002", tmp_path / "no_gt.png", view=1)
    assert result.sample_index == 2
    assert result.titles[7] == "regions: GT unavailable (dataroot not readable)"
    assert result.titles[6] == "heatmap: max over 10 classes (16x16)"
    assert len(result.titles) == 9 and result.path.is_file()
    assert len(result.warnings) == 1 and "/nonexistent/dataroot" in result.warnings[0]
    assert "GT unavailable" in caplog.text


def test_render_dataroot_override(tiny_store, tiny_dataroot, tmp_path):
    """--dataroot replaces the manifest's dataroot (here the manifest's is moved away)."""
    path, _ = tiny_store
    moved = tmp_path / "moved.zarr"
    shutil.copytree(path, moved)
    group = zarr.open_group(str(moved), mode="r+")
    attributes = dict(group.attrs)
    attributes["dataset"]["dataroot"] = str(tmp_path / "gone")
    group.attrs.put(attributes)
    missing = render_sample(moved, 0, tmp_path / "a.png")
    assert missing.titles[7].startswith("regions: GT unavailable")
    found = render_sample(moved, 0, tmp_path / "b.png", dataroot=str(tiny_dataroot[0]))
    assert found.warnings == [] and found.titles[7].startswith("regions on head grid")


def test_cli_render(tiny_store, tmp_path):
    path, _ = tiny_store
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(cli, ["inspect-cache", str(path), "--render", "0", "--view", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "9 panels" in result.output
    missing_out = CliRunner().invoke(cli, ["inspect-cache", str(path), "--render", "0"])
    assert missing_out.exit_code == 2 and "--render needs --out" in missing_out.output
    bad = CliRunner().invoke(cli, ["inspect-cache", str(path), "--render", "7", "--out", str(out)])
    assert bad.exit_code == 1 and "sample index 7 is outside 0..1" in str(bad.exception)
