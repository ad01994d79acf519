"""`inspect-cache STORE --compare STORE2`: how closely two stores agree, map by map."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ....cache_schemas import v2
from ...errors import CacheError
from ..location import StoreLocation
from ..reader import TeacherCache
from .arrays import read_done_tolerant


@dataclass
class ArrayComparison:
    """Agreement of one map between two stores; cosine is per sample-view over the flattened map."""

    name: str
    cosine_mean: float
    cosine_min: float
    cosine_min_at: tuple[str, int]
    max_abs: float
    max_abs_at: tuple[str, int]
    mean_abs: float


@dataclass
class CompareReport:
    path_a: str
    path_b: str
    common_samples: int
    sample_views: int
    skipped_views: int  # same token and view index but a different augmentation (different view seeds)
    arrays: list[ArrayComparison]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "arrays": [asdict(a) for a in self.arrays]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0:
        return 1.0 if not (a.any() or b.any()) else 0.0
    return float(np.dot(a, b) / norm)


def compare_caches(path_a: str | Path | StoreLocation, path_b: str | Path | StoreLocation,
                   progress: bool = True) -> CompareReport:
    """Features, attention and heatmap of two stores over their common tokens and identically augmented views.

    CacheError when the layers or map shapes differ (nothing to compare) or no sample-view is in both stores.
    """
    from tqdm import tqdm

    a, b = TeacherCache.open(path_a, allow_partial=True), TeacherCache.open(path_b, allow_partial=True)
    shapes_a = {layer.name: (layer.channels, *layer.shape) for layer in a.layers}
    shapes_b = {layer.name: (layer.channels, *layer.shape) for layer in b.layers}
    shapes_a[v2.HEATMAP] = (v2.HEATMAP_CHANNELS, *a.manifest["heatmap"]["shape"])
    shapes_b[v2.HEATMAP] = (v2.HEATMAP_CHANNELS, *b.manifest["heatmap"]["shape"])
    if shapes_a != shapes_b:
        differences = [f"{name}: {shapes_a.get(name, 'absent')} vs {shapes_b.get(name, 'absent')}"
                       for name in sorted(set(shapes_a) | set(shapes_b)) if shapes_a.get(name) != shapes_b.get(name)]
        raise CacheError(f"{a.path} and {b.path} hold different layers or shapes ({'; '.join(differences)}); "
                         f"compare stores of the same teacher architecture and grid")
    done_a = read_done_tolerant(a.path.open_group(mode="r")[v2.DONE])
    done_b = read_done_tolerant(b.path.open_group(mode="r")[v2.DONE])
    tokens_b = set(b.sample_tokens)
    common = [(i, b.index_of(t)) for i, t in enumerate(a.sample_tokens) if t in tokens_b]
    pairs, skipped = [], 0
    for i, j in common:
        for view in range(min(a.num_views, b.num_views)):
            if not np.allclose(a.views[i, view], b.views[j, view], rtol=0, atol=1e-12):
                skipped += 1
            elif done_a[i, view] and done_b[j, view]:
                pairs.append((i, j, view))
    if not pairs:
        raise CacheError(f"{a.path} and {b.path} share no extracted sample-view ({len(common)} common tokens, "
                         f"{skipped} views augmented differently); compare stores of the same split and view seed")
    names = [v2.feature_array(n) for n in shapes_a if n != v2.HEATMAP]
    names += [v2.attention_array(n) for n in shapes_a if n != v2.HEATMAP] + [v2.HEATMAP]
    cosines = {n: [] for n in names}
    max_abs = {n: (-1.0, ("", 0)) for n in names}
    abs_sum = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    for i, j, view in tqdm(pairs, desc="compare", unit="view", disable=not progress):
        left, right = a.read(i, view), b.read(j, view)
        where = (a.sample_tokens[i], view)
        maps = [(v2.feature_array(n), left.features[n], right.features[n]) for n in left.features]
        maps += [(v2.attention_array(n), left.attention[n], right.attention[n]) for n in left.attention]
        maps.append((v2.HEATMAP, left.heatmap, right.heatmap))
        for name, x, y in maps:
            x, y = x.numpy(), y.numpy()
            cosines[name].append((_cosine(x, y), where))
            difference = np.abs(x.astype(np.float64) - y.astype(np.float64))
            if float(difference.max()) > max_abs[name][0]:
                max_abs[name] = (float(difference.max()), where)
            abs_sum[name] += float(difference.sum())
            counts[name] += difference.size
    arrays = []
    for name in names:
        values = [c for c, _ in cosines[name]]
        worst = min(cosines[name], key=lambda item: item[0])
        arrays.append(ArrayComparison(name, float(np.mean(values)), worst[0], worst[1], max_abs[name][0],
                                      max_abs[name][1], abs_sum[name] / counts[name]))
    return CompareReport(str(a.path), str(b.path), len(common), len(pairs), skipped, arrays)
