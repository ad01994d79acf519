"""The cache manifest: what was extracted, from which teacher and data, and how it is stored.

The manifest is a JSON-compatible dict kept in the store's group attributes (schema in `cache_schemas/v2.py`).
Two manifests describe the same extraction when they agree on every key except the volatile ones
(`v2.VOLATILE_KEYS`: creation time, status, generation, software versions, the extraction command, checkpoint and
dataroot paths); `manifest_diff` lists the keys where they do not. The data is identified by content (a fingerprint
of the tables and LiDAR files that decide the teacher's input, and a hash of the sample tokens), never by path.
`store_identity` hashes those same keys into the store's id, which every done marker is bound to.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from ...cache_schemas import v2
from ..geometry.bev import BEVAugmentation, BEVGrid, sample_bev_augmentation


@dataclass(frozen=True)
class LayerSpec:
    """One distilled teacher layer: `channels` x `shape` (Y, X) cells of `resolution` metres.

    stride: cells of the teacher's BEV grid per cell of this layer (e.g. 4 for 128^2 over a 512^2 canvas).
    """

    name: str
    channels: int
    shape: tuple[int, int]
    resolution: float
    stride: float

    def to_json(self) -> dict[str, Any]:
        return {"channels": int(self.channels), "shape": [int(s) for s in self.shape],
                "resolution": float(self.resolution), "stride": float(self.stride)}


@dataclass(frozen=True)
class ViewConfig:
    """How the V cached views of each sample are drawn (view 0 is always the identity)."""

    count: int = 1  # views per sample
    seed: int = 0  # views of sample i come from numpy.random.default_rng([seed, i])
    rotation_range: tuple[float, float] = (-0.3925, 0.3925)  # radians, uniform
    scale_range: tuple[float, float] = (0.95, 1.05)  # uniform
    flip_x_prob: float = 0.5  # probability of y -> -y
    flip_y_prob: float = 0.5  # probability of x -> -x

    def to_json(self) -> dict[str, Any]:
        return {"count": int(self.count), "seed": int(self.seed),
                "rotation_range": [float(v) for v in self.rotation_range],
                "scale_range": [float(v) for v in self.scale_range],
                "flip_x_prob": float(self.flip_x_prob), "flip_y_prob": float(self.flip_y_prob)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ViewConfig":
        return cls(count=int(data["count"]), seed=int(data["seed"]),
                   rotation_range=tuple(data["rotation_range"]), scale_range=tuple(data["scale_range"]),
                   flip_x_prob=float(data["flip_x_prob"]), flip_y_prob=float(data["flip_y_prob"]))


def view_augmentations(views: ViewConfig, sample_index: int) -> list[BEVAugmentation]:
    """The `views.count` augmentations of one sample: the identity, then draws from rng([seed, sample_index])."""
    rng = np.random.default_rng([views.seed, sample_index])
    augmentations = [BEVAugmentation()]
    for _ in range(views.count - 1):
        augmentations.append(sample_bev_augmentation(rng, tuple(views.rotation_range), tuple(views.scale_range),
                                                     views.flip_x_prob, views.flip_y_prob))
    return augmentations


def views_array(views: ViewConfig, sample_count: int) -> np.ndarray:
    """(S, V, 4) float64: every sample's views as BEVAugmentation.as_array rows."""
    out = np.zeros((sample_count, views.count, 4), dtype=np.float64)
    for index in range(sample_count):
        for view, augmentation in enumerate(view_augmentations(views, index)):
            out[index, view] = augmentation.as_array()
    return out


def package_version() -> str:
    try:
        return metadata.version("distillbev")
    except metadata.PackageNotFoundError:
        return "unknown"


def software_versions() -> dict[str, str]:
    """Versions of the packages that decide the stored bytes (informational: not compared on resume)."""
    out = {"distillbev": package_version()}
    for name in ("torch", "numpy", "zarr", "numcodecs"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def tokens_sha256(sample_tokens: list[str]) -> str:
    """sha256 of the split's sample tokens in order (one per line)."""
    return hashlib.sha256("\n".join(sample_tokens).encode()).hexdigest()


def new_generation() -> str:
    """A fresh store generation id."""
    return uuid.uuid4().hex


def build_manifest(*, teacher_config: dict[str, Any], checkpoint_path: str, checkpoint_sha256: str,
                   grid: BEVGrid, layers: list[LayerSpec], heatmap_shape: tuple[int, int],
                   occupancy_shape: tuple[int, int], dtype: str, views: ViewConfig, dataset: dict[str, Any],
                   sample_tokens: list[str], extraction: dict[str, Any] | None = None,
                   int8_error: float = 0.0) -> dict[str, Any]:
    """A v2 manifest (status "writing").

    dataset: dataroot, version, split, num_sweeps, fingerprint (`pipeline.data.preflight.dataset_fingerprint`:
    the content of the tables and LiDAR files that decide the teacher's input) and point_loading (the loader
    settings that decide it: sweep selection, crop range, ...). extraction: informational (command, batch size).
    int8_error: int8 only, the RMS quantisation error budget per map as a fraction of its RMS
    (`pipeline/cache/quantize.py`); 0 leaves `storage.int8_error` out (range/255 steps, as stores before it).
    """
    if dtype not in v2.FEATURE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(v2.FEATURE_DTYPES)}")
    if int8_error and dtype != "int8":
        raise ValueError(f"int8_error {int8_error} is for --dtype int8 only, found dtype {dtype!r}")
    if views.count < 1:
        raise ValueError(f"views.count must be >= 1, found {views.count}")
    manifest = {
        "schema_version": v2.SCHEMA_VERSION,
        "package_version": package_version(),
        "teacher": {"config": teacher_config, "checkpoint_path": str(checkpoint_path),
                    "checkpoint_sha256": str(checkpoint_sha256)},
        "bev_grid": {"x_min": float(grid.x_min), "x_max": float(grid.x_max), "y_min": float(grid.y_min),
                     "y_max": float(grid.y_max), "resolution": float(grid.resolution)},
        "layers": {layer.name: layer.to_json() for layer in layers},
        "heatmap": {"channels": v2.HEATMAP_CHANNELS, "shape": [int(s) for s in heatmap_shape]},
        "occupancy": {"shape": [int(s) for s in occupancy_shape]},
        "storage": {"dtype": dtype, "codec": "zstd", "level": v2.ZSTD_LEVEL, "checksum": "crc32c",
                    "heatmap_dtype": v2.HEATMAP_DTYPE, "attention_dtype": v2.ATTENTION_DTYPE,
                    "attention_temperature": v2.ATTENTION_TEMPERATURE},
        "views": views.to_json(),
        "dataset": {"dataroot": str(dataset["dataroot"]), "version": str(dataset["version"]),
                    "split": str(dataset["split"]), "num_sweeps": int(dataset["num_sweeps"]),
                    "fingerprint": str(dataset["fingerprint"]), "sample_tokens_sha256": tokens_sha256(sample_tokens),
                    "point_loading": dict(dataset["point_loading"])},
        "sample_count": len(sample_tokens),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": v2.STATUS_WRITING,
        "generation": new_generation(),
        "software": software_versions(),
        "extraction": dict(extraction or {}),
    }
    if int8_error:
        manifest["storage"][v2.INT8_ERROR_KEY] = float(int8_error)
    # the stored form is JSON: normalise now (tuples -> lists) so a fresh and a reloaded manifest compare equal
    manifest = json.loads(json.dumps(manifest))
    manifest[v2.STORE_ID_KEY] = store_identity(manifest)
    problems = v2.validate_manifest(manifest)
    if problems:
        raise ValueError(f"invalid cache manifest: {'; '.join(problems)}")
    return manifest


