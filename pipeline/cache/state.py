"""What a store holds, read without writing anything: its manifest and its done markers.

`read_manifest` reads the manifest (a damaged root `zarr.json` is an error, never "no store");
`refuse_damaged_root` / `refuse_damaged_arrays` decide, before `prepare_store` writes anything, whether a store whose
metadata is damaged may be rebuilt (only when nothing computed would be lost); `read_done` reads the done markers in
batches. The writer (`writer.py`), the engine (`extract.py`, `distributed.py`) and the reader use them.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ...cache_schemas import v2
from ..errors import CacheError
from .checks import sample_view_array_names
from .chunks import ChunkError, chunk_coords, decode_chunk, get_chunks
from .location import StoreLocation, remote_error

logger = logging.getLogger(__name__)


def read_manifest(path: str | Path | StoreLocation) -> dict[str, Any] | None:
    """The manifest in the group attributes at `path`, or None if `path` holds no distillbev manifest (no root
    `zarr.json`, or a group without one).

    A root `zarr.json` that is there but empty, not JSON or not a group's metadata is damage, never "no store":
    a CacheError naming what is wrong.
    """
    path = StoreLocation.parse(path)
    attributes, problem = root_metadata(path)
    if problem is not None and problem != MISSING:
        raise CacheError(f"{path}: its root metadata {_key(path, 'zarr.json')} {problem}; the store's manifest "
                         f"cannot be read; restore zarr.json from a copy of the store")
    return attributes if attributes is not None and "schema_version" in attributes else None


MISSING = "is missing"
ROOT_FILES = ("zarr.json", v2.MARKER_FILE, v2.LOCK_FILE)  # with the root's temporary files: a store not yet laid out
LAYOUT_ARRAYS = (v2.DONE, v2.VIEWS, v2.SAMPLE_TOKENS, v2.TEACHER_HEAD)  # written while the layout is created
EXAMPLES = 3  # keys named in a refusal


def _key(path: StoreLocation, key: str) -> str:
    return str(path.path / key) if path.is_local else f"{path}/{key}"


def _metadata_document(path: StoreLocation, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """The zarr v3 metadata document stored under `key`, or what is wrong with it ("is missing", "is empty",
    "is not valid JSON (...)", ...). A failed read is a storage error (CacheError), not damage."""
    try:
        raw = path.get(key)
    except Exception as exc:  # noqa: BLE001 - reported, never taken for damage
        if not path.is_local:
            raise remote_error(path, exc, "read") from exc
        raise CacheError(f"{_key(path, key)}: cannot read ({type(exc).__name__}: {exc}); nothing was changed; "
                         f"check the disk and rerun the same command") from exc
    if raw is None:
        return None, MISSING
    if not raw.strip():
        return None, f"is empty ({len(raw)} bytes)"
    try:
        document = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        return None, f"is not valid JSON ({' '.join(str(exc).split())[:120]})"
    if not isinstance(document, dict) or document.get("zarr_format") != 3:
        return None, "is not zarr v3 metadata (no \"zarr_format\": 3)"
    return document, None


def root_metadata(path: StoreLocation) -> tuple[dict[str, Any] | None, str | None]:
    """The root group's attributes, or None and what is wrong with the root `zarr.json` (MISSING when absent)."""
    document, problem = _metadata_document(path, "zarr.json")
    if document is None:
        return None, problem
    if document.get("node_type") != "group":
        return None, "is not the metadata of a zarr group"
    attributes = document.get("attributes", {})
    if not isinstance(attributes, dict):
        return None, "holds attributes that are not a JSON object"
    return attributes, None


def _first_keys(path: StoreLocation, wanted: Callable[[str], bool], under: list[str] | None = None,
                limit: int = EXAMPLES) -> list[str]:
    """Up to `limit` keys of the store, or of its top-level folders `under`, for which `wanted` is true (the listing
    stops at `limit`: a few requests on an object store, whatever the store's size)."""
    if path.is_local:
        found = []
        for top in ([path.path] if under is None else [path.path / name for name in under]):
            for folder, folders, files in os.walk(top):
                folders.sort()
                for name in sorted(files):
                    key = (Path(folder) / name).relative_to(path.path).as_posix()
                    if wanted(key):
                        found.append(key)
                        if len(found) >= limit:
                            return found
        return found
    from zarr.core.sync import sync

    async def collect() -> list[str]:
        store, keys = path.zarr_store(read_only=True), []
        for listing in ([store.list()] if under is None else [store.list_prefix(f"{name}/") for name in under]):
            async for key in listing:
                if wanted(key):
                    keys.append(key)
                    if len(keys) >= limit:
                        return keys
        return keys

    try:
        return sync(collect())
    except Exception as exc:  # noqa: BLE001 - a listing error is reported, never taken for an empty store
        raise remote_error(path, exc, "list") from exc


def _top_level(path: StoreLocation) -> list[str]:
    """The names directly under the store's root."""
    if path.is_local:
        return sorted(os.listdir(path.path))
    try:
        return path.entries()
    except Exception as exc:  # noqa: BLE001
        raise remote_error(path, exc, "list") from exc


def _is_root_file(key: str) -> bool:
    """The marker, the lock, the root zarr.json, or a temporary file of a root zarr.json write."""
    return key in ROOT_FILES or ("/" not in key and key.endswith(".partial"))


def _is_extracted_chunk(key: str) -> bool:
    """A chunk that a sample-view's extraction wrote (not metadata, not the layout's markers or static arrays)."""
    name = key.rsplit("/", 1)[-1]
    return ("/" in key and name != "zarr.json" and not name.endswith(".partial")
            and key.split("/", 1)[0] not in LAYOUT_ARRAYS)


