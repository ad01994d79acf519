"""Schema 3 of the teacher-feature cache: the zarr v3 layout, the files beside it and the manifest it carries.

The module keeps the name of schema 2, the layout it extends: schema 3 differs only in its done markers, which bind
every chunk of a sample-view to its place (`pipeline/cache/marker.py`), and in the manifest's `store_id`. A
schema-2 store (bare uint8 markers) is still read, its markers taken as "done, unbound" (`READABLE_SCHEMA_VERSIONS`).

One zarr group holds everything for S samples x V views (shape letters as in `pipeline/data/types.py`):

    features/<layer>          (S, V, C, Y, X)   float16, or int8 with the two arrays below
    features/<layer>_scale    (S, V, C)         float32  int8 only: x = q * scale + offset, per sample-view channel
    features/<layer>_offset   (S, V, C)         float32
    heatmap                   (S, V, 10, Yh, Xh) float16 clip-sigmoid teacher class probabilities
    attention/<layer>         (S, V, Y, X)      float32  teacher spatial attention (mean 1 over Y*X)
    occupancy                 (S, V, Y, X)      bool     teacher canvas cells that hold a point
    sample_tokens             (S,)              string
    views                     (S, V, 4)         float64  BEVAugmentation.as_array(): rotation, scale, flip_x, flip_y
    done                      (S, V, D)         uint8    all zero until every chunk of that sample-view is written,
                                                 then a digest binding them to this store and sample-view
                                                 (D = 48 + 4 N for N per-sample-view arrays; schema 2: (S, V), 1)
    input_digest              (S, F, 32)        uint8    SHA-256 of each input file sample s's teacher points were
                                                 read from, in read order (F = 1 + num_sweeps files, twice that
                                                 with MVP virtual points; zero rows: fewer files or not recorded)
    teacher_head/<param>      any               the teacher CenterHead state_dict (float32), and detr.<param> the
                                                 DETR decoder's of a teacher with one (BEVFormer students inherit it)

Every array, `sample_tokens` and `teacher_head/*` included, ends its chunks with a CRC32C checksum; every
per-sample-view array has one chunk per sample-view, so the extraction workers never share a chunk, and every chunk
is written even when it equals the fill value, so a missing chunk always means "not written". Two plain files sit
beside the zarr metadata in the store's folder:

    distillbev_cache.json     the marker: written before anything else, so a store killed while its layout was
                              being created is still recognised as this tool's (and only such a store is ever
                              deleted by --overwrite)
    distillbev.lock           the writer lock (an flock held by the extracting process; host, pid and command inside)

`input_digest` is written with the first sample-view of a sample and compared with every later one (docs/cache.md,
Identity); a store created before it existed has no such array, and its inputs are known by names and sizes only.

The manifest lives in the group attributes; `status` is "writing" until every sample-view is done and the store
passed its final check, then "complete". `generation` is a fresh id each time a process starts rewriting the
store (creation, repair), so a reader can tell that the store changed under it. `store_id` (schema 3) is fixed at
creation: the SHA-256 of the manifest's identity (every key but `VOLATILE_KEYS`), so two extractions of the same
teacher, data and settings get the same id and the same bytes, and any other store another id.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 3
BARE_MARKER_SCHEMA_VERSION = 2  # done markers are a bare 1, not bound to their chunks: read, never written
READABLE_SCHEMA_VERSIONS = (BARE_MARKER_SCHEMA_VERSION, SCHEMA_VERSION)

MARKER_FILE = "distillbev_cache.json"
LOCK_FILE = "distillbev.lock"
MARKER_FORMAT = "distillbev-teacher-cache"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

FEATURE_DTYPES = {"fp16": "float16", "int8": "int8"}  # --dtype choice -> zarr data type of features/<layer>
HEATMAP_DTYPE = "float16"
ATTENTION_DTYPE = "float32"
SCALE_DTYPE = "float32"
VIEWS_DTYPE = "float64"
DONE_DTYPE = "uint8"
DONE_HEADER_BYTES = 48  # digest (32), store tag (8), sample and view (uint32 each); then 4 bytes per bound chunk
STORE_ID_KEY = "store_id"
INPUT_DIGEST_DTYPE = "uint8"
INPUT_DIGEST_BYTES = 32  # SHA-256 of one input file
HEATMAP_CHANNELS = 10
# zstd level of every chunk written from now on. Level 1 was chosen by the codec study (docs/benchmarks.md): on
# the trained teacher's int8 features it encodes 1.4-1.5x faster than level 3 and stores 3-4% fewer bytes. A store
# keeps the level it was created with (its arrays' codecs say it; a resume or repair writes at that level), so the
# level is not part of a store's identity (VOLATILE_KEYS).
ZSTD_LEVEL = 1
# int8 rate control (`pipeline/cache/quantize.py`): RMS quantisation error per layer map as a fraction of its RMS.
# The manifest's optional `storage.int8_error` holds it; absent means 0 (steps of range / 255, the int8 stores
# written before the codec study), so those stores keep their identity and old readers read new stores unchanged:
# the stored form is the same (int8 + per-channel scale and offset, x = q * scale + offset).
INT8_ERROR_KEY = "int8_error"
DEFAULT_INT8_ERROR = 0.03  # the default of extract-teacher (docs/cache.md "Codecs": cosine >= 0.9997 measured)
MAX_INT8_ERROR = 0.1
ATTENTION_TEMPERATURE = 0.5  # tau of the DistillBEV spatial attention

HEATMAP = "heatmap"
OCCUPANCY = "occupancy"
SAMPLE_TOKENS = "sample_tokens"
VIEWS = "views"
DONE = "done"
INPUT_DIGEST = "input_digest"
TEACHER_HEAD = "teacher_head"

# dimension_names written into every array's metadata
DIMS_MAP = ("sample", "view", "C", "Y", "X")
DIMS_PLANE = ("sample", "view", "Y", "X")
DIMS_CHANNEL = ("sample", "view", "C")
DIMS_VIEWS = ("sample", "view", "augmentation")
DIMS_DONE = ("sample", "view", "byte")
DIMS_BARE_DONE = ("sample", "view")  # schema 2
DIMS_TOKENS = ("sample",)
DIMS_INPUT_DIGEST = ("sample", "file", "byte")

# manifest keys (dotted) that may differ between two runs of the same extraction: the checkpoint is identified
# by its sha256 and the data by its content fingerprint, so moving either does not block a resume; the zstd level
# changes bytes, never values
VOLATILE_KEYS = ("created_at", "status", "generation", "package_version", "software", "extraction",
                 "teacher.checkpoint_path", "dataset.dataroot", "storage.level", STORE_ID_KEY)


def feature_array(layer: str) -> str:
    return f"features/{layer}"


def feature_scale_array(layer: str) -> str:
    return f"features/{layer}_scale"


def feature_offset_array(layer: str) -> str:
    return f"features/{layer}_offset"


def attention_array(layer: str) -> str:
    return f"attention/{layer}"


def teacher_head_array(param: str) -> str:
    return f"{TEACHER_HEAD}/{param}"


# manifest key -> expected JSON type(s); nested sections list their own keys
MANIFEST_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "package_version": str,
    "teacher": {"config": dict, "checkpoint_path": str, "checkpoint_sha256": str},
    "bev_grid": {"x_min": float, "x_max": float, "y_min": float, "y_max": float, "resolution": float},
    "layers": dict,  # name -> {channels: int, shape: [Y, X], resolution: float, stride: float}
    "heatmap": {"channels": int, "shape": list},
    "occupancy": {"shape": list},
    "storage": {"dtype": str, "codec": str, "level": int, "checksum": str, "heatmap_dtype": str,
                "attention_dtype": str, "attention_temperature": float},
    "views": {"count": int, "seed": int, "rotation_range": list, "scale_range": list, "flip_x_prob": float,
              "flip_y_prob": float},
    "dataset": {"dataroot": str, "version": str, "split": str, "num_sweeps": int, "fingerprint": str,
                "sample_tokens_sha256": str, "point_loading": dict},
    "sample_count": int,
    "created_at": str,
    "status": str,
    "generation": str,
    "software": dict,  # informational: package versions of the writing process
    "extraction": dict,  # informational: the command and settings that wrote the store
}
LAYER_SCHEMA = {"channels": int, "shape": list, "resolution": float, "stride": float}


def validate_manifest(manifest: Any) -> list[str]:
    """Problems of a manifest against this schema (an empty list when it is valid)."""
    problems: list[str] = []
    _check_section(manifest, MANIFEST_SCHEMA, "", problems)
    if not problems:
        for name, spec in manifest["layers"].items():
            _check_section(spec, LAYER_SCHEMA, f"layers.{name}.", problems)
        if manifest["storage"]["dtype"] not in FEATURE_DTYPES:
            problems.append(f"storage.dtype: expected one of {sorted(FEATURE_DTYPES)}, "
                            f"found {manifest['storage']['dtype']!r}")
        problems += _int8_error_problems(manifest["storage"])
        problems += _store_id_problems(manifest)
        if manifest["status"] not in (STATUS_WRITING, STATUS_COMPLETE):
            problems.append(f"status: expected 'writing' or 'complete', found {manifest['status']!r}")
    return problems


def int8_error(storage: dict[str, Any]) -> float:
    """The int8 error budget of a manifest's `storage` section (0 when absent: range/255 steps, or fp16)."""
    return float(storage.get(INT8_ERROR_KEY, 0.0))


