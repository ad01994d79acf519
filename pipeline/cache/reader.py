"""Reading teacher targets back from a teacher-feature store (schema 3, or 2).

    cache = TeacherCache.open("runs/cache.zarr")
    cache.check_compatible({"layers": {"neck": {"channels": 384, "shape": [128, 128]}}})
    targets = cache.read(cache.index_of(token), view=0)

`TeacherCache` is safe in DataLoader workers: it keeps only plain data (path, manifest, tokens) between reads and
opens the zarr arrays lazily in each process (a forked or unpickled copy reopens them), because zarr drives I/O
through an asyncio thread that does not survive a fork. One read fetches all arrays of a sample-view concurrently.

A read never returns fill values or unchecked bytes: every chunk is fetched, its CRC32C checked and decoded here
(`chunks.py`), and a missing or corrupt chunk is a CacheError naming the sample token, view and array and the
command that repairs the store. Nor does it return a valid chunk from the wrong place: the sample-view's done
marker is read with its chunks (one small read) and must be this store's marker for this sample-view, recording
the CRC32C of every chunk read (`marker.py`); a schema-2 store's bare markers are taken as "done, unbound", with one
warning when it is opened. After each read the store's status and generation are compared with the ones
seen at open, so a store rewritten under a running job (repair, --overwrite) fails the job instead of feeding it
a mix of two stores.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...cache_schemas import v2
from ..errors import CacheError
from ..geometry.bev import BEVAugmentation
from .checks import marker_format, sample_view_array_names
from .chunks import (ChunkError, chunk_coords, crc_problem, decode_chunk, decode_single_chunk,
                     expect_supported_codecs, get_chunk_bytes, single_chunk_bytes)
from .location import StoreLocation, redact_command, remote_error
from .manifest import LayerSpec, layer_specs, manifest_diff, tokens_sha256
from .marker import is_set, stored_crc
from .quantize import QuantizedFeatures, dequantize_per_channel
from .state import read_done

logger = logging.getLogger(__name__)


@dataclass
class TeacherTargets:
    """The cached teacher outputs of one sample-view.

    features: layer -> (C, Y, X) float32, or its stored int8 form (`QuantizedFeatures`) when read with
    dequantize=False from an int8 store; heatmap: (10, Yh, Xh) float32 probabilities;
    attention: layer -> (Y, X) float32; occupancy: (Y, X) bool; bev_aug: the augmentation the teacher saw.
    """

    sample_token: str
    view: int
    bev_aug: BEVAugmentation
    features: dict[str, torch.Tensor | QuantizedFeatures]
    heatmap: torch.Tensor
    attention: dict[str, torch.Tensor]
    occupancy: torch.Tensor


class TeacherCache:
    """Read-only access to a teacher-feature store (use `TeacherCache.open`)."""

    def __init__(self, path: StoreLocation, manifest: dict[str, Any], sample_tokens: list[str], views: np.ndarray,
                 allow_partial: bool, concurrent_reads: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.sample_tokens = sample_tokens
        self.views = views  # (S, V, 4) float64
        self.allow_partial = allow_partial
        self.concurrent_reads = concurrent_reads
        self._index = {token: i for i, token in enumerate(sample_tokens)}
        self._markers = marker_format(manifest)  # how the done markers bind the chunks (or not: schema 2)
        self._arrays: dict[str, Any] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    @classmethod
    def open(cls, path: str | Path | StoreLocation, allow_partial: bool = False, concurrent_reads: bool = True,
             check_static: bool = True) -> "TeacherCache":
        """Open and validate a store; CacheError if it is missing, of another schema or (unless allowed) partial.

        check_static: CacheError when sample_tokens or views are damaged; without it (verification, which reports
        them itself) damaged ones read as placeholder tokens "#i" and identity views.
        """
        path = StoreLocation.parse(path)
        hint = "run `distillbev extract-teacher` to create it"
        if path.is_local and not path.path.exists():
            raise CacheError(f"{path}: no teacher cache at this path; {hint}")
        if not path.is_local:
            try:
                found = path.get("zarr.json")
            except Exception as exc:
                raise remote_error(path, exc, "read") from exc
            if found is None:
                raise CacheError(f"{path}: no teacher cache at this URL (no zarr.json under it); {hint}")
        try:
            group = path.open_group(mode="r")
        except Exception as exc:
            raise CacheError(f"{path}: not a zarr v3 group ({exc.__class__.__name__}); {hint}") from exc
        manifest = dict(group.attrs)
        version = manifest.get("schema_version")
        if version not in v2.READABLE_SCHEMA_VERSIONS:
            raise CacheError(f"{path}: cache schema version {version!r}, this code reads versions "
                             f"{' and '.join(map(str, v2.READABLE_SCHEMA_VERSIONS))}; re-extract the cache with "
                             f"this version")
        problems = v2.validate_manifest(manifest)
        if problems:
            raise CacheError(f"{path}: malformed cache manifest ({'; '.join(problems[:5])}); re-extract the cache")
        if not v2.binds_chunks(manifest):
            logger.warning("%s: a schema %d store: its done markers are not bound to their chunks, so a valid chunk "
                           "at the wrong key (a hand merge, a copy) would read unnoticed; re-extract it with this "
                           "version (extract-teacher --overwrite) to have every read check it", path, version)
        if manifest["status"] != v2.STATUS_COMPLETE and not allow_partial:
            done = read_done(path)
            raise CacheError(f"{path}: the cache is partial (status {manifest['status']!r}, {int(done.sum())} of "
                             f"{done.size} sample-views done); rerun the same extract-teacher command to finish it")
        try:
            tokens, views = _read_static(path, group, manifest)
        except CacheError:
            if check_static:
                raise
            samples, count = int(manifest["sample_count"]), int(manifest["views"]["count"])
            tokens = [f"#{i}" for i in range(samples)]
            views = np.tile(BEVAugmentation().as_array(), (samples, count, 1))
        return cls(path, manifest, tokens, views, allow_partial, concurrent_reads)

    # -- plain metadata ------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.manifest["sample_count"])

    @property
    def num_views(self) -> int:
        return int(self.manifest["views"]["count"])

    @property
    def layers(self) -> list[LayerSpec]:
        return layer_specs(self.manifest)

    @property
    def is_complete(self) -> bool:
        return self.manifest["status"] == v2.STATUS_COMPLETE

    def __len__(self) -> int:
        return self.num_samples

    @property
    def worker_start_method(self) -> str | None:
        """The DataLoader `multiprocessing_context` for workers that read this cache (None: the default fork)."""
        return self.path.worker_start_method

    def index_of(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise CacheError(f"{self.path}: sample {token!r} is not in the cache (split "
                             f"{self.manifest['dataset']['split']!r}, {self.num_samples} samples); extract a cache "
                             f"for this split") from None

    def bev_aug(self, sample_index: int, view: int) -> BEVAugmentation:
        return BEVAugmentation.from_array(self.views[sample_index, view])

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """CacheError listing "key: stored -> expected" for every key of `expected` (nested) that differs."""
        diff = manifest_diff(self.manifest, expected, ignore=(), only_requested=True)
        if diff:
            raise CacheError(f"{self.path}: the cache does not fit this run (stored -> expected: {'; '.join(diff)}); "
                             f"extract a cache with the matching teacher/grid or change the config")

    # -- lazily opened arrays ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_arrays=None, _pool=None, _pid=None)
        return state

    def _open_arrays(self) -> dict[str, Any]:
        if self._arrays is None or self._pid != os.getpid():
            group = self.path.open_group(mode="r")
            names = [v2.DONE, *sample_view_array_names(self.manifest)]
            self._arrays = {name: group[name] for name in names}
            for name, array in self._arrays.items():
                try:
                    expect_supported_codecs(array)
                except ChunkError as exc:
                    raise CacheError(f"{self.path}: {name}: {exc}; re-extract the cache") from None
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(names)), thread_name_prefix="cache-read")
            self._pid = os.getpid()
        return self._arrays

    @property
    def repair_command(self) -> str:
        """The command that re-extracts damaged sample-views of this store."""
        return repair_command(self.manifest, self.path)

    def _read_chunk(self, name: str, sample_index: int, view: int) -> tuple[np.ndarray, bytes]:
        """One decoded chunk of a per-sample-view array, without its two leading (sample, view) axes, and its
        CRC32C as stored."""
        array = self._arrays[name]
        raw = get_chunk_bytes(array, chunk_coords(array, sample_index, view))
        try:
            values = decode_chunk(array, raw)
        except ChunkError as exc:
            raise self._damaged(sample_index, view, name, str(exc)) from None
        return values[0, 0], stored_crc(raw)

    def _describe(self, sample_index: int) -> str:
        return f"sample {self.sample_tokens[sample_index]} (index {sample_index})"

    def _damaged(self, sample_index: int, view: int, name: str, problem: str) -> CacheError:
        return CacheError(f"{self.path}: {self._describe(sample_index)} view {view}, {name}: {problem}; repair the "
                          f"store with `{self.repair_command}`")

    def _check_binding(self, sample_index: int, view: int, marker: np.ndarray, crcs: dict[str, bytes]) -> None:
        """CacheError unless `marker` is this store's marker of this sample-view and records `crcs` (of the chunks
        read)."""
        markers = self._markers
        if not is_set(marker):
            raise self._damaged(sample_index, view, v2.DONE, "the done marker is not set in a complete store")
        problem = markers.problem(sample_index, view, marker, describe=self._describe)
        if problem is not None:
            raise self._damaged(sample_index, view, v2.DONE, problem)
        wrong = markers.chunk_problems(marker, crcs)
        if wrong:
            name = next(n for n in self._arrays if n in wrong)  # the first in read order
            raise self._damaged(sample_index, view, name, wrong[name])

    def check_unchanged(self) -> None:
        """CacheError if the store was rewritten (new generation) or reopened for writing since it was opened."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store = self._arrays[v2.DONE].store if self._arrays else None
        if store is None:
            return
        raw = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
        try:
            attributes = json.loads(raw.to_bytes()).get("attributes", {}) if raw is not None else {}
        except ValueError:
            attributes = {}
        generation, status = attributes.get("generation"), attributes.get("status")
        if generation != self.manifest.get("generation") or (self.is_complete and status != v2.STATUS_COMPLETE):
            raise CacheError(f"{self.path}: the store was rewritten while this job was reading it (generation "
                             f"{self.manifest.get('generation')} -> {generation}, status {status!r}); the targets "
                             f"read so far may mix two extractions: wait for the extraction to finish and restart "
                             f"this job (training: --resume)")

    def read(self, sample_index: int, view: int, layers: Sequence[str] | None = None,
             dequantize: bool = True) -> TeacherTargets:
        """The targets of one sample-view (features dequantised to float32 for int8 stores).

        layers: the cached layers to read, features and attention (default: every one); the others' chunks are not
        read. The heatmap and occupancy are always read. dequantize=False: an int8 store's features stay int8, as
        `QuantizedFeatures` (a training loader's workers hand them over so; the device dequantises them).
        """
        if not (0 <= sample_index < self.num_samples and 0 <= view < self.num_views):
            raise IndexError(f"sample-view ({sample_index}, {view}) outside {self.num_samples} x {self.num_views}")
        cached = [layer.name for layer in self.layers]
        wanted = set(cached if layers is None else layers)
        if wanted - set(cached):
            raise CacheError(f"{self.path}: layers {sorted(wanted - set(cached))} are not cached; it holds {cached}")
        chosen = [layer for layer in self.layers if layer.name in wanted]
        arrays = self._open_arrays()
        bound = v2.binds_chunks(self.manifest)
        marker = None
        if not self.is_complete:
            marker = self._read_chunk(v2.DONE, sample_index, view)[0]
            if not is_set(marker):
                raise CacheError(f"{self.path}: sample-view ({sample_index}, {view}) is not extracted yet; finish "
                                 f"the extraction with the same extract-teacher command")
        skipped = {name for layer in cached if layer not in wanted
                   for name in (v2.feature_array(layer), v2.attention_array(layer),
                                v2.feature_scale_array(layer), v2.feature_offset_array(layer))}
        # the marker of a complete bound store is read with the chunks (one more small read, in parallel)
        names = [n for n in arrays if n not in skipped and (n != v2.DONE or (bound and marker is None))]
        if self.concurrent_reads:
            fetched = dict(zip(names, self._pool.map(lambda n: self._read_chunk(n, sample_index, view), names)))
        else:
            fetched = {n: self._read_chunk(n, sample_index, view) for n in names}
        if v2.DONE in fetched:
            marker = fetched.pop(v2.DONE)[0]
        self.check_unchanged()
        if bound:
            self._check_binding(sample_index, view, marker, {n: crc for n, (_, crc) in fetched.items()})
        chunks = {n: values for n, (values, _) in fetched.items()}
        features, attention = {}, {}
        for layer in chosen:
            stored = chunks[v2.feature_array(layer.name)]
            if self.manifest["storage"]["dtype"] == "int8":
                scale, offset = chunks[v2.feature_scale_array(layer.name)], chunks[v2.feature_offset_array(layer.name)]
                features[layer.name] = (torch.from_numpy(dequantize_per_channel(stored, scale, offset)) if dequantize
                                        else QuantizedFeatures.from_numpy(stored, scale, offset))
            else:
                # torch's fp16 -> fp32 conversion is about 2x faster than numpy's astype
                features[layer.name] = torch.from_numpy(stored).float()
            attention[layer.name] = _as_float32(chunks[v2.attention_array(layer.name)])
        return TeacherTargets(
            sample_token=self.sample_tokens[sample_index], view=view, bev_aug=self.bev_aug(sample_index, view),
            features=features, heatmap=_as_float32(chunks[v2.HEATMAP]),
            attention=attention, occupancy=torch.from_numpy(chunks[v2.OCCUPANCY].astype(bool)))

    def read_teacher_head(self) -> dict[str, torch.Tensor]:
        """The teacher CenterHead state_dict stored with the cache (for inheriting the student head)."""
        group = self.path.open_group(mode="r")
        if v2.TEACHER_HEAD not in group:
            return {}
        head = group[v2.TEACHER_HEAD]
        state = {}
        for name, array in _walk_arrays(head, ""):
            try:
                state[name] = torch.from_numpy(decode_single_chunk(array))
            except ChunkError as exc:
                raise CacheError(f"{self.path}: teacher_head/{name}: {exc}; repair the store with "
                                 f"`{self.repair_command}`") from None
        return state


