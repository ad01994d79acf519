"""Looking inside a teacher-feature store: summary, end-to-end verification, statistics and comparison.

    summary = summarize_cache("runs/cache.zarr")          # manifest, progress, sizes on disk
    report = verify_cache("runs/cache.zarr", workers=2)   # every chunk decoded and checked; report.problems
    stats = cache_stats("runs/cache.zarr", subset=20)     # per-layer fp32 statistics
    diff = compare_caches("fp16.zarr", "int8.zarr")      # per-array cosine / max-abs difference

Every function returns a plain dataclass whose `to_json()` is what `distillbev inspect-cache --json` prints.
Verification never stops at the first bad chunk: each sample-view is checked on its own and every problem is
named by sample token, view and array.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...cache_schemas import v2
from ..errors import CacheError
from .checks import marker_format
from .chunks import (ChunkError, chunk_coords, crc_problem, decode_chunk, decode_single_chunk,
                     expect_supported_codecs, get_chunk_bytes, single_chunk_bytes)
from .location import StoreLocation
from .manifest import ViewConfig, layer_specs, tokens_sha256, views_array
from .marker import MarkerFormat, is_set, stored_crc
from .reader import TeacherCache

ATTENTION_MEAN_TOLERANCE = 1e-2  # |mean(A) - 1| above this means the attention chunk is not what extraction wrote
DEAD_CHANNEL_RATIO = 1e-6  # a channel is near-dead when its energy is below this fraction of the mean energy
TOP_CHANNELS = 5


@dataclass(frozen=True)
class ArraySpec:
    """What the manifest says one array of the store must look like."""

    name: str
    shape: tuple[int, ...]
    dtype: str | None  # None: a string array (checked by its values)
    dimension_names: tuple[str, ...]
    per_sample_view: bool  # one chunk per (sample, view)


def expected_arrays(manifest: dict[str, Any]) -> list[ArraySpec]:
    """Every array of the layout except the teacher head, with the shape and dtype the manifest implies."""
    s, v = int(manifest["sample_count"]), int(manifest["views"]["count"])
    int8 = manifest["storage"]["dtype"] == "int8"
    markers = marker_format(manifest)
    specs = []
    for layer in layer_specs(manifest):
        specs.append(ArraySpec(v2.feature_array(layer.name), (s, v, layer.channels, *layer.shape),
                               v2.FEATURE_DTYPES[manifest["storage"]["dtype"]], v2.DIMS_MAP, True))
        if int8:
            for name in (v2.feature_scale_array(layer.name), v2.feature_offset_array(layer.name)):
                specs.append(ArraySpec(name, (s, v, layer.channels), v2.SCALE_DTYPE, v2.DIMS_CHANNEL, True))
        specs.append(ArraySpec(v2.attention_array(layer.name), (s, v, *layer.shape), v2.ATTENTION_DTYPE,
                               v2.DIMS_PLANE, True))
    specs += [
        ArraySpec(v2.HEATMAP, (s, v, v2.HEATMAP_CHANNELS, *manifest["heatmap"]["shape"]), v2.HEATMAP_DTYPE,
                  v2.DIMS_MAP, True),
        ArraySpec(v2.OCCUPANCY, (s, v, *manifest["occupancy"]["shape"]), "bool", v2.DIMS_PLANE, True),
        ArraySpec(v2.DONE, (s, v, *markers.shape_tail), v2.DONE_DTYPE,
                  v2.DIMS_DONE if markers.bound else v2.DIMS_BARE_DONE, True),
        ArraySpec(v2.VIEWS, (s, v, 4), v2.VIEWS_DTYPE, v2.DIMS_VIEWS, False),
        ArraySpec(v2.SAMPLE_TOKENS, (s,), None, v2.DIMS_TOKENS, False),
    ]
    return specs


def _open_group(path: StoreLocation):
    return path.open_group(mode="r")


def _bytes_under(location: StoreLocation, prefix: str) -> int:
    """Stored bytes under one array's prefix (local: every file in its folder, stray ones included)."""
    if location.is_local:
        folder = location.path / prefix
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    from zarr.core.sync import sync

    return int(sync(location.zarr_store(read_only=True).getsize_prefix(prefix)))


