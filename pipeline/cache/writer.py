"""Creating, reopening, writing and completing a teacher-feature store (the caller holds its `StoreLock`).

`prepare_store` creates a store (marker first, manifest last) or reopens one to resume; `SampleViewWriter`
writes one sample-view's chunks, fsyncs them and only then sets its done marker, a digest that binds those chunks
to this store and sample-view (`marker.py`); `finalize_store` checks the
whole store, fsyncs the markers and sets status "complete". A chunk file is written as zarr's LocalStore writes
one, to a temporary `.partial` file renamed into place, so a killed writer leaves the old chunk, the new chunk or a
stray `.partial` file (removed on resume), never a torn chunk; and since a done marker is trusted only after its
chunks pass their checks (`checks.py`), not even a lost or truncated file can make a sample-view count as done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from ...cache_schemas import v2
from ..data.digest import InputDigests
from ..errors import CacheError
from .checks import damaged_sample_views, marker_format, sample_view_array_names, static_array_problems
from .chunks import chunk_coords, chunk_key, encode_chunk, put_chunks, write_chunks, write_local_chunk
from .location import StoreLocation
from .manifest import ViewConfig, layer_specs, manifest_diff, new_generation, store_identity, views_array
from .input_digest import InputDigestRecorder, create_input_digest_array
from .marker import stored_crc
from .quantize import quantize_per_channel
from .state import read_done, refuse_damaged_arrays, refuse_damaged_root, root_metadata
from .store import classify_store, clear_store, fsync_keys, fsync_store, refuse_unusable, storage_error, write_marker

logger = logging.getLogger(__name__)

StoreState = Literal["created", "resumed", "complete"]
StillHeld = Callable[[], bool]  # the writer lock's check: `still_held` of a StoreLock or LeaseLock, a lease's `confirm`


def refuse_unless_held(path: StoreLocation, still_held: StillHeld | None, what: str) -> None:
    """Raise a CacheError, before `what` is written, when `still_held` (if given) says the lock is no longer held."""
    if still_held is not None and not still_held():
        raise CacheError(f"{path}: this process lost its lock or lease on the store ({v2.LOCK_FILE}; the reason is "
                         f"logged above), so {what} was not written: another extraction may be writing this store "
                         f"now; the store stays 'writing': once no other extraction writes it, rerun the same command "
                         f"to resume")


@dataclass
class SampleViewRecord:
    """The teacher outputs of one sample-view, ready to store (float32 on the host).

    features: layer -> (C, Y, X); heatmap: (10, Yh, Xh) probabilities; attention: layer -> (Y, X);
    occupancy: (Y, X) bool. inputs: the files its points were read from with their SHA-256 (None: not hashed).
    """

    sample_index: int
    view: int
    sample_token: str
    features: dict[str, np.ndarray]
    heatmap: np.ndarray
    attention: dict[str, np.ndarray]
    occupancy: np.ndarray
    inputs: InputDigests | None = None

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.features.values()) + self.heatmap.nbytes
                + sum(a.nbytes for a in self.attention.values()) + self.occupancy.nbytes)


def _codecs() -> dict[str, Any]:
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
    # the checksum is a bytes-to-bytes codec: it guards the compressed chunk as stored on disk
    return {"serializer": BytesCodec(), "compressors": [ZstdCodec(level=v2.ZSTD_LEVEL), Crc32cCodec()],
            "config": {"write_empty_chunks": True}}


def _create_layout(group: Any, manifest: dict[str, Any], sample_tokens: list[str], views: np.ndarray,
                   head_state: dict[str, np.ndarray]) -> None:
    """All arrays of the v2 layout, plus the data known before any teacher compute (tokens, views, head)."""
    samples, num_views = int(manifest["sample_count"]), int(manifest["views"]["count"])
    dtype = v2.FEATURE_DTYPES[manifest["storage"]["dtype"]]
    codecs = _codecs()
    for layer in layer_specs(manifest):
        y, x = layer.shape
        group.create_array(v2.feature_array(layer.name), shape=(samples, num_views, layer.channels, y, x),
                           chunks=(1, 1, layer.channels, y, x), dtype=dtype, fill_value=0,
                           dimension_names=v2.DIMS_MAP, **codecs)
        if dtype == "int8":
            for name in (v2.feature_scale_array(layer.name), v2.feature_offset_array(layer.name)):
                group.create_array(name, shape=(samples, num_views, layer.channels),
                                   chunks=(1, 1, layer.channels), dtype=v2.SCALE_DTYPE, fill_value=0,
                                   dimension_names=v2.DIMS_CHANNEL, **codecs)
        group.create_array(v2.attention_array(layer.name), shape=(samples, num_views, y, x), chunks=(1, 1, y, x),
                           dtype=v2.ATTENTION_DTYPE, fill_value=0, dimension_names=v2.DIMS_PLANE, **codecs)
    hy, hx = manifest["heatmap"]["shape"]
    group.create_array(v2.HEATMAP, shape=(samples, num_views, v2.HEATMAP_CHANNELS, hy, hx),
                       chunks=(1, 1, v2.HEATMAP_CHANNELS, hy, hx), dtype=v2.HEATMAP_DTYPE, fill_value=0,
                       dimension_names=v2.DIMS_MAP, **codecs)
    oy, ox = manifest["occupancy"]["shape"]
    group.create_array(v2.OCCUPANCY, shape=(samples, num_views, oy, ox), chunks=(1, 1, oy, ox), dtype="bool",
                       fill_value=False, dimension_names=v2.DIMS_PLANE, **codecs)
    create_input_digest_array(group, manifest, **codecs)
    tail = marker_format(manifest).shape_tail  # (D,): one marker of D bytes per sample-view
    done = group.create_array(v2.DONE, shape=(samples, num_views, *tail), chunks=(1, 1, *tail),
                              dtype=v2.DONE_DTYPE, fill_value=0, dimension_names=v2.DIMS_DONE, **codecs)
    # every marker chunk exists from the start (a missing one is damage, not "not done"); batched writes
    write_done(done, [(s, v) for s in range(samples) for v in range(num_views)], 0)
    write_static_arrays(group, manifest, sample_tokens, views, head_state, create=True)


def write_static_arrays(group: Any, manifest: dict[str, Any], sample_tokens: list[str], views: np.ndarray,
                        head_state: dict[str, np.ndarray], create: bool,
                        only: set[str] | None = None) -> list[str]:
    """Write the arrays known before any teacher compute: views, sample_tokens, teacher_head/*.

    create: create them first (a new layout); otherwise rewrite the existing ones named in `only` (a repair).
    Returns the names written.
    """
    import warnings

    from zarr.codecs import Crc32cCodec

    codecs = _codecs()
    values: dict[str, tuple[np.ndarray, dict[str, Any]]] = {
        v2.VIEWS: (views, {"dtype": v2.VIEWS_DTYPE, "fill_value": 0, "dimension_names": v2.DIMS_VIEWS, **codecs}),
        v2.SAMPLE_TOKENS: (np.array(sample_tokens, dtype=object),
                           {"dtype": str, "dimension_names": v2.DIMS_TOKENS, "compressors": [Crc32cCodec()],
                            "config": {"write_empty_chunks": True}}),
    }
    for name, value in head_state.items():
        value = np.asarray(value)
        values[v2.teacher_head_array(name)] = (value, {"dtype": value.dtype, "fill_value": 0, **codecs})
    written = []
    with warnings.catch_warnings():
        # variable-length strings are not in the zarr v3 core spec yet; zarr-python reads them back fine
        warnings.simplefilter("ignore", category=UserWarning)
        for name, (value, options) in values.items():
            if only is not None and name not in only:
                continue
            if create or name not in group:
                chunks = (max(value.shape[0], 1),) if name == v2.SAMPLE_TOKENS else value.shape
                array = group.create_array(name, shape=value.shape, chunks=chunks, overwrite=True, **options)
            else:
                array = open_for_writing(group, name)
            array[...] = value
            written.append(name)
    return written


def open_for_writing(group: Any, name: str) -> Any:
    """An existing array of `group` that writes every chunk, fill-valued ones included."""
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        return group[name]


def _check_tokens(path: StoreLocation, stored: list[str] | None, requested: list[str]) -> None:
    if stored is not None and stored != list(requested):
        first = next(i for i, (a, b) in enumerate(zip(stored + [None], requested + [None])) if a != b)
        raise CacheError(f"{path}: the store's sample_tokens differ from the dataset's split (first difference "
                         f"at index {first}: stored {_at(stored, first)!r}, dataset {_at(requested, first)!r}); "
                         f"this store holds another dataset: extract into a new --cache path or pass --overwrite")


def _at(values: list[str], index: int) -> str | None:
    return values[index] if index < len(values) else None


def prepare_store(path: str | Path | StoreLocation, manifest: dict[str, Any], sample_tokens: list[str],
                  head_state: dict[str, np.ndarray], overwrite: bool = False) -> StoreState:
    """Create the store at `path`, or reopen an identical one; the caller holds the store's `StoreLock`.

    Nothing is written before the request is known to fit: a store with a different manifest (teacher, grid,
    layers, views, storage, dataset fingerprint, ...) is refused with a readable diff unless `overwrite`, and
    then it is cleared only if it is this tool's. A folder that holds this tool's marker but no manifest is a
    store whose creation was interrupted, and its layout is rebuilt, only when nothing would be lost: a root
    `zarr.json` that is missing, empty or unreadable beside any array or chunk, a manifest-less root beside
    extracted chunks, or a damaged `zarr.json` of any array is refused with nothing changed, naming the repair
    (restore the file, or `overwrite`). The static arrays (views, sample_tokens, teacher_head) of a reopened store
    are checked and rewritten if damaged. Returns "created", "resumed" (status writing) or "complete".
    """
    path = StoreLocation.parse(path)
    if len(sample_tokens) != manifest["sample_count"]:
        raise ValueError(f"{len(sample_tokens)} sample tokens for a manifest of {manifest['sample_count']} samples")
    kind = classify_store(path)
    refuse_unusable(path, kind)
    if kind in ("ours", "legacy"):
        attributes, problem = root_metadata(path)
        stored = attributes if attributes is not None and "schema_version" in attributes else None
        if stored is None and kind == "ours":
            kept = refuse_damaged_root(path, problem, overwrite)
            if kept:
                logger.warning("overwriting %s: its zarr.json %s, beside %s, ...", path,
                               problem or "holds no manifest", ", ".join(kept))
            else:
                logger.info("%s: the layout of an interrupted store creation is rebuilt", path)
        elif stored is not None:
            diff = manifest_diff(stored, manifest)
            if diff and not overwrite:
                hint = ("; the dataroot's tables or LiDAR files differ from those the store was extracted from"
                        if any(line.startswith("dataset.fingerprint") for line in diff) else "")
                if not v2.binds_chunks(stored):
                    hint += (f"; the store is of schema {v2.BARE_MARKER_SCHEMA_VERSION}, whose done markers do not "
                             f"bind its chunks to their place: it stays readable as it is (train-student, "
                             f"inspect-cache), but only a schema-{v2.SCHEMA_VERSION} store is resumed or repaired")
                raise CacheError(f"{path}: an incompatible teacher cache exists (stored -> requested: "
                                 f"{'; '.join(diff)}){hint}; nothing was changed; pass --overwrite to replace it "
                                 f"or choose another --cache path")
            damaged = "" if diff else refuse_damaged_arrays(path, manifest, head_state, overwrite)
            if diff:
                logger.warning("overwriting %s (stored -> requested: %s)", path, "; ".join(diff))
            elif damaged:
                logger.warning("overwriting %s (%s)", path, damaged)
            else:
                group = path.open_group(mode="r+")
                _check_tokens(path, _stored_tokens(group), sample_tokens)
                repaired = repair_static_arrays(path, group, manifest, sample_tokens, head_state)
                if repaired:
                    logger.warning("%s: rewrote damaged %s", path, ", ".join(repaired))
                if stored["status"] == v2.STATUS_COMPLETE:
                    return "complete"
                removed = remove_partial_files(path)
                if removed:
                    logger.info("removed %d unfinished chunk files left by an interrupted run", removed)
                set_status(path, v2.STATUS_WRITING, manifest_generation=True)
                return "resumed"
    views = views_array(ViewConfig.from_json(manifest["views"]), int(manifest["sample_count"]))
    manifest = {**manifest, v2.STORE_ID_KEY: store_identity(manifest)}  # what the done markers are bound to
    try:
        if path.is_local:
            path.path.mkdir(parents=True, exist_ok=True)
        if kind in ("ours", "legacy"):
            clear_store(path)
        write_marker(path)
        group = path.open_group(mode="a")
        _create_layout(group, manifest, sample_tokens, views, head_state)
        fsync_store(path)
        # the manifest goes in last: a marked store without one is rebuilt by the same command
        group.attrs.put(manifest)
        fsync_keys(path, ["zarr.json"], folders=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    return "created"


def _stored_tokens(group: Any) -> list[str] | None:
    """The store's sample tokens, or None when that array is damaged (it is then rewritten)."""
    try:
        return [str(t) for t in group[v2.SAMPLE_TOKENS][...]]
    except Exception:
        return None


def repair_static_arrays(path: StoreLocation, group: Any, manifest: dict[str, Any], sample_tokens: list[str],
                         head_state: dict[str, np.ndarray]) -> list[str]:
    """Rewrite views / sample_tokens / teacher_head arrays whose chunks are missing, corrupt or not as expected.

    Only damage starts a repair (and a new generation); an error reading them is a CacheError that changes nothing.
    """
    views = views_array(ViewConfig.from_json(manifest["views"]), int(manifest["sample_count"]))
    bad = static_array_problems(group, manifest, sample_tokens, views, head_state, where=str(path))
    if not bad:
        return []
    status = dict(group.attrs)["status"]
    set_status(path, v2.STATUS_WRITING, manifest_generation=True)  # readers of the damaged store stop
    try:
        written = write_static_arrays(group, manifest, sample_tokens, views, head_state, create=False, only=set(bad))
        fsync_store(path, names=written)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    set_status(path, status)  # the per-sample-view data did not change: a complete store is complete again
    return written


def set_status(path: StoreLocation | Path, status: str, manifest_generation: bool = False,
               still_held: StillHeld | None = None) -> None:
    """Set the manifest's status (and, with manifest_generation, a fresh generation id), durably.

    still_held: the writer lock's check, asked right before the write (for a lease, `lease.status_check`): a
    CacheError and nothing written when the lock is no longer held."""
    path = StoreLocation.parse(path)
    group = path.open_group(mode="r+")
    update: dict[str, Any] = {"status": status}
    if manifest_generation:
        update["generation"] = new_generation()
    refuse_unless_held(path, still_held, f"status {status!r}")
    try:
        group.attrs.update(update)
        fsync_keys(path, ["zarr.json"], folders=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc


def remove_partial_files(path: StoreLocation) -> int:
    """Delete the temporary files of chunk writes that a killed process left behind (an object store has none:
    a PUT is atomic)."""
    if not path.is_local:
        return 0
    count = 0
    for stray in path.path.rglob("*.partial"):
        stray.unlink(missing_ok=True)
        count += 1
    return count


def write_done(done: Any, sample_views: list[tuple[int, int]], value: int) -> list[str]:
    """Clear the done markers of `sample_views` (value 0: not done; batched; not fsync'ed); returns their keys.

    A set marker binds the chunks' CRC32C, so only `SampleViewWriter` writes one.
    """
    if value != 0:
        raise ValueError(f"done marker value {value}: only 0 (not done) is written here; a set marker is a digest "
                         f"of the chunks written, which SampleViewWriter writes with them")
    raw = encode_chunk(done, np.zeros(done.chunks, dtype=done.dtype))
    return write_chunks(done, {chunk_coords(done, s, v): raw for s, v in sample_views})


def set_done(path: str | Path | StoreLocation, sample_views: list[tuple[int, int]], value: int,
             still_held: StillHeld | None = None) -> None:
    """Clear (value 0) the done markers of `sample_views` durably (fsync'ed on a local disk); `still_held`, the
    writer lock's check, is asked right before (a CacheError and nothing written when the lock is no longer held)."""
    path = StoreLocation.parse(path)
    done = path.open_group(mode="r+")[v2.DONE]
    refuse_unless_held(path, still_held, f"a batch of {len(sample_views)} done markers")
    try:
        fsync_keys(path, write_done(done, sample_views, value))
    except OSError as exc:
        raise storage_error(path, exc) from exc


@dataclass
class ShareCheck:
    """What stops the sample-views of some samples from being complete (`verify_samples`)."""

    sample_views: int
    not_done: int = 0  # markers not set
    missing: list[tuple[int, int, str]] = field(default_factory=list)  # (sample, view, array) of absent chunks

    def merged(self, other: "ShareCheck") -> "ShareCheck":
        return ShareCheck(self.sample_views + other.sample_views, self.not_done + other.not_done,
                          sorted(self.missing + other.missing))


def verify_samples(path: str | Path | StoreLocation, manifest: dict[str, Any], samples: Sequence[int]) -> ShareCheck:
    """Whether every sample-view of `samples` is marked done and has all its chunks (a quick check: sizes only).

    When they are, their markers are fsync'ed, so a status "complete" written afterwards vouches for durable
    markers. Ranks check their own shares of a store with it; `finalize_store` checks them all.
    """
    path = StoreLocation.parse(path)
    group = path.open_group(mode="r")
    done = read_done(path, samples)
    views = range(done.shape[1])
    absent = damaged_sample_views(group, manifest, [(s, v) for s in samples for v in views], full=False)
    check = ShareCheck(done.size, int((~done).sum()),
                       [(s, v, name) for (s, v), found in sorted(absent.items()) for name, _ in found])
    if not check.not_done and not check.missing:
        marker = group[v2.DONE]
        try:
            fsync_keys(path, [chunk_key(marker, chunk_coords(marker, s, v)) for s in samples for v in views],
                       folders=True)
        except OSError as exc:
            raise storage_error(path, exc) from exc
    return check


class SampleViewWriter:
    """Writes whole sample-views into a prepared store (one instance per process).

    Every chunk is written (fill-valued ones too) and fsync'ed before the sample-view's done marker, the digest of
    the store's id, the sample-view and every chunk's CRC32C (`marker.py`); with
    `still_wanted`, a callable checked before each sample-view, a writer whose parent has gone writes nothing more.
    `still_held`, the writer lock's check (cheap: an inode or a clock compared), is asked before each sample-view,
    again right before its chunks are written and again right before its done marker: a writer that lost its lock
    or lease, or was paused past the lease's deadline, writes nothing more.
    """

    def __init__(self, path: str | Path | StoreLocation, still_wanted=None,
                 still_held: StillHeld | None = None) -> None:
        self.path = StoreLocation.parse(path)
        self.group = self.path.open_group(mode="r+")
        self.manifest = dict(self.group.attrs)
        self.dtype = self.manifest["storage"]["dtype"]
        self.int8_error = v2.int8_error(self.manifest["storage"])
        self.layers = [layer.name for layer in layer_specs(self.manifest)]
        self.arrays = {name: open_for_writing(self.group, name)
                       for name in sample_view_array_names(self.manifest) + [v2.DONE]}
        self.still_wanted = still_wanted
        self.still_held = still_held
        self.inputs = InputDigestRecorder(self.group, self.path)
        self.markers = marker_format(self.manifest)
        if not self.markers.bound:
            raise CacheError(f"{self.path}: a schema-{v2.BARE_MARKER_SCHEMA_VERSION} store (done markers not bound "
                             f"to their chunks) is not written by this version; re-extract it with --overwrite")

    def write(self, record: SampleViewRecord) -> None:
        """Write every chunk of `record`, fsync them, then write its done marker."""
        if self.still_wanted is not None and not self.still_wanted():
            raise CacheError(f"{self.path}: the extraction that started this writer is gone or lost its lock; "
                             f"stopping before "
                             f"sample-view ({record.sample_index}, {record.view})")
        s, v = record.sample_index, record.view
        refuse_unless_held(self.path, self.still_held, f"sample-view ({s}, {v})")
        inputs = self.inputs.chunks_for(record)  # refuses a sample-view read from other bytes, before any write
        chunks: dict[str, np.ndarray] = {}  # array name -> this sample-view's values, without the (S, V) axes
        for layer in self.layers:
            features = record.features[layer]
            if self.dtype == "int8":
                q, scale, offset = quantize_per_channel(features, self.int8_error)
                chunks[v2.feature_array(layer)] = q
                chunks[v2.feature_scale_array(layer)] = scale
                chunks[v2.feature_offset_array(layer)] = offset
            else:
                chunks[v2.feature_array(layer)] = features.astype(np.float16)
            chunks[v2.attention_array(layer)] = record.attention[layer].astype(np.float32)
        chunks[v2.HEATMAP] = record.heatmap.astype(np.float16)
        chunks[v2.OCCUPANCY] = record.occupancy.astype(bool)
        # encoded here, in this (writer) thread, with the arrays' own codec chains: the same bytes zarr writes,
        # without a round trip through zarr's event loop per array
        raws = {name: encode_chunk(self.arrays[name], values[None, None]) for name, values in chunks.items()}
        encoded = {chunk_key(self.arrays[name], chunk_coords(self.arrays[name], s, v)): raw
                   for name, raw in raws.items()}
        encoded.update(inputs)
        done = self.arrays[v2.DONE]
        bound = self.markers.encode(s, v, {name: stored_crc(raw) for name, raw in raws.items()})
        marker = {chunk_key(done, chunk_coords(done, s, v)): encode_chunk(done, bound[None, None])}
        # the lock is asked again right before each write: encoding took time, and so did the chunks' writes
        try:
            if self.path.is_local:  # each file written, fsync'ed and renamed into place; then the marker
                refuse_unless_held(self.path, self.still_held, f"sample-view ({s}, {v})")
                for key, raw in encoded.items():
                    write_local_chunk(self.path.path / key, raw, fsync=True)
                refuse_unless_held(self.path, self.still_held, f"the done marker of sample-view ({s}, {v})")
                for key, raw in marker.items():  # made durable with the others by finalize_store
                    write_local_chunk(self.path.path / key, raw, fsync=False)
            else:  # an object store: one concurrent put of the chunks (a PUT is durable), then the marker's
                refuse_unless_held(self.path, self.still_held, f"sample-view ({s}, {v})")
                put_chunks(done.store, encoded)
                refuse_unless_held(self.path, self.still_held, f"the done marker of sample-view ({s}, {v})")
                put_chunks(done.store, marker)
        except OSError as exc:
            raise storage_error(self.path, exc) from exc


def finalize_store(path: str | Path | StoreLocation, sample_tokens: list[str],
                   check: ShareCheck | None = None, still_held: StillHeld | None = None) -> None:
    """Check the store end to end and set status "complete" (durably); raises CacheError (status stays "writing").

    Every done marker must be set and every chunk of every sample-view present: `verify_samples` over the whole
    store (it also fsyncs the markers), or `check`, the merged results of every rank's `verify_samples` on its
    share; the static arrays must hold the split's tokens and the manifest's views. `still_held`, the writer lock's
    check (for a lease, `lease.status_check`: a conditional renewal), is asked right before the status is written.
    """
    path = StoreLocation.parse(path)
    group = path.open_group(mode="r+")
    manifest = dict(group.attrs)
    samples, num_views = int(manifest["sample_count"]), int(manifest["views"]["count"])
    check = check if check is not None else verify_samples(path, manifest, range(samples))
    if check.sample_views != samples * num_views:
        raise ValueError(f"a check of {check.sample_views} sample-views for a store of {samples * num_views}")
    if check.not_done:
        raise CacheError(f"{path}: {check.not_done} of {check.sample_views} sample-views are not extracted; "
                         f"rerun the same extract-teacher command to finish them")
    problems = []
    if check.missing:
        s, v, name = check.missing[0]
        problems.append(f"{len({(s, v) for s, v, _ in check.missing})} sample-views have missing chunks, e.g. "
                        f"sample {s} view {v} {name}")
    stored_tokens = _stored_tokens(group)
    if stored_tokens != list(sample_tokens):
        problems.append("sample_tokens differ from the dataset's")
    expected_views = views_array(ViewConfig.from_json(manifest["views"]), samples)
    if not np.array_equal(group[v2.VIEWS][...], expected_views):
        problems.append("views differ from the manifest's seed and ranges")
    for layer in layer_specs(manifest):
        shape = group[v2.feature_array(layer.name)].shape
        if shape != (samples, num_views, layer.channels, *layer.shape):
            problems.append(f"features/{layer.name} has shape {shape}")
    if problems:
        raise CacheError(f"{path}: the finished store failed its consistency check ({'; '.join(problems)}); "
                         f"rerun the same extract-teacher command with --repair")
    if remove_partial_files(path):
        logger.info("removed stray chunk files of an interrupted write")
    refuse_unless_held(path, still_held, "status 'complete'")
    try:
        group.attrs["status"] = v2.STATUS_COMPLETE
        fsync_keys(path, ["zarr.json"], folders=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc
