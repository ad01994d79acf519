"""The bytes each sample's targets were computed from: `input_digest`, recorded by the writer and checked later.

    input_digest    (S, F, 32) uint8    SHA-256 of each file sample s's teacher points were read from, in read order
                                        (`data/digest.py`; F = `input_files_per_sample`; zero rows: fewer files)

The loader hashes the files while reading them (no second read of the dataset). The writer
(`InputDigestRecorder`) stores a sample's rows with the first of its sample-views it writes, in the same batch as that
sample-view's chunks (before its done marker), and compares every later sample-view of the sample with them, in the
same run or a later one (resume, repair): a sample-view computed from other bytes is refused before any of its
chunks is written, so a store never mixes targets of two versions of a sample's files. `verify_input_files`
re-hashes the files of some or all samples and compares them with the store (train-student --verify-data).

A store created before this array existed has none: its inputs are known by the manifest's fingerprint only (names,
timestamps, calibration, poses and sizes), which the writer and the verification say once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...cache_schemas import v2
from ..data.digest import (InputDigests, digest_hex, extraction_input_files, file_digest, files_per_sample,
                           with_virtual_files)
from ..data.preflight import lidar_inputs
from ..errors import CacheError, DataError
from .chunks import ChunkError, chunk_key, decode_chunk, encode_chunk, get_chunk_bytes

logger = logging.getLogger(__name__)

DEFAULT_VERIFY_SAMPLES = 32  # samples whose files are re-hashed by default (train-student --verify-data's "32")
NOT_RECORDED_HINT = ("the store was created before input digests were recorded: its inputs are known by names, "
                     "timestamps, calibration, poses and sizes only; extract into a new --cache to have them "
                     "checked by content")


def teacher_input_settings(manifest: dict[str, Any]) -> tuple[int, bool, int]:
    """(num_sweeps, virtual points read, sweep_candidates) of the points the store's teacher read."""
    loading = manifest["dataset"].get("point_loading", {})
    num_sweeps = int(loading.get("num_sweeps", manifest["dataset"]["num_sweeps"]))
    return num_sweeps, loading.get("point_features", "lidar") == "mvp", int(loading.get("sweep_candidates",
                                                                                         num_sweeps))


def input_files_per_sample(manifest: dict[str, Any]) -> int:
    """F of `input_digest`: the most files one sample's teacher points read (key frame + sweeps, x2 with MVP)."""
    num_sweeps, virtual, _ = teacher_input_settings(manifest)
    return files_per_sample(num_sweeps, virtual)


def create_input_digest_array(group: Any, manifest: dict[str, Any], **codecs: Any) -> None:
    """Create the empty (S, F, 32) array in a new layout, one chunk per sample (a worker owns whole samples)."""
    samples, files = int(manifest["sample_count"]), input_files_per_sample(manifest)
    group.create_array(v2.INPUT_DIGEST, shape=(samples, files, v2.INPUT_DIGEST_BYTES),
                       chunks=(1, files, v2.INPUT_DIGEST_BYTES), dtype=v2.INPUT_DIGEST_DTYPE, fill_value=0,
                       dimension_names=v2.DIMS_INPUT_DIGEST, **codecs)


def read_sample_digest(array: Any, sample: int) -> np.ndarray | None:
    """(F, 32) uint8 rows stored for `sample`, None when none were recorded (chunk absent or all zero); ChunkError
    when the chunk is damaged."""
    raw = get_chunk_bytes(array, (sample, 0, 0))
    if raw is None:
        return None
    rows = decode_chunk(array, raw)[0]
    return rows if rows.any() else None