def refuse_damaged_root(path: StoreLocation, problem: str | None, overwrite: bool) -> list[str]:
    """Raise a CacheError, with nothing changed, for a marked store without a readable manifest that holds more than
    an interrupted creation leaves; returns [] when rebuilding it loses nothing, or (with `overwrite`) the keys it
    will delete.

    A root `zarr.json` that is missing, empty or unreadable (`problem`) allows a rebuild only beside nothing but the
    marker and the lock: any array or chunk means damage (a crash before the file reached the disk, a hand edit) or
    an unfinished copy. A readable group without a manifest is what an interrupted layout creation leaves (the
    manifest is written last), whose arrays hold only empty markers and data derived from the command: it is
    rebuilt unless a chunk of an extracted sample-view is there.
    """
    if problem is not None:
        found = _first_keys(path, lambda key: not _is_root_file(key))
        what = f"its root metadata {_key(path, 'zarr.json')} {problem}, but the store holds arrays or chunks"
        why = ("the manifest is kept in that file: it was damaged (a crash before it reached the disk, a hand edit) "
               "or the store was copied only in part")
        restore = "restore zarr.json from a copy of the store (or finish the interrupted copy)"
    else:
        arrays = [name for name in _top_level(path) if not _is_root_file(name) and name not in LAYOUT_ARRAYS]
        found = _first_keys(path, _is_extracted_chunk, under=arrays)
        what = (f"its root metadata {_key(path, 'zarr.json')} holds no manifest, but the store holds chunks of "
                f"extracted sample-views")
        why = "the manifest was removed from that file (an interrupted creation never leaves such chunks)"
        restore = "restore zarr.json from a copy of the store"
    if not found or overwrite:
        return found
    raise CacheError(f"{path}: {what} ({', '.join(found)}{', ...' if len(found) >= EXAMPLES else ''}); {why}; "
                     f"nothing was changed or deleted. To repair, {restore} and rerun this command, or rerun this "
                     f"command with --overwrite to delete the store and extract it again")


def refuse_damaged_arrays(path: StoreLocation, manifest: dict[str, Any], head_state: dict[str, np.ndarray],
                           overwrite: bool) -> str:
    """Raise a CacheError, with nothing changed, when the `zarr.json` of an array of the store is missing, empty or
    unreadable; with `overwrite`, return what is damaged instead (the caller rebuilds the store); "" when nothing is.

    An absent static array (views, sample_tokens, teacher_head) or input_digest (a store written before it existed)
    is left to the usual checks: the former is rewritten, the latter tolerated.
    """
    from zarr.core.metadata.v3 import ArrayV3Metadata

    static = [v2.VIEWS, v2.SAMPLE_TOKENS] + [v2.teacher_head_array(name) for name in head_state]
    names = sample_view_array_names(manifest) + [v2.DONE, v2.INPUT_DIGEST] + static
    with ThreadPoolExecutor(max_workers=min(16, len(names)), thread_name_prefix="cache-metadata") as pool:
        documents = list(pool.map(lambda name: _metadata_document(path, f"{name}/zarr.json"), names))
    problems = []
    for name, (document, problem) in zip(names, documents):
        if problem == MISSING and name in static + [v2.INPUT_DIGEST]:
            continue
        if document is not None:
            try:
                ArrayV3Metadata.from_dict(dict(document))
            except Exception as exc:  # noqa: BLE001 - the bytes were read: whatever zarr refuses in them is damage
                problem = f"is not an array's metadata ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
        if problem is not None:
            problems.append((name, problem))
    text = "; ".join(f"the metadata of array {name} ({name}/zarr.json) {problem}" for name, problem in problems)
    if not problems or overwrite:
        return text
    files = " and ".join(f"{name}/zarr.json" for name, _ in problems)
    if all(name in static for name, _ in problems):
        paths = " and ".join(_key(path, f"{name}/zarr.json") for name, _ in problems)
        derived = "these arrays are derived from the command, which rewrites them" if len(problems) > 1 else \
            "the array is derived from the command, which rewrites it"
        repair = f"delete {paths} and rerun this command ({derived}), or restore {files} from a copy of the store"
    else:
        repair = (f"restore {files} from a copy of the store and rerun this command, or rerun this command with "
                  f"--overwrite to delete the store and extract it again")
    raise CacheError(f"{path}: {text}; nothing was changed or deleted. To repair, {repair}")


def read_done(path: str | Path | StoreLocation, samples: Sequence[int] | None = None) -> np.ndarray:
    """Done markers as bool, (S, V) for the whole store or (len(samples), V) for the rows of `samples`, in order.

    A marker is done when it is not all zero (a digest, or a schema-2 store's bare 1); whether it binds its
    sample-view's chunks is checked where the chunks are read (`checks.py`, the reader). The markers are fetched in
    batches (`get_chunks`); one that is missing or cannot be decoded counts as not done (its sample-view is
    rewritten), and is named in one warning.
    """
    done = StoreLocation.parse(path).open_group(mode="r")[v2.DONE]
    rows = range(done.shape[0]) if samples is None else samples
    sample_views = [(int(s), v) for s in rows for v in range(done.shape[1])]
    out = np.zeros(len(sample_views), dtype=bool)
    unreadable = []
    for i, raw in enumerate(get_chunks(done, [chunk_coords(done, s, v) for s, v in sample_views])):
        try:
            out[i] = bool(decode_chunk(done, raw).any())
        except ChunkError as exc:
            unreadable.append(f"({sample_views[i][0]}, {sample_views[i][1]}): {exc}")
    if unreadable:
        logger.warning("%d done markers of %s are unreadable (%s%s); those sample-views will be rewritten",
                       len(unreadable), path, "; ".join(unreadable[:3]), " ..." if len(unreadable) > 3 else "")
    return out.reshape(len(rows), done.shape[1])
