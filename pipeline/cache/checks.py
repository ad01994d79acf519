"""Checks a writer runs on its own store: which sample-views are really done, and which static arrays are whole.

"Done" means verified: a sample-view counts as done only when its marker is set AND every one of its chunks is
present and (for the full check) carries a matching CRC32C and is the chunk its marker records. Two depths:

- quick (`full=False`): every chunk exists and is longer than its checksum (a size query; no data read). Run when
  the same command meets a complete store.
- full (`full=True`): every chunk's bytes are read and their CRC32C compared (no decompression), then the done
  marker is read and checked against the store, the sample-view and those CRCs (`marker.py`), so a valid chunk at
  the wrong key is damage too. Run on resume (for the sample-views marked done) and by `extract-teacher --repair`
  (for all).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ...cache_schemas import v2
from ..errors import CacheError
from .chunks import (CRC_BYTES, ChunkError, chunk_coords, chunk_size, crc_problem, decode_chunk, get_chunk_bytes,
                     local_root, single_chunk_bytes)
from .manifest import layer_specs
from .marker import MarkerFormat, is_set, stored_crc

logger = logging.getLogger(__name__)

Damage = dict[tuple[int, int], list[tuple[str, str]]]  # (sample, view) -> [(array, problem)]
LOCAL_READERS, REMOTE_READERS = 4, 32  # threads checking chunks


def sample_view_array_names(manifest: dict[str, Any]) -> list[str]:
    """The per-sample-view arrays that hold targets (everything but the done markers)."""
    names = [v2.HEATMAP, v2.OCCUPANCY]
    for layer in layer_specs(manifest):
        names += [v2.feature_array(layer.name), v2.attention_array(layer.name)]
        if manifest["storage"]["dtype"] == "int8":
            names += [v2.feature_scale_array(layer.name), v2.feature_offset_array(layer.name)]
    return names


def marker_format(manifest: dict[str, Any]) -> MarkerFormat:
    """How the done markers of the store with (stored) `manifest` bind its per-sample-view arrays."""
    return MarkerFormat.of(manifest, sample_view_array_names(manifest))


def marker_problems(markers: MarkerFormat, done: Any, sample: int, view: int,
                    crcs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(array, problem) for the done marker of (sample, view) of a bound store, read now: not set, unreadable, not
    written for this sample-view of this store, or recording other CRCs than `crcs` (the chunks' CRC32C, as
    stored, of those whose bytes passed their check)."""
    try:
        marker = decode_chunk(done, get_chunk_bytes(done, chunk_coords(done, sample, view)))[0, 0]
    except ChunkError as exc:
        return [(v2.DONE, f"done marker: {exc}")]
    if not is_set(marker):
        return [(v2.DONE, "done marker not set")]
    problem = markers.problem(sample, view, marker)
    if problem is not None:
        return [(v2.DONE, problem)]
    return list(markers.chunk_problems(marker, crcs).items())


def _chunk_problem(array: Any, sample: int, view: int, full: bool) -> tuple[str | None, bytes | None]:
    """(why one chunk is damaged or None, its CRC32C as stored when a full check found it whole)."""
    coords = chunk_coords(array, sample, view)
    if full:
        raw = get_chunk_bytes(array, coords)
        problem = crc_problem(raw)
        return problem, stored_crc(raw) if problem is None else None
    size = chunk_size(array, coords)
    if size is None:
        return "chunk missing (zarr would read it as fill values)", None
    if size <= CRC_BYTES:
        return f"chunk truncated to {size} bytes", None
    return None, None


def damaged_sample_views(group: Any, manifest: dict[str, Any], sample_views: list[tuple[int, int]],
                         full: bool, workers: int | None = None, progress: bool = False) -> Damage:
    """The sample-views among `sample_views` with a missing, truncated or (full) checksum-failing chunk, or (full,
    schema 3) whose done marker is not set, not theirs or records other chunks."""
    from tqdm import tqdm

    arrays = {name: group[name] for name in sample_view_array_names(manifest)}
    markers = marker_format(dict(group.attrs)) if full else None  # the stored manifest: its store id
    done = group[v2.DONE] if markers is not None and markers.bound else None

    def check(sample_view: tuple[int, int]) -> tuple[tuple[int, int], list[tuple[str, str]]]:
        s, v = sample_view
        found = []
        crcs: dict[str, bytes] = {}
        for name, array in arrays.items():
            problem, crc = _chunk_problem(array, s, v, full)
            if problem is not None:
                found.append((name, problem))
            elif crc is not None:
                crcs[name] = crc
        if done is not None:
            found += marker_problems(markers, done, s, v, crcs)
        return sample_view, found

    damage: Damage = {}
    if workers is None:  # a few readers keep a disk busy; an object store needs many requests in flight
        workers = LOCAL_READERS if all(local_root(a) is not None for a in arrays.values()) else REMOTE_READERS
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cache-check") as pool:
        results = pool.map(check, sample_views)
        for sample_view, found in tqdm(results, total=len(sample_views), unit="view", disable=not progress,
                                       desc="check chunks (CRC32C)" if full else "check chunks"):
            if found:
                damage[sample_view] = found
    return damage


READ_ATTEMPTS = 3  # reads of a static array before a storage error is reported
RETRY_SECONDS = 0.5  # wait before the second read, doubled before each further one


def static_array_problems(group: Any, manifest: dict[str, Any], sample_tokens: list[str], views: np.ndarray,
                          head_state: dict[str, np.ndarray], where: str = "") -> list[str]:
    """Names of the static arrays (views, sample_tokens, teacher_head/*) that are damaged: the array or its chunk
    absent, the chunk truncated or failing its CRC32C, or values (or a shape) other than expected.

    Nothing else counts as damage, since a repair of a complete store starts a new generation and so stops every
    job reading it: any other error (an OSError, an object store's error, metadata that cannot be read) is retried
    `READ_ATTEMPTS` times and then raised as a CacheError naming `where` (the store) and the array.
    """
    expected: dict[str, np.ndarray] = {v2.VIEWS: views, v2.SAMPLE_TOKENS: np.array(sample_tokens, dtype=object)}
    expected.update({v2.teacher_head_array(name): np.asarray(value) for name, value in head_state.items()})
    bad = []
    for name, value in expected.items():
        stored = _read_static_array(group, name, where or str(group.store))
        if stored is None or stored.shape != value.shape or not np.array_equal(stored, value):
            bad.append(name)
    return bad


def _read_static_array(group: Any, name: str, where: str) -> np.ndarray | None:
    """The values of one static array, None when it is absent or its chunk is missing, truncated or corrupt."""
    attempt = 1
    while True:
        try:
            try:
                array = group[name]
            except KeyError:
                return None
            if crc_problem(single_chunk_bytes(array)) is not None:
                return None
            return np.asarray(array[...])
        except Exception as exc:  # noqa: BLE001 - not damage: a storage error, retried, then reported
            text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if attempt >= READ_ATTEMPTS:
                raise CacheError(
                    f"{where}: cannot read the static array {name} ({text}) after {READ_ATTEMPTS} attempts; nothing "
                    f"was changed (a read error is not damage, so no repair was started); check the storage (disk, "
                    f"network, credentials) and rerun the same command") from exc
            logger.warning("%s: reading the static array %s failed (%s); retrying", where, name, text)
        time.sleep(RETRY_SECONDS * 2 ** (attempt - 1))
        attempt += 1