def store_identity(manifest: dict[str, Any]) -> str:
    """The store id of a manifest: SHA-256 (hex) of every key but the volatile ones (`v2.VOLATILE_KEYS`, the id
    itself included), as canonical JSON.

    The id is recorded at creation and read back from then on (never recomputed for a stored manifest), so the keys
    a later version adds do not change the id of a store written before. Two extractions of the same teacher, data
    and settings get the same id (and so the same done markers, byte for byte); any other store gets another.
    """
    flat = flatten(json.loads(json.dumps(manifest)))
    kept = {key: value for key, value in flat.items() if not _ignored(key, v2.VOLATILE_KEYS)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layer_specs(manifest: dict[str, Any]) -> list[LayerSpec]:
    return [LayerSpec(name, int(spec["channels"]), tuple(spec["shape"]), float(spec["resolution"]),
                      float(spec["stride"])) for name, spec in manifest["layers"].items()]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted.key: leaf}; lists stay leaves."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


_MISSING = "<missing>"


def manifest_diff(stored: dict[str, Any], requested: dict[str, Any],
                  ignore: tuple[str, ...] = v2.VOLATILE_KEYS, only_requested: bool = False) -> list[str]:
    """Lines "key: stored -> requested" for every differing leaf.

    only_requested: compare just the keys present in `requested` (a partial expectation).
    """
    left, right = flatten(json.loads(json.dumps(stored))), flatten(json.loads(json.dumps(requested)))
    keys = sorted(right) if only_requested else sorted(set(left) | set(right))
    lines = []
    for key in keys:
        if _ignored(key, ignore):
            continue
        a, b = left.get(key, _MISSING), right.get(key, _MISSING)
        if a != b:
            lines.append(f"{key}: {_short(a)} -> {_short(b)}")
    return lines


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    """Whether the dotted `key` is one of `ignore` or inside one of them."""
    return any(key == skip or key.startswith(f"{skip}.") for skip in ignore)


def _short(value: Any, limit: int = 80) -> str:
    text = value if value is _MISSING else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compute_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings of `manifest` that decide its computed values in their last bits, by what a person
    changes to set them (the `extraction` entries, and the torch version).

    They are volatile (a store made with other ones holds the same data to float precision), but a resume or a
    repair computes sample-views beside stored ones, so it must use the same to keep the store bit-identical to an
    uninterrupted extraction. Each forked worker computes with threads // workers torch threads. A store written
    before an entry was recorded lacks it: only entries both sides record are compared.
    """
    extraction = manifest.get("extraction", {})
    settings: dict[str, Any] = {}
    if "device" in extraction:
        settings["device (--device)"] = str(extraction["device"]).partition(":")[0]  # any index of one model
    for key, label in (("device_model", "device model"), ("precision", "teacher precision"),
                       ("matmul_precision", "float32 matmul precision (torch.set_float32_matmul_precision)"),
                       ("tf32", "TF32 (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)"),
                       ("batch_size", "batch size (--batch-size)")):
        if key in extraction:
            settings[label] = extraction[key]
    if "threads" in extraction:
        threads = max(1, int(extraction["threads"]) // max(1, int(extraction.get("workers", 1))))
        settings["threads per extraction process (OMP_NUM_THREADS / --workers)"] = threads
    if "torch" in manifest.get("software", {}):
        settings["torch version"] = manifest["software"]["torch"]
    return settings


def settings_changes(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Lines "setting: recorded -> now" for every `compute_settings` entry both manifests record and that differs."""
    before, now = compute_settings(recorded), compute_settings(requested)
    return [f"{label}: {_short(before[label])} -> {_short(now[label])}" for label in before
            if label in now and json.dumps(before[label]) != json.dumps(now[label])]
