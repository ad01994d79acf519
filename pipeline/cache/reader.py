"""Reading teacher targets back from a v1 store.

    cache = TeacherCache.open("runs/cache.zarr")
    cache.check_compatible({"layers": {"neck": {"channels": 384, "shape": [128, 128]}}})
    targets = cache.read(cache.index_of(token), view=0)

`TeacherCache` is safe in DataLoader workers: it keeps only plain data (path, manifest, tokens) between reads and
opens the zarr arrays lazily in each process (a forked or unpickled copy reopens them), because zarr drives I/O
through an asyncio thread that does not survive a fork. One read fetches all arrays of a sample-view concurrently.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...cache_schemas import v1
from ..errors import CacheError
from ..geometry.bev import BEVAugmentation
from .manifest import LayerSpec, layer_specs, manifest_diff
from .quantize import dequantize_per_channel


@dataclass
class TeacherTargets:
    """The cached teacher outputs of one sample-view.

    features: layer -> (C, Y, X) float32; heatmap: (10, Yh, Xh) float32 probabilities;
    attention: layer -> (Y, X) float32; occupancy: (Y, X) bool; bev_aug: the augmentation the teacher saw.
    """

    sample_token: str
    view: int
    bev_aug: BEVAugmentation
    features: dict[str, torch.Tensor]
    heatmap: torch.Tensor
    attention: dict[str, torch.Tensor]
    occupancy: torch.Tensor


class TeacherCache:
    """Read-only access to a teacher-feature store (use `TeacherCache.open`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], sample_tokens: list[str], views: np.ndarray,
                 allow_partial: bool, concurrent_reads: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.sample_tokens = sample_tokens
        self.views = views  # (S, V, 4) float64
        self.allow_partial = allow_partial
        self.concurrent_reads = concurrent_reads
        self._index = {token: i for i, token in enumerate(sample_tokens)}
        self._arrays: dict[str, Any] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    @classmethod
    def open(cls, path: str | Path, allow_partial: bool = False, concurrent_reads: bool = True) -> "TeacherCache":
        """Open and validate a store; CacheError if it is missing, of another schema or (unless allowed) partial."""
        import zarr

        path = Path(path)
        hint = "run `distillbev extract-teacher` to create it"
        if not path.exists():
            raise CacheError(f"{path}: no teacher cache at this path; {hint}")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as exc:
            raise CacheError(f"{path}: not a zarr v3 group ({exc.__class__.__name__}); {hint}") from exc
        manifest = dict(group.attrs)
        version = manifest.get("schema_version")
        if version != v1.SCHEMA_VERSION:
            raise CacheError(f"{path}: cache schema version {version!r}, this code reads version "
                             f"{v1.SCHEMA_VERSION}; re-extract the cache with this version")
        problems = v1.validate_manifest(manifest)
        if problems:
            raise CacheError(f"{path}: malformed cache manifest ({'; '.join(problems[:5])}); re-extract the cache")
        if manifest["status"] != v1.STATUS_COMPLETE and not allow_partial:
            done = np.asarray(group[v1.DONE][...]).astype(bool)
            raise CacheError(f"{path}: the cache is partial (status {manifest['status']!r}, {int(done.sum())} of "
                             f"{done.size} sample-views done); rerun the same extract-teacher command to finish it")
        tokens = [str(t) for t in group[v1.SAMPLE_TOKENS][...]]
        views = np.asarray(group[v1.VIEWS][...], dtype=np.float64)
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
        return self.manifest["status"] == v1.STATUS_COMPLETE

    def __len__(self) -> int:
        return self.num_samples

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
            import zarr

            group = zarr.open_group(str(self.path), mode="r")
            names = [v1.HEATMAP, v1.OCCUPANCY, v1.DONE]
            for layer in self.layers:
                names += [v1.feature_array(layer.name), v1.attention_array(layer.name)]
                if self.manifest["storage"]["dtype"] == "int8":
                    names += [v1.feature_scale_array(layer.name), v1.feature_offset_array(layer.name)]
            self._arrays = {name: group[name] for name in names}
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(names)), thread_name_prefix="cache-read")
            self._pid = os.getpid()
        return self._arrays

    def read(self, sample_index: int, view: int) -> TeacherTargets:
        """The targets of one sample-view (features dequantised to float32 for int8 stores)."""
        if not (0 <= sample_index < self.num_samples and 0 <= view < self.num_views):
            raise IndexError(f"sample-view ({sample_index}, {view}) outside {self.num_samples} x {self.num_views}")
        arrays = self._open_arrays()
        if not self.is_complete and not bool(arrays[v1.DONE][sample_index, view]):
            raise CacheError(f"{self.path}: sample-view ({sample_index}, {view}) is not extracted yet; finish the "
                             f"extraction with the same extract-teacher command")
        names = [n for n in arrays if n != v1.DONE]
        if self.concurrent_reads:
            chunks = dict(zip(names, self._pool.map(lambda n: arrays[n][sample_index, view], names)))
        else:
            chunks = {n: arrays[n][sample_index, view] for n in names}
        features, attention = {}, {}
        for layer in self.layers:
            stored = chunks[v1.feature_array(layer.name)]
            if self.manifest["storage"]["dtype"] == "int8":
                features[layer.name] = torch.from_numpy(dequantize_per_channel(
                    stored, chunks[v1.feature_scale_array(layer.name)], chunks[v1.feature_offset_array(layer.name)]))
            else:
                # torch's fp16 -> fp32 conversion is about 2x faster than numpy's astype
                features[layer.name] = torch.from_numpy(stored).float()
            attention[layer.name] = _as_float32(chunks[v1.attention_array(layer.name)])
        return TeacherTargets(
            sample_token=self.sample_tokens[sample_index], view=view, bev_aug=self.bev_aug(sample_index, view),
            features=features, heatmap=_as_float32(chunks[v1.HEATMAP]),
            attention=attention, occupancy=torch.from_numpy(chunks[v1.OCCUPANCY].astype(bool)))

    def read_teacher_head(self) -> dict[str, torch.Tensor]:
        """The teacher CenterHead state_dict stored with the cache (for inheriting the student head)."""
        import zarr

        group = zarr.open_group(str(self.path), mode="r")
        if v1.TEACHER_HEAD not in group:
            return {}
        head = group[v1.TEACHER_HEAD]
        return {name: torch.from_numpy(np.array(array[...])) for name, array in _walk_arrays(head, "")}


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
