"""Creating, reopening, writing and completing a v1 teacher-feature store.

`prepare_store` creates a store (or reopens one to resume); `SampleViewWriter` writes one sample-view's chunks and
only then its done marker; `finalize_store` checks the whole store and sets status "complete". Every write goes
through zarr's LocalStore, which writes a chunk to a temporary `.partial` file and renames it, so a killed writer
leaves either the old chunk, the new chunk or a stray `.partial` file (removed on resume), never a torn chunk;
the done marker, written last, says which sample-views are whole.
"""

from __future__ import annotations

import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ...cache_schemas import v1
from ..errors import CacheError
from .manifest import layer_specs, manifest_diff, views_array, ViewConfig
from .quantize import quantize_per_channel

logger = logging.getLogger(__name__)

StoreState = Literal["created", "resumed", "complete"]


@dataclass
class SampleViewRecord:
    """The teacher outputs of one sample-view, ready to store (float32 on the host).

    features: layer -> (C, Y, X); heatmap: (10, Yh, Xh) probabilities; attention: layer -> (Y, X);
    occupancy: (Y, X) bool.
    """

    sample_index: int
    view: int
    sample_token: str
    features: dict[str, np.ndarray]
    heatmap: np.ndarray
    attention: dict[str, np.ndarray]
    occupancy: np.ndarray

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.features.values()) + self.heatmap.nbytes
                + sum(a.nbytes for a in self.attention.values()) + self.occupancy.nbytes)


def storage_error(path: Path | str, exc: OSError) -> CacheError:
    """A one-line CacheError for a failed write under `path`."""
    if exc.errno == errno.ENOSPC:
        hint = "free disk space (or pass another --cache path) and rerun the same command to resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the directory writable or pass another --cache path"
    else:
        hint = "check that the path is a writable directory on a local disk, or pass another --cache path"
    return CacheError(f"{path}: cannot write the teacher cache ({exc.__class__.__name__}: "
                      f"{exc.strerror or exc}); {hint}")


def _codecs() -> dict[str, Any]:
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
    # the checksum is a bytes-to-bytes codec: it guards the compressed chunk as stored on disk
    return {"serializer": BytesCodec(), "compressors": [ZstdCodec(level=v1.ZSTD_LEVEL), Crc32cCodec()]}


def _create_layout(group: Any, manifest: dict[str, Any], sample_tokens: list[str], views: np.ndarray,
                   head_state: dict[str, np.ndarray]) -> None:
    """All arrays of the v1 layout, plus the data known before any teacher compute (tokens, views, head)."""
    samples, num_views = int(manifest["sample_count"]), int(manifest["views"]["count"])
    dtype = v1.FEATURE_DTYPES[manifest["storage"]["dtype"]]
    codecs = _codecs()
    for layer in layer_specs(manifest):
        y, x = layer.shape
        group.create_array(v1.feature_array(layer.name), shape=(samples, num_views, layer.channels, y, x),
                           chunks=(1, 1, layer.channels, y, x), dtype=dtype, fill_value=0,
                           dimension_names=v1.DIMS_MAP, **codecs)
        if dtype == "int8":
            for name in (v1.feature_scale_array(layer.name), v1.feature_offset_array(layer.name)):
                group.create_array(name, shape=(samples, num_views, layer.channels),
                                   chunks=(1, 1, layer.channels), dtype=v1.SCALE_DTYPE, fill_value=0,
                                   dimension_names=v1.DIMS_CHANNEL, **codecs)
        group.create_array(v1.attention_array(layer.name), shape=(samples, num_views, y, x), chunks=(1, 1, y, x),
                           dtype=v1.ATTENTION_DTYPE, fill_value=0, dimension_names=v1.DIMS_PLANE, **codecs)
    hy, hx = manifest["heatmap"]["shape"]
    group.create_array(v1.HEATMAP, shape=(samples, num_views, v1.HEATMAP_CHANNELS, hy, hx),
                       chunks=(1, 1, v1.HEATMAP_CHANNELS, hy, hx), dtype=v1.HEATMAP_DTYPE, fill_value=0,
                       dimension_names=v1.DIMS_MAP, **codecs)
    oy, ox = manifest["occupancy"]["shape"]
    group.create_array(v1.OCCUPANCY, shape=(samples, num_views, oy, ox), chunks=(1, 1, oy, ox), dtype="bool",
                       fill_value=False, dimension_names=v1.DIMS_PLANE, **codecs)
    group.create_array(v1.DONE, shape=(samples, num_views), chunks=(1, 1), dtype=v1.DONE_DTYPE, fill_value=0,
                       dimension_names=v1.DIMS_DONE, **codecs)
    # written once by the creating process, before any worker starts
    group.create_array(v1.VIEWS, shape=views.shape, chunks=views.shape, dtype=v1.VIEWS_DTYPE, fill_value=0,
                       dimension_names=v1.DIMS_VIEWS, **codecs)[...] = views
    tokens = group.create_array(v1.SAMPLE_TOKENS, shape=(samples,), chunks=(max(samples, 1),), dtype=str,
                                dimension_names=v1.DIMS_TOKENS)
    tokens[...] = np.array(sample_tokens, dtype=object)
    for name, value in head_state.items():
        value = np.asarray(value)
        head = group.create_array(v1.teacher_head_array(name), shape=value.shape, chunks=value.shape,
                                  dtype=value.dtype, fill_value=0, **codecs)
        head[...] = value


def prepare_store(path: str | Path, manifest: dict[str, Any], sample_tokens: list[str],
                  head_state: dict[str, np.ndarray], overwrite: bool = False) -> StoreState:
    """Create the store at `path`, or reopen an identical one.

    A store with a different manifest is refused with a readable diff unless `overwrite` (then it is deleted and
    recreated). Returns "created", "resumed" (status writing, same manifest) or "complete" (nothing to do).
    """
    import warnings

    import zarr

    path = Path(path)
    if len(sample_tokens) != manifest["sample_count"]:
        raise ValueError(f"{len(sample_tokens)} sample tokens for a manifest of {manifest['sample_count']} samples")
    if path.exists() and not (path / "zarr.json").exists():
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty folder: create the store in its place
        else:  # never delete a user's folder that is not a store, even with --overwrite
            raise CacheError(f"{path}: exists and is not a teacher cache; choose another --cache path")
    if path.exists():
        stored = read_manifest(path)
        # a zarr group without a manifest is a store whose creation was interrupted
        diff = manifest_diff(stored, manifest) if stored is not None else ["manifest: <missing> -> <new>"]
        if diff and not overwrite:
            raise CacheError(f"{path}: an incompatible teacher cache exists (stored -> requested: "
                             f"{'; '.join(diff)}); pass --overwrite to replace it or choose another --cache path")
        if diff:
            logger.warning("overwriting %s (stored -> requested: %s)", path, "; ".join(diff))
            try:
                shutil.rmtree(path)
            except OSError as exc:
                raise storage_error(path, exc) from exc
        elif stored["status"] == v1.STATUS_COMPLETE:
            return "complete"
        else:
            removed = remove_partial_files(path)
            if removed:
                logger.info("removed %d unfinished chunk files left by an interrupted run", removed)
            return "resumed"
    views = views_array(ViewConfig.from_json(manifest["views"]), int(manifest["sample_count"]))
    try:
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        with warnings.catch_warnings():
            # variable-length strings are not in the zarr v3 core spec yet; zarr-python reads them back fine
            warnings.simplefilter("ignore", category=UserWarning)
            _create_layout(group, manifest, sample_tokens, views, head_state)
        # the manifest goes in last: a store without one is treated as not-a-cache and recreated on request
        group.attrs.put(manifest)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    return "created"


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest in the group attributes at `path`, or None if `path` holds no v1-style manifest."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError):
        return None
    attributes = dict(group.attrs)
    return attributes if "schema_version" in attributes else None


def remove_partial_files(path: Path) -> int:
    """Delete the temporary files of chunk writes that a killed process left behind."""
    count = 0
    for stray in path.rglob("*.partial"):
        stray.unlink(missing_ok=True)
        count += 1
    return count