class InputDigestRecorder:
    """The writer's side: record each sample's input digests once, refuse a sample-view read from other bytes.

    Sample-views of one sample arrive one after the other (a worker owns whole samples), so the stored rows are
    read once per sample.
    """

    def __init__(self, group: Any, path: Any) -> None:
        self.path = path
        self.array = group[v2.INPUT_DIGEST] if v2.INPUT_DIGEST in group else None
        self._sample: int | None = None
        self._rows: np.ndarray | None = None
        if self.array is None:
            logger.warning("%s: no %s array: the files read are not checked against the sample-views already "
                           "written; %s", path, v2.INPUT_DIGEST, NOT_RECORDED_HINT)

    def chunks_for(self, record: Any) -> dict[str, bytes]:
        """The encoded input_digest chunk to write with `record` (empty when the sample's rows are already stored
        or the record carries no digests); CacheError when the sample was read from other bytes before."""
        inputs: InputDigests | None = record.inputs
        if self.array is None or inputs is None:
            return {}
        files = self.array.shape[1]
        try:
            rows = inputs.rows(files)
        except ValueError as exc:
            raise CacheError(f"{self.path}: sample {record.sample_token}: {exc}; the point loading differs from the "
                             f"store's manifest") from None
        sample = record.sample_index
        if self._sample != sample:
            self._sample, self._rows = sample, self._stored(record)
        if self._rows is None:
            self._rows = rows
            return {chunk_key(self.array, (sample, 0, 0)): encode_chunk(self.array, rows[None])}
        if not np.array_equal(self._rows, rows):
            raise CacheError(self._mismatch(record, rows))
        return {}

    def _stored(self, record: Any) -> np.ndarray | None:
        try:
            return read_sample_digest(self.array, record.sample_index)
        except ChunkError as exc:
            logger.warning("%s: %s of sample %s is unreadable (%s): it is recorded again from the files read now, "
                           "and the sample-views of that sample already written are not compared with them",
                           self.path, v2.INPUT_DIGEST, record.sample_token, exc)
            return None

    def _mismatch(self, record: Any, rows: np.ndarray) -> str:
        inputs: InputDigests = record.inputs
        changed = []
        for row in range(rows.shape[0]):
            if np.array_equal(rows[row], self._rows[row]):
                continue
            name = inputs.paths[row] if row < len(inputs.paths) else f"input file {row + 1} (not read now)"
            changed.append(f"{name} (sha256 now {_short(rows[row])}, recorded {_short(self._rows[row])})")
        return (f"{self.path}: sample {record.sample_token} (index {record.sample_index}) was read from other bytes "
                f"than its sample-views already in the store: {'; '.join(changed)}; extracting it now would mix "
                f"targets of two versions of its input files (names and sizes may be unchanged). Nothing of this "
                f"sample-view was written. Restore the file(s) as they were when this store was extracted, or "
                f"re-extract the whole store from the current files with --overwrite (or into a new --cache)")


def _short(row: np.ndarray) -> str:
    return digest_hex(row)[:16] if row.any() else "none"


@dataclass
class DataVerification:
    """What `verify_input_files` checked: samples and files re-hashed, their bytes and the time it took."""

    mode: str
    samples: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    not_recorded: int = 0  # samples checked whose digests the store does not hold


def parse_verify_data(value: str) -> str:
    """`--verify-data`: "all", "none" or a positive number of samples (returned as given, lower-case)."""
    text = str(value).strip().lower()
    if text in ("all", "none") or (text.isdigit() and int(text) > 0):
        return text
    raise ValueError(f"--verify-data {value!r}: expected all, none or a positive number of samples")


