"""`inspect-cache STORE --verify`: a store checked end to end, every problem named.

Verification never stops at the first bad chunk: each sample-view is checked on its own and every problem is
named by sample token, view and array.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ....cache_schemas import v2
from ..chunks import (ChunkError, chunk_coords, crc_problem, decode_chunk, decode_single_chunk,
                      expect_supported_codecs, get_chunk_bytes, single_chunk_bytes)
from ..checks import marker_format
from ..location import StoreLocation
from ..manifest import ViewConfig, layer_specs, tokens_sha256, views_array
from ..marker import MarkerFormat, is_set, stored_crc
from ..reader import TeacherCache
from .arrays import all_arrays

ATTENTION_MEAN_TOLERANCE = 1e-2  # |mean(A) - 1| above this means the attention chunk is not what extraction wrote


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
    for name, array in all_arrays(group[v2.TEACHER_HEAD], f"{v2.TEACHER_HEAD}/"):
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
    group = path.open_group(mode="r")
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