def binds_chunks(manifest: dict[str, Any]) -> bool:
    """Whether the store's done markers bind its chunks (schema 3), or are bare (schema 2)."""
    return manifest.get("schema_version") != BARE_MARKER_SCHEMA_VERSION


def _store_id_problems(manifest: dict[str, Any]) -> list[str]:
    if not binds_chunks(manifest):
        return []
    value = manifest.get(STORE_ID_KEY)
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        return [f"{STORE_ID_KEY}: expected 64 lower-case hex digits (a SHA-256), found {value!r}"]
    return []


def _int8_error_problems(storage: dict[str, Any]) -> list[str]:
    if INT8_ERROR_KEY not in storage:
        return []
    value = storage[INT8_ERROR_KEY]
    if not _is_instance(value, float) or not 0 < value <= MAX_INT8_ERROR:
        return [f"storage.{INT8_ERROR_KEY}: expected a number in (0, {MAX_INT8_ERROR}], found {value!r}"]
    if storage["dtype"] != "int8":
        return [f"storage.{INT8_ERROR_KEY}: only an int8 store has one, found dtype {storage['dtype']!r}"]
    return []


def _check_section(data: Any, schema: dict[str, Any], prefix: str, problems: list[str]) -> None:
    if not isinstance(data, dict):
        problems.append(f"{prefix or '<root>'}: expected a mapping, found {type(data).__name__}")
        return
    for key, expected in schema.items():
        if key not in data:
            problems.append(f"{prefix}{key}: missing")
        elif isinstance(expected, dict):
            _check_section(data[key], expected, f"{prefix}{key}.", problems)
        elif not _is_instance(data[key], expected):
            problems.append(f"{prefix}{key}: expected {expected.__name__}, found {type(data[key]).__name__}")


def _is_instance(value: Any, expected: type) -> bool:
    if expected is float:  # JSON writes 1.0 as 1.0 but a user-built manifest may hold an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