def verify_input_files(location: Any, manifest: dict[str, Any], sample_tokens: list[str], dataset: Any,
                       mode: str = str(DEFAULT_VERIFY_SAMPLES), rank: int = 0, world_size: int = 1,
                       progress: bool = True) -> DataVerification:
    """Re-hash the input files of some samples of `dataset` and compare them with the store's `input_digest`.

    mode: "none" (nothing read), "all" (every sample; under torchrun rank r takes samples r, r + W, ...) or a number
    N (N samples drawn at random by each rank). The files are those the extractor read for each sample (the
    manifest's num_sweeps and point features), found in `dataset`'s split index or, when the index holds fewer
    sweep candidates, in its devkit tables. A file whose bytes differ from the recorded ones, or that cannot be
    read, is a DataError naming the sample and the file; a store without digests, or samples without them, are
    logged. Returns what was checked.
    """
    from tqdm import tqdm

    mode = parse_verify_data(mode)
    report = DataVerification(mode)
    if mode == "none":
        logger.info("--verify-data none: the dataset's files are not compared with the bytes the cache was "
                    "extracted from (only the fingerprint of names, timestamps, poses and sizes is)")
        return report
    group = location.open_group(mode="r")
    if v2.INPUT_DIGEST not in group:
        logger.warning("%s: no %s array, the dataset's files cannot be compared with the bytes the cache was "
                       "extracted from: %s", location, v2.INPUT_DIGEST, NOT_RECORDED_HINT)
        return report
    array = group[v2.INPUT_DIGEST]
    count = len(sample_tokens)
    if mode == "all":
        chosen = list(range(rank, count, world_size))
    else:
        chosen = sorted(int(s) for s in np.random.default_rng().choice(count, min(int(mode), count), replace=False))
    num_sweeps, virtual, candidates = teacher_input_settings(manifest)
    started = time.perf_counter()
    files_of = _input_files(dataset, [sample_tokens[s] for s in chosen], num_sweeps, virtual, candidates)
    hashed: dict[str, tuple[bytes, int] | str] = {}  # path -> (digest, size), or why it cannot be read
    problems: list[str] = []
    for s, files in tqdm(list(zip(chosen, files_of)), desc="verify-data", unit="sample", disable=not progress):
        try:
            stored = read_sample_digest(array, s)
        except ChunkError as exc:
            logger.warning("%s: %s of sample %s is unreadable (%s); its files are not checked", location,
                           v2.INPUT_DIGEST, sample_tokens[s], exc)
            stored = None
        report.samples += 1
        if stored is None:
            report.not_recorded += 1
            continue
        for row, path in enumerate(files):
            if path not in hashed:
                try:
                    hashed[path] = file_digest(path)
                    report.bytes += hashed[path][1]
                except OSError as exc:
                    hashed[path] = f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
                report.files += 1
            found = hashed[path]
            if isinstance(found, str):
                problems.append(f"sample {sample_tokens[s]}: {path} {found}")
            elif row >= stored.shape[0] or found[0] != stored[row].tobytes():
                recorded = _short(stored[row]) if row < stored.shape[0] else "none"
                problems.append(f"sample {sample_tokens[s]}: {path} (sha256 {digest_hex(found[0])[:16]}, the cache "
                                f"was extracted from {recorded})")
        extra = stored[len(files):]
        if extra.any():
            problems.append(f"sample {sample_tokens[s]}: the cache was extracted from {int(extra.any(axis=1).sum())} "
                            f"more input file(s) than the dataset lists now")
    report.seconds = time.perf_counter() - started
    if problems:
        raise DataError(f"{len(problems)} input file(s) of the dataset differ from the bytes the cache {location} was "
                        f"extracted from: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}; its "
                        f"targets are stale for these files: restore them, or re-extract the cache from the current "
                        f"files (extract-teacher --overwrite, or a new --cache)")
    rate = report.bytes / max(report.seconds, 1e-9) / 1e6
    logger.info("--verify-data %s: re-hashed the %d input files (%.1f MB) of %d of %d samples in %.2f s (%.0f MB/s): "
                "every one holds the bytes the cache was extracted from%s", mode, report.files, report.bytes / 1e6,
                report.samples, count, report.seconds, rate,
                f"; {report.not_recorded} of those samples have no recorded digest" if report.not_recorded else "")
    return report


def _input_files(dataset: Any, tokens: list[str], num_sweeps: int, virtual: bool, candidates: int) -> list[list[str]]:
    """Per token, the files the extractor read for it: from the dataset's split index, or from its devkit tables
    when the index walked fewer sweeps than the teacher read."""
    index = dataset.index
    try:
        positions = [dataset.index_of(token) for token in tokens]
    except KeyError as exc:
        raise DataError(f"{exc.args[0]}; the cache was extracted from another split") from None
    if index.sweeps.files.shape[1] >= num_sweeps:
        return [extraction_input_files(index, i, num_sweeps, virtual) for i in positions]
    records = lidar_inputs(dataset.devkit(), tokens, num_sweeps, max(candidates, num_sweeps))
    return [with_virtual_files([f"{index.dataroot}/{record['filename']}" for record in sample], virtual)
            for sample in records]
