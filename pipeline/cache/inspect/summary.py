"""`inspect-cache STORE`: what a store holds, how far its extraction got and its size on disk, per array."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ....cache_schemas import v2
from ..location import StoreLocation
from ..reader import TeacherCache
from .arrays import all_arrays, read_done_tolerant


def _bytes_under(location: StoreLocation, prefix: str) -> int:
    """Stored bytes under one array's prefix (local: every file in its folder, stray ones included)."""
    if location.is_local:
        folder = location.path / prefix
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    from zarr.core.sync import sync

    return int(sync(location.zarr_store(read_only=True).getsize_prefix(prefix)))


@dataclass
class ArrayInfo:
    """One stored array: layout, codecs and size. raw_bytes counts the extracted sample-views at the stored dtype."""

    name: str
    shape: list[int]
    chunks: list[int]
    dtype: str
    codecs: list[str]
    dimension_names: list[str]
    stored_bytes: int
    raw_bytes: int

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes and self.raw_bytes else None


@dataclass
class CacheSummary:
    """What a store holds and how far its extraction got."""

    path: str
    manifest: dict[str, Any]
    sample_views_done: int
    sample_views_total: int
    samples_complete: int
    missing_tokens: list[str]  # samples with at least one view not extracted
    arrays: list[ArrayInfo]

    @property
    def stored_bytes(self) -> int:
        return sum(a.stored_bytes for a in self.arrays)

    @property
    def raw_bytes(self) -> int:
        return sum(a.raw_bytes for a in self.arrays)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        grid = m["bev_grid"]
        return {
            "path": self.path, "schema_version": m["schema_version"], "status": m["status"],
            "created_at": m["created_at"], "package_version": m["package_version"],
            "teacher": {"config": m["teacher"]["config"], "checkpoint_path": m["teacher"]["checkpoint_path"],
                        "checkpoint_sha256": m["teacher"]["checkpoint_sha256"],
                        "checkpoint_sha256_short": m["teacher"]["checkpoint_sha256"][:12]},
            "dataset": m["dataset"],
            "bev_grid": {**grid, "shape": [round((grid["y_max"] - grid["y_min"]) / grid["resolution"]),
                                           round((grid["x_max"] - grid["x_min"]) / grid["resolution"])]},
            "layers": {name: {**spec, "dtype": v2.FEATURE_DTYPES[m["storage"]["dtype"]],
                              "codec": _codec_text(m["storage"])}
                       for name, spec in m["layers"].items()},
            "heatmap": m["heatmap"], "occupancy": m["occupancy"], "storage": m["storage"], "views": m["views"],
            "samples": {"total": m["sample_count"], "complete": self.samples_complete,
                        "missing": len(self.missing_tokens), "missing_tokens": self.missing_tokens[:20],
                        "sample_views_done": self.sample_views_done, "sample_views_total": self.sample_views_total},
            "arrays": [{**asdict(a), "compression_ratio": a.compression_ratio} for a in self.arrays],
            "stored_bytes": self.stored_bytes, "raw_bytes": self.raw_bytes,
            "compression_ratio": self.raw_bytes / self.stored_bytes if self.stored_bytes else None,
        }


def summarize_cache(path: str | Path | StoreLocation) -> CacheSummary:
    """Manifest, extraction progress and per-array size on disk of a (complete or partial) store."""
    cache = TeacherCache.open(path, allow_partial=True)
    path = cache.path
    group = path.open_group(mode="r")
    done = read_done_tolerant(group[v2.DONE])
    arrays = []
    for name, array in all_arrays(group):
        codecs = [type(c).__name__ for c in (*array.filters, array.serializer, *array.compressors) if c is not None]
        raw = int(np.prod(array.shape)) * array.dtype.itemsize if array.dtype != object else 0
        if len(array.shape) >= 2 and array.shape[:2] == done.shape and name != v2.VIEWS:
            raw = raw * int(done.sum()) // max(done.size, 1)  # only the extracted sample-views hold data
        arrays.append(ArrayInfo(name, list(array.shape), list(array.chunks), str(array.dtype), codecs,
                                list(array.metadata.dimension_names or ()), _bytes_under(path, array.path), raw))
    complete = done.all(axis=1)
    return CacheSummary(str(path), cache.manifest, int(done.sum()), int(done.size), int(complete.sum()),
                        [t for t, ok in zip(cache.sample_tokens, complete) if not ok], arrays)


def _codec_text(storage: dict[str, Any]) -> str:
    """e.g. 'zstd-3+crc32c', or 'int8 error 0.03, zstd-3+crc32c' for an int8 store with an error budget."""
    text = f"{storage['codec']}-{storage['level']}+{storage['checksum']}"
    error = v2.int8_error(storage)
    return f"int8 error {error:g}, {text}" if error else text