# --------------------------------------------------------------------------------------------------- summary
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


def _all_arrays(group: Any, prefix: str = ""):
    import warnings

    import zarr

    with warnings.catch_warnings():  # the marker and lock files beside the zarr nodes are not zarr objects
        warnings.filterwarnings("ignore", message="Object at distillbev", category=UserWarning)
        members = sorted(group.members())
    for name, node in members:
        if isinstance(node, zarr.Array):
            yield f"{prefix}{name}", node
        else:
            yield from _all_arrays(node, f"{prefix}{name}/")


def summarize_cache(path: str | Path | StoreLocation) -> CacheSummary:
    """Manifest, extraction progress and per-array size on disk of a (complete or partial) store."""
    cache = TeacherCache.open(path, allow_partial=True)
    path = cache.path
    group = _open_group(path)
    done = _read_done_tolerant(group[v2.DONE])
    arrays = []
    for name, array in _all_arrays(group):
        codecs = [type(c).__name__ for c in (*array.filters, array.serializer, *array.compressors) if c is not None]
        raw = int(np.prod(array.shape)) * array.dtype.itemsize if array.dtype != object else 0
        if len(array.shape) >= 2 and array.shape[:2] == done.shape and name != v2.VIEWS:
            raw = raw * int(done.sum()) // max(done.size, 1)  # only the extracted sample-views hold data
        arrays.append(ArrayInfo(name, list(array.shape), list(array.chunks), str(array.dtype), codecs,
                                list(array.metadata.dimension_names or ()), _bytes_under(path, array.path), raw))
    complete = done.all(axis=1)
    return CacheSummary(str(path), cache.manifest, int(done.sum()), int(done.size), int(complete.sum()),
                        [t for t, ok in zip(cache.sample_tokens, complete) if not ok], arrays)


def _read_done_tolerant(done_array: Any) -> np.ndarray:
    """(S, V) bool: a marker not all zero is done; an unreadable marker chunk counts as not done (verify names it)."""
    try:
        values = np.asarray(done_array[...])
        return values.reshape(*values.shape[:2], -1).any(axis=-1)
    except Exception:
        out = np.zeros(done_array.shape[:2], dtype=bool)
        for index in np.ndindex(*done_array.shape[:2]):
            try:
                out[index] = bool(np.asarray(done_array[index]).any())
            except Exception:
                pass
        return out


# ---------------------------------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class VerifyProblem:
    """One thing wrong with a store; sample fields are None for store-wide problems."""

    message: str
    array: str | None = None
    sample_index: int | None = None
    sample_token: str | None = None
    view: int | None = None

    def describe(self) -> str:
        where = []
        if self.sample_token is not None:
            where.append(f"sample {self.sample_token} (index {self.sample_index})")
        if self.view is not None:
            where.append(f"view {self.view}")
        if self.array is not None:
            where.append(self.array)
        return f"{', '.join(where)}: {self.message}" if where else self.message


@dataclass
class VerifyReport:
    path: str
    problems: list[VerifyProblem]
    sample_views_checked: int
    chunks_read: int
    seconds: float
    repair_command: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_sample_views(self) -> list[tuple[str, int]]:
        return sorted({(p.sample_token, p.view) for p in self.problems if p.sample_token is not None})

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "sample_views_checked": self.sample_views_checked,
                "chunks_read": self.chunks_read, "seconds": self.seconds, "repair_command": self.repair_command,
                "problems": [{**asdict(p), "text": p.describe()} for p in self.problems]}


