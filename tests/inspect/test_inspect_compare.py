"""inspect-cache --compare and --stats on tiny stores with known contents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from inspect_stores import LAYERS, rebind, token_of, write_store

from distillbev.cli import cli
from distillbev.pipeline.cache.inspect.compare import compare_caches
from distillbev.pipeline.cache.inspect.stats import cache_stats
from distillbev.pipeline.errors import CacheError


@pytest.fixture
def twin(tmp_path, store):
    path = tmp_path / "twin.zarr"
    write_store(path)  # the same arguments as `store`: identical contents
    return path


def test_identical_stores(store, twin):
    report = compare_caches(store, twin, progress=False)
    assert report.common_samples == 4 and report.sample_views == 8 and report.skipped_views == 0
    assert [a.name for a in report.arrays] == ["features/backbone1", "features/backbone2", "features/neck",
                                               "attention/backbone1", "attention/backbone2", "attention/neck",
                                               "heatmap"]
    for array in report.arrays:
        assert array.cosine_mean == pytest.approx(1.0, abs=1e-12)
        assert array.cosine_min == pytest.approx(1.0, abs=1e-12)
        assert array.max_abs == 0.0 and array.mean_abs == 0.0


def test_one_known_perturbation(store, twin):
    """Negating channel 0 of one sample-view gives cosine 1 - 2 e0 / E and max-abs 2 max|x0| there."""
    features = zarr.open_array(str(twin / "features/neck"), mode="r+")
    original = np.asarray(features[1, 0]).astype(np.float64)  # (C, Y, X) as stored (fp16 values)
    perturbed = original.copy()
    perturbed[0] *= -1  # exact in fp16
    features[1, 0] = perturbed.astype(np.float16)
    rebind(twin, 1, 0)
    expected_cosine = 1 - 2 * (original[0] ** 2).sum() / (original ** 2).sum()
    report = compare_caches(store, twin, progress=False)
    arrays = {a.name: a for a in report.arrays}
    neck = arrays["features/neck"]
    assert neck.cosine_min == pytest.approx(expected_cosine, rel=1e-9)
    assert neck.cosine_min_at == (token_of(1), 0) and neck.max_abs_at == (token_of(1), 0)
    assert neck.cosine_mean == pytest.approx((expected_cosine + 7) / 8, rel=1e-9)
    assert neck.max_abs == pytest.approx(2 * np.abs(original[0]).max(), rel=1e-9)
    assert neck.mean_abs == pytest.approx(2 * np.abs(original[0]).sum() / (8 * original.size), rel=1e-9)
    assert arrays["features/backbone1"].max_abs == 0.0 and arrays["heatmap"].max_abs == 0.0


def test_int8_against_fp16(store, tmp_path):
    path = tmp_path / "int8.zarr"
    write_store(path, dtype="int8")
    arrays = {a.name: a for a in compare_caches(store, path, progress=False).arrays}
    for layer, _, _ in LAYERS:
        assert arrays[f"features/{layer}"].cosine_min > 0.999
        assert 0 < arrays[f"features/{layer}"].max_abs < 0.02  # half an int8 step of a ~2.6-wide channel + fp16
    assert arrays["heatmap"].max_abs == 0.0  # the heatmap is float16 in both


def test_refuses_different_layers(store, tmp_path):
    other = tmp_path / "other.zarr"
    write_store(other, layers=(("backbone1", 6, 2), ("backbone2", 8, 4), ("neck", 7, 2)))
    with pytest.raises(CacheError, match=r"neck: \(5, 16, 16\) vs \(7, 16, 16\)"):
        compare_caches(store, other, progress=False)
    result = CliRunner().invoke(cli, ["inspect-cache", str(store), "--compare", str(other)])
    assert result.exit_code == 1 and isinstance(result.exception, CacheError)


def test_compare_only_uses_views_with_the_same_augmentation(store, tmp_path):
    other = tmp_path / "seed9.zarr"
    write_store(other, samples=2, seed=9)  # view 0 is the identity in both; view 1 differs
    report = compare_caches(store, other, progress=False)
    assert report.common_samples == 2 and report.sample_views == 2 and report.skipped_views == 2
    assert all(a.max_abs == 0.0 for a in report.arrays)


def test_stats_on_hand_made_maps(tmp_path):
    """A store whose maps are known exactly: check mean/std/min/max/zeros and the channel energy by hand."""
    path = tmp_path / "stats.zarr"
    write_store(path, samples=3)
    stats = {m.name: m for m in cache_stats(path, progress=False).maps}
    values = np.asarray(zarr.open_array(str(path / "features/backbone2"), mode="r")[...], dtype=np.float64)
    layer = stats["features/backbone2"]  # (S, V, C, Y, X) = (3, 2, 8, 8, 8)
    assert layer.mean == pytest.approx(values.mean(), rel=1e-9)
    assert layer.std == pytest.approx(values.std(), rel=1e-6)
    assert (layer.min, layer.max) == (values.min(), values.max())
    assert layer.zero_fraction == 0.0
    energy = (values ** 2).mean(axis=(0, 1, 3, 4))  # (C,)
    np.testing.assert_allclose(layer.channel_energy, energy, rtol=1e-9)
    assert [c for c, _ in layer.top_channels] == [7, 6, 5, 4, 3]  # the fixture's gains grow with the channel
    assert layer.near_dead_channels == 0
    attention = stats["attention/neck"]
    assert attention.mean == pytest.approx(1.0, abs=1e-6) and 0 < attention.extra["half_mass_cell_fraction"] < 0.5
    heatmap = stats["heatmap"]
    assert heatmap.min == pytest.approx(1e-4, rel=1e-2) and heatmap.max <= 1.0
    assert 0 < heatmap.extra["above_fp_threshold"] < 0.5


def test_stats_subset_and_dead_channel(tmp_path):
    path = tmp_path / "dead.zarr"
    write_store(path, samples=5)
    features = zarr.open_array(str(path / "features/neck"), mode="r+")
    for sample in range(5):
        values = np.asarray(features[sample, 0])
        values[3] = 0  # channel 3 silent in every view 0
        features[sample, 0] = values
        rebind(path, sample, 0)
    stats = cache_stats(path, subset=3, progress=False)
    assert stats.sample_views == [(token_of(0), 0), (token_of(2), 0), (token_of(4), 0)]
    neck = {m.name: m for m in stats.maps}["features/neck"]
    assert neck.near_dead_channels == 1 and neck.channel_energy[3] == 0.0
    assert neck.zero_fraction == pytest.approx(1 / 5)
    result = CliRunner().invoke(cli, ["inspect-cache", str(path), "--stats", "--subset", "3", "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout)
    assert parsed["stats"]["sample_views"] == 3
    text = CliRunner().invoke(cli, ["inspect-cache", str(path), "--stats", "--subset", "3"])
    assert "near-dead 1 of 5" in text.output and "half of the attention mass" in text.output