def read_done(path: str | Path) -> np.ndarray:
    """(S, V) bool done markers; a marker chunk that cannot be decoded counts as not done."""
    import zarr

    done = zarr.open_array(str(Path(path) / v1.DONE), mode="r")
    try:
        return np.asarray(done[...]).astype(bool)
    except Exception:  # a damaged marker chunk: fall back to one read per marker
        out = np.zeros(done.shape, dtype=bool)
        for index in np.ndindex(*done.shape):
            try:
                out[index] = bool(done[index])
            except Exception:
                logger.warning("done marker %s of %s is unreadable; that sample-view will be rewritten", index, path)
        return out


class SampleViewWriter:
    """Writes whole sample-views into a prepared store (one instance per process)."""

    def __init__(self, path: str | Path) -> None:
        import zarr

        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r+")
        self.manifest = dict(self.group.attrs)
        self.dtype = self.manifest["storage"]["dtype"]
        self.layers = [layer.name for layer in layer_specs(self.manifest)]
        self.arrays = {name: self.group[name] for name in self._array_names()}

    def _array_names(self) -> list[str]:
        names = [v1.HEATMAP, v1.OCCUPANCY, v1.DONE]
        for layer in self.layers:
            names += [v1.feature_array(layer), v1.attention_array(layer)]
            if self.dtype == "int8":
                names += [v1.feature_scale_array(layer), v1.feature_offset_array(layer)]
        return names

    def write(self, record: SampleViewRecord) -> None:
        """Write every chunk of `record`, then its done marker."""
        s, v = record.sample_index, record.view
        try:
            for layer in self.layers:
                features = record.features[layer]
                if self.dtype == "int8":
                    q, scale, offset = quantize_per_channel(features)
                    self.arrays[v1.feature_array(layer)][s, v] = q
                    self.arrays[v1.feature_scale_array(layer)][s, v] = scale
                    self.arrays[v1.feature_offset_array(layer)][s, v] = offset
                else:
                    self.arrays[v1.feature_array(layer)][s, v] = features.astype(np.float16)
                self.arrays[v1.attention_array(layer)][s, v] = record.attention[layer].astype(np.float32)
            self.arrays[v1.HEATMAP][s, v] = record.heatmap.astype(np.float16)
            self.arrays[v1.OCCUPANCY][s, v] = record.occupancy.astype(bool)
            self.arrays[v1.DONE][s, v] = 1
        except OSError as exc:
            raise storage_error(self.path, exc) from exc


def finalize_store(path: str | Path, sample_tokens: list[str]) -> None:
    """Check the store end to end and set status "complete"; raises CacheError (status stays "writing")."""
    import zarr

    path = Path(path)
    group = zarr.open_group(str(path), mode="r+")
    manifest = dict(group.attrs)
    done = read_done(path)
    missing = int((~done).sum())
    if missing:
        raise CacheError(f"{path}: {missing} of {done.size} sample-views are not extracted; rerun the same "
                         f"extract-teacher command to finish them")
    problems = []
    stored_tokens = [str(t) for t in group[v1.SAMPLE_TOKENS][...]]
    if stored_tokens != list(sample_tokens):
        problems.append("sample_tokens differ from the dataset's")
    expected_views = views_array(ViewConfig.from_json(manifest["views"]), int(manifest["sample_count"]))
    if not np.array_equal(group[v1.VIEWS][...], expected_views):
        problems.append("views differ from the manifest's seed and ranges")
    samples, num_views = int(manifest["sample_count"]), int(manifest["views"]["count"])
    for layer in layer_specs(manifest):
        shape = group[v1.feature_array(layer.name)].shape
        if shape != (samples, num_views, layer.channels, *layer.shape):
            problems.append(f"features/{layer.name} has shape {shape}")
    if problems:
        raise CacheError(f"{path}: the finished store failed its consistency check ({'; '.join(problems)}); "
                         f"rerun extract-teacher with --overwrite")
    if remove_partial_files(path):
        logger.info("removed stray chunk files of an interrupted write")
    try:
        group.attrs["status"] = v1.STATUS_COMPLETE
    except OSError as exc:
        raise storage_error(path, exc) from exc