def _check_layout(group: Any, manifest: dict[str, Any], specs: list[ArraySpec]) -> tuple[list[VerifyProblem], dict]:
    """Store-wide checks: status, array presence, shape, dtype, dimension names, chunking, checksum, tokens."""
    import zarr

    problems, arrays = [], {}
    if manifest["status"] != v2.STATUS_COMPLETE:
        problems.append(VerifyProblem(f"status is {manifest['status']!r}, not 'complete': the extraction has not "
                                      f"finished; rerun the same extract-teacher command"))
    for spec in specs:
        try:
            array = group[spec.name]
        except KeyError:
            problems.append(VerifyProblem("array missing from the store", spec.name))
            continue
        if not isinstance(array, zarr.Array):
            problems.append(VerifyProblem("expected an array, found a group", spec.name))
            continue
        found = []
        if tuple(array.shape) != spec.shape:
            found.append(f"shape {tuple(array.shape)} (manifest implies {spec.shape})")
        if spec.dtype is not None and str(array.dtype) != spec.dtype:
            found.append(f"dtype {array.dtype} (expected {spec.dtype})")
        names = tuple(array.metadata.dimension_names or ())
        if names != spec.dimension_names:
            found.append(f"dimension_names {names} (expected {spec.dimension_names})")
        if spec.per_sample_view and tuple(array.chunks[:2]) != (1, 1):
            found.append(f"chunks {tuple(array.chunks)} (expected one chunk per sample-view)")
        if spec.dtype is not None and not any(type(c).__name__ == "Crc32cCodec" for c in array.compressors):
            found.append("no crc32c checksum codec (corruption would go unnoticed)")
        problems += [VerifyProblem(text, spec.name) for text in found]
        if not found:
            arrays[spec.name] = array
    if v2.SAMPLE_TOKENS in arrays:
        problems += _token_problems(arrays[v2.SAMPLE_TOKENS], manifest)
    if v2.VIEWS in arrays:
        try:
            stored = decode_single_chunk(arrays[v2.VIEWS])
            expected = views_array(ViewConfig.from_json(manifest["views"]), int(manifest["sample_count"]))
            if not np.array_equal(stored, expected):
                problems.append(VerifyProblem("view augmentations differ from the manifest's seed and ranges",
                                              v2.VIEWS))
        except ChunkError as exc:
            problems.append(VerifyProblem(str(exc), v2.VIEWS))
    problems += _teacher_head_problems(group)
    return problems, arrays


def _token_problems(array: Any, manifest: dict[str, Any]) -> list[VerifyProblem]:
    problem = crc_problem(single_chunk_bytes(array))
    if problem is not None:
        return [VerifyProblem(problem, v2.SAMPLE_TOKENS)]
    tokens = [str(t) for t in array[...]]
    problems = []
    if tokens_sha256(tokens) != manifest["dataset"].get("sample_tokens_sha256"):
        problems.append(VerifyProblem("the tokens do not match the manifest's sample_tokens_sha256",
                                      v2.SAMPLE_TOKENS))
    if len(set(tokens)) != len(tokens):
        duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
        problems.append(VerifyProblem(f"{len(duplicates)} duplicated tokens, e.g. {duplicates[:3]}",
                                      v2.SAMPLE_TOKENS))
    if any(not t for t in tokens):
        problems.append(VerifyProblem("empty sample token(s)", v2.SAMPLE_TOKENS))
    return problems


def _teacher_head_problems(group: Any) -> list[VerifyProblem]:
    """Every teacher_head/* array must be present, checksummed and finite."""
    import zarr

    if v2.TEACHER_HEAD not in group:
        return [VerifyProblem("the teacher head group is missing (the student cannot inherit it)", v2.TEACHER_HEAD)]
    problems = []
    for name, array in _all_arrays(group[v2.TEACHER_HEAD], f"{v2.TEACHER_HEAD}/"):
        if not isinstance(array, zarr.Array):
            continue
        try:
            expect_supported_codecs(array)
            values = decode_single_chunk(array)
        except ChunkError as exc:
            problems.append(VerifyProblem(str(exc), name))
            continue
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            problems.append(VerifyProblem("NaN/Inf values", name))
    return problems


def _codec_text(storage: dict[str, Any]) -> str:
    """e.g. 'zstd-3+crc32c', or 'int8 error 0.03, zstd-3+crc32c' for an int8 store with an error budget."""
    text = f"{storage['codec']}-{storage['level']}+{storage['checksum']}"
    error = v2.int8_error(storage)
    return f"int8 error {error:g}, {text}" if error else text


