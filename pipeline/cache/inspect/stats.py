"""`inspect-cache STORE --stats`: per-layer statistics of the stored maps, in fp32 (int8 dequantised)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ....cache_schemas import v2
from ...errors import CacheError
from ..location import StoreLocation
from ..reader import TeacherCache
from .arrays import read_done_tolerant

DEAD_CHANNEL_RATIO = 1e-6  # a channel is near-dead when its energy is below this fraction of the mean energy
TOP_CHANNELS = 5


class _Accumulator:
    """Running fp32-derived statistics of (C, ...) maps, summed in float64."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.total = self.squares = 0.0
        self.zeros = 0
        self.low, self.high = np.inf, -np.inf
        self.channel_sum = np.zeros(channels)
        self.channel_squares = np.zeros(channels)
        self.channel_max = np.full(channels, -np.inf)
        self.channel_count = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        flat = values.reshape(values.shape[0], -1).astype(np.float64)  # (C, cells)
        self.count += flat.size
        self.total += float(flat.sum())
        self.squares += float((flat * flat).sum())
        self.zeros += int((values == 0).sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        self.channel_sum += flat.sum(axis=1)
        self.channel_squares += (flat * flat).sum(axis=1)
        self.channel_max = np.maximum(self.channel_max, flat.max(axis=1))
        self.channel_count += flat.shape[1]


@dataclass
class MapStats:
    """Statistics of one stored map over the selected sample-views, in fp32 (int8 maps dequantised)."""

    name: str
    shape: list[int]
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    channel_energy: list[float]  # mean of squares per channel (one value for channel-less maps)
    top_channels: list[tuple[int, float]]  # the TOP_CHANNELS most energetic (channel, energy)
    near_dead_channels: int  # energy < DEAD_CHANNEL_RATIO x the mean channel energy
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheStats:
    path: str
    sample_views: list[tuple[str, int]]
    maps: list[MapStats]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sample_views": len(self.sample_views),
                "samples": sorted({token for token, _ in self.sample_views}), "maps": [asdict(m) for m in self.maps]}


def select_sample_views(cache: TeacherCache, done: np.ndarray, subset: int | None) -> list[tuple[int, int]]:
    """All extracted sample-views, or view 0 of `subset` evenly spaced samples."""
    if subset is not None:
        if subset < 1:
            raise CacheError(f"--subset {subset}: expected a positive number of samples")
        indices = np.unique(np.linspace(0, cache.num_samples - 1, min(subset, cache.num_samples)).round().astype(int))
        chosen = [(int(i), 0) for i in indices]
    else:
        chosen = [(s, v) for s in range(cache.num_samples) for v in range(cache.num_views)]
    return [(s, v) for s, v in chosen if done[s, v]]


def _map_stats(name: str, shape: list[int], acc: _Accumulator, extra: dict[str, Any]) -> MapStats:
    mean = acc.total / acc.count
    energy = acc.channel_squares / max(acc.channel_count, 1)
    order = np.argsort(-energy, kind="stable")[:TOP_CHANNELS]
    dead = int((energy < DEAD_CHANNEL_RATIO * max(float(energy.mean()), 1e-30)).sum())
    return MapStats(name, shape, mean, float(np.sqrt(max(acc.squares / acc.count - mean * mean, 0.0))), acc.low,
                    acc.high, acc.zeros / acc.count, energy.tolist(), [(int(c), float(energy[c])) for c in order],
                    dead, extra)


def cache_stats(path: str | Path | StoreLocation, subset: int | None = None, progress: bool = True,
                fp_threshold: float = 0.1) -> CacheStats:
    """Per-layer feature, attention, heatmap and occupancy statistics over extracted sample-views.

    fp_threshold: the heatmap statistic `above_fp_threshold` counts cells whose max-class probability exceeds it.
    """
    from tqdm import tqdm

    cache = TeacherCache.open(path, allow_partial=True)
    chosen = select_sample_views(cache, read_done_tolerant(cache.path.open_group(mode="r")[v2.DONE]), subset)
    if not chosen:
        raise CacheError(f"{cache.path}: no extracted sample-views to compute statistics over; finish the "
                         f"extraction first")
    layers = cache.layers
    features = {layer.name: _Accumulator(layer.channels) for layer in layers}
    attention = {layer.name: _Accumulator(1) for layer in layers}
    half_mass = {layer.name: 0.0 for layer in layers}
    heatmap = _Accumulator(v2.HEATMAP_CHANNELS)
    above, occupied = 0.0, 0.0
    for sample, view in tqdm(chosen, desc="stats", unit="view", disable=not progress):
        targets = cache.read(sample, view)
        for layer in layers:
            features[layer.name].update(targets.features[layer.name].numpy())
            values = targets.attention[layer.name].numpy()
            attention[layer.name].update(values[None])
            ordered = np.sort(values.reshape(-1).astype(np.float64))[::-1]
            half_mass[layer.name] += (np.searchsorted(np.cumsum(ordered), 0.5 * ordered.sum()) + 1) / ordered.size
        probabilities = targets.heatmap.numpy()
        heatmap.update(probabilities)
        above += float((probabilities.max(axis=0) > fp_threshold).mean())
        occupied += float(targets.occupancy.numpy().mean())
    n = len(chosen)
    maps = []
    for layer in layers:
        maps.append(_map_stats(v2.feature_array(layer.name), [layer.channels, *layer.shape], features[layer.name], {}))
        maps.append(_map_stats(v2.attention_array(layer.name), list(layer.shape), attention[layer.name],
                               {"half_mass_cell_fraction": half_mass[layer.name] / n}))
    class_mean = heatmap.channel_sum / max(heatmap.channel_count, 1)
    maps.append(_map_stats(v2.HEATMAP, [v2.HEATMAP_CHANNELS, *cache.manifest["heatmap"]["shape"]], heatmap,
                           {"class_mean": class_mean.tolist(), "class_max": heatmap.channel_max.tolist(),
                            "above_fp_threshold": above / n, "fp_threshold": fp_threshold,
                            "occupied_cell_fraction": occupied / n}))
    return CacheStats(str(cache.path), [(cache.sample_tokens[s], v) for s, v in chosen], maps)