def _walk_arrays(group: Any, prefix: str):
    """(name, array) of every array under `group`, names relative to it."""
    import zarr

    for name, node in group.members():
        full = f"{prefix}{name}"
        if isinstance(node, zarr.Array):
            yield full, node
        else:
            yield from _walk_arrays(node, f"{full}/")


def _as_float32(values: np.ndarray) -> torch.Tensor:
    """A float32 tensor of a decoded chunk, without a copy when it is float32 already."""
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _read_static(path: StoreLocation, group: Any, manifest: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """The checked sample tokens and views of a store; CacheError naming the array when either is damaged."""
    problems = {}
    tokens: list[str] = []
    views = np.zeros((0, 0, 4))
    for name in (v2.SAMPLE_TOKENS, v2.VIEWS):
        try:
            array = group[name]
            problem = crc_problem(single_chunk_bytes(array))
            if problem is not None:
                problems[name] = problem
            elif name == v2.SAMPLE_TOKENS:
                tokens = [str(t) for t in array[...]]
            else:
                views = np.asarray(array[...], dtype=np.float64)
        except Exception as exc:  # the array's metadata is gone or unreadable
            problems[name] = f"unreadable ({type(exc).__name__})"
    expected = manifest.get("dataset", {}).get("sample_tokens_sha256")
    if not problems and tokens_sha256(tokens) != expected:
        problems[v2.SAMPLE_TOKENS] = "the tokens do not match the manifest's sample_tokens_sha256"
    if problems:
        text = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
        raise CacheError(f"{path}: {text}; repair the store with `{repair_command(manifest, path)}`")
    return tokens, views


def repair_command(manifest: dict[str, Any], path: Path | str | StoreLocation) -> str:
    """The extract-teacher command that wrote the store, with --repair (or a generic form when unrecorded)."""
    # a store written by an older version may hold credentials in its command: never printed
    command = redact_command(str(manifest.get("extraction", {}).get("command") or ""))
    if command.startswith("distillbev extract-teacher"):
        parts = [part for part in shlex.split(command) if part not in ("--overwrite", "--repair")]
        storage = manifest.get("storage", {})
        if storage.get("dtype") == "int8" and "--int8-error" not in parts:
            # written before --int8-error existed: its steps were range/255, which today's default would change
            parts += ["--int8-error", repr(v2.int8_error(storage))]
        return shlex.join(parts + ["--repair"])
    return f"distillbev extract-teacher ... --cache {path} --repair (with the options that extracted it)"