def _value_problems(name: str, values: np.ndarray) -> list[str]:
    """Plausibility of one decoded sample-view chunk."""
    if values.dtype.kind != "f":
        return []
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        return [f"{nan} NaN and {inf} Inf values of {values.size}"]
    if name == v2.HEATMAP and (values.min() < 0 or values.max() > 1):
        return [f"heatmap probabilities outside [0, 1] (min {values.min():.3g}, max {values.max():.3g})"]
    if name.startswith("attention/") and abs(float(values.mean(dtype=np.float64)) - 1) > ATTENTION_MEAN_TOLERANCE:
        return [f"attention mean {values.mean(dtype=np.float64):.4g}, expected 1"]
    if name.endswith("_scale") and values.min() <= 0:
        return ["non-positive int8 scale"]
    return []


def _check_sample(arrays: dict, sample: int, token: str, num_views: int, markers: MarkerFormat,
                  describe=None) -> tuple[list[VerifyProblem], int]:
    """Every chunk of one sample's views, read strictly (a missing chunk is a problem, never zeros), and (a bound
    store) each view's done marker against the store, the sample-view and the CRC32C of the chunks read.

    describe: sample index -> text naming it, for a marker written for another sample-view."""
    problems, reads = [], 0
    for view in range(num_views):
        def problem(message, array=None):
            problems.append(VerifyProblem(message, array, sample, token, view))

        marker = None
        if v2.DONE in arrays:
            reads += 1
            try:
                done = arrays[v2.DONE]
                marker = decode_chunk(done, get_chunk_bytes(done, chunk_coords(done, sample, view)))[0, 0]
                if not is_set(marker):
                    problem("not extracted (done marker 0)", v2.DONE)
                    continue
            except ChunkError as exc:
                problem(f"done marker: {exc}", v2.DONE)
        crcs = {}
        for name, array in arrays.items():
            if name in (v2.DONE, v2.VIEWS, v2.SAMPLE_TOKENS):
                continue
            reads += 1
            raw = get_chunk_bytes(array, chunk_coords(array, sample, view))
            try:
                values = decode_chunk(array, raw)[0, 0]
            except ChunkError as exc:
                problem(str(exc), name)
                continue
            crcs[name] = stored_crc(raw)
            for text in _value_problems(name, values):
                problem(text, name)
        if markers.bound and marker is not None:
            wrong = markers.problem(sample, view, marker, describe)
            if wrong is not None:
                problem(wrong, v2.DONE)
            else:
                for name, text in markers.chunk_problems(marker, {n: crcs[n] for n in markers.arrays
                                                                  if n in crcs}).items():
                    problem(text, name)
    return problems, reads


def verify_cache(path: str | Path | StoreLocation, workers: int = 2, progress: bool = True) -> VerifyReport:
    """Check a store end to end: manifest, layout, completeness and every chunk (checksum, NaN/Inf, ranges).

    Samples are checked in parallel by `workers` threads (zarr's decoding releases the GIL). Raises CacheError
    only when the store cannot be opened at all; everything else is collected in the report.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    cache = TeacherCache.open(path, allow_partial=True, check_static=False)
    path = cache.path
    group = _open_group(path)
    manifest = cache.manifest
    problems, arrays = _check_layout(group, manifest, expected_arrays(manifest))
    samples, num_views = int(manifest["sample_count"]), int(manifest["views"]["count"])
    tokens = cache.sample_tokens if len(cache.sample_tokens) == samples else [f"#{i}" for i in range(samples)]
    reads = 0
    markers = marker_format(manifest)

    def describe(index: int) -> str:
        return f"sample {tokens[index]} (index {index})" if 0 <= index < samples else f"sample index {index}"

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cache-verify") as pool:
        jobs = pool.map(lambda i: _check_sample(arrays, i, tokens[i], num_views, markers, describe), range(samples))
        for sample_problems, sample_reads in tqdm(jobs, total=samples, desc="verify", unit="sample",
                                                  disable=not progress):
            problems += sample_problems
            reads += sample_reads
    return VerifyReport(str(path), problems, samples * num_views, reads, time.perf_counter() - start,
                        cache.repair_command)


# ----------------------------------------------------------------------------------------------------- stats
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
    chosen = select_sample_views(cache, _read_done_tolerant(_open_group(cache.path)[v2.DONE]), subset)
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


# --------------------------------------------------------------------------------------------------- compare
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
    done_a = _read_done_tolerant(_open_group(a.path)[v2.DONE])
    done_b = _read_done_tolerant(_open_group(b.path)[v2.DONE])
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
