"""One saved split index per dataroot, split and loading parameters, mapped read-only by every process.

Building a `SplitIndex` (`index.py`) reads the devkit tables: on v1.0-trainval that is minutes and several GB, and
every torchrun rank, train and val, and every evaluation would pay it again. `open_split_index` builds it once,
saves it as raw arrays (`SplitIndex.save`) and afterwards only maps it (`SplitIndex.load`), so the processes of a
node share one copy of it in the page cache.

Where: `data.index_dir`, or by default `<dataroot>/.distillbev/index` when the dataroot is writable and
`$XDG_CACHE_HOME/distillbev/index` (`~/.cache/distillbev/index`) otherwise. One folder per index, named
`<version>.<split>.<hash>` (the hash over the dataroot's real path, the version, the split and the parameters
below), and a lock file `<name>.lock` beside it. Indexes of other parameters stay beside it (each is small: about
100 MB for the 28,130 train samples of v1.0-trainval with sweeps and six cameras).

Fresh or stale: `index.json` records the build parameters (split, sweep candidates, cameras, adjacent-frame count and
interval, the source: the devkit tables or an mmdet3d infos file, and the devkit version, whose predefined splits
and box velocities are code) and the identity (path, size, mtime_ns) of every source file: each
`<dataroot>/<version>/*.json`, splits.json included, and the infos file when it is the source. Any difference (a
table rewritten, added or removed) rebuilds the index, with one INFO line saying why; a stale index is never used.

Concurrency: a reader checks and maps under a shared fcntl lock; a builder takes the exclusive lock, checks again
(another process may have built it meanwhile), builds, saves (temporary folder + rename) and maps. Of the ranks and
processes of a node that start together exactly one builds; the others wait and then map its index.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .config import DataConfig
from .index import INDEX_HEADER, SplitIndex, build_split_index, read_index_header
from .infos import index_from_infos, infos_file as infos_path
from .loading import check_dataroot, load_nuscenes

log = logging.getLogger(__name__)
NONE_SAVED = "none saved yet"


@dataclass(frozen=True)
class IndexKey:
    """What a saved index was built from and with; two opens with equal keys share one saved index."""

    dataroot: str  # real path of the dataroot
    version: str
    split: str
    sweep_candidates: int
    camera_channels: tuple[str, ...]  # () for a LiDAR-only index
    adjacent_count: int  # 4D adjacent-frame candidates per sample (0: none)
    adjacent_interval: int  # reference-camera records between candidates (1 when there are none)
    source: str  # "devkit" (the dataroot's tables) or "infos" (an mmdet3d infos file)
    infos_file: str  # real path of the infos file ("" for the devkit)
    devkit: str  # nuscenes-devkit version

    def parameters(self) -> dict:
        """JSON-ready parameters (recorded in index.json and hashed into the folder name)."""
        values = asdict(self)
        values["camera_channels"] = list(self.camera_channels)
        return values

    @property
    def name(self) -> str:
        """Folder name: `<version>.<split>.<16 hex digits of the parameters' hash>`."""
        digest = hashlib.sha256(json.dumps(self.parameters(), sort_keys=True).encode()).hexdigest()[:16]
        return f"{_safe(self.version)}.{_safe(self.split)}.{digest}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip(".") or "_"


def _devkit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nuscenes-devkit")
    except PackageNotFoundError:
        return "unknown"


def index_key(config: DataConfig, split: str) -> IndexKey:
    """The key of the index a `NuScenesDetectionDataset` of `config` and `split` reads."""
    channels = tuple(config.camera_channels) if config.load_images else ()
    adjacent = config.adjacent_candidates
    infos_file = ""
    if config.infos:
        folder = Path(config.infos)
        if not folder.is_dir():
            raise DataError(f"{folder}: infos folder not found (data.infos / --infos); pass the folder that holds "
                            f"mmdet3d's nuscenes_infos_*.pkl, or leave it empty to index the devkit tables")
        infos_file = os.path.realpath(infos_path(folder, split))  # a missing file is a DataError naming it
    return IndexKey(dataroot=os.path.realpath(config.dataroot), version=config.version, split=split,
                    sweep_candidates=int(config.sweep_candidates), camera_channels=channels,
                    adjacent_count=int(adjacent), adjacent_interval=int(config.adjacent_interval) if adjacent else 1,
                    source="infos" if infos_file else "devkit", infos_file=infos_file, devkit=_devkit_version())


def source_files(key: IndexKey) -> list[dict]:
    """Identity of every file the index is built from: path, size, mtime_ns (tables sorted by name, then infos)."""
    paths = sorted((Path(key.dataroot) / key.version).glob("*.json"))
    if key.infos_file:
        paths.append(Path(key.infos_file))
    out = []
    for path in paths:
        info = path.stat()
        out.append({"path": str(path), "size": int(info.st_size), "mtime_ns": int(info.st_mtime_ns)})
    return out


def index_folders(config: DataConfig) -> list[Path]:
    """Folders searched for a saved index, in order; the first writable one receives a new one."""
    if config.index_dir:
        return [Path(config.index_dir).expanduser()]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return [Path(config.dataroot) / ".distillbev" / "index", cache_home / "distillbev" / "index"]


# ------------------------------------------------------------------------------------------------------ open
def open_split_index(config: DataConfig, split: str, *, nusc=None, progress: bool = True) -> SplitIndex:
    """The split index of `config` and `split`, mapped from its saved folder (built and saved first if needed).

    Built from the infos file when `config.infos` is set, else from the devkit tables (`nusc` when given, so a
    caller that already loaded the devkit does not load it twice). Arrays are read-only `np.memmap`s.
    """
    if config.infos:
        if not Path(config.dataroot).is_dir():
            raise DataError(f"{config.dataroot}: dataroot not found; pass the folder that holds {config.version}/, "
                            f"samples/ and sweeps/")
    else:
        check_dataroot(config.dataroot, config.version)
    key = index_key(config, split)
    sources = source_files(key)
    folders = index_folders(config)
    stale = ""  # why a saved index found on the way is not used
    for folder in folders:
        if not (folder / key.name).is_dir():
            continue
        with _lock(folder / f"{key.name}.lock", exclusive=False):
            index, why = _map_fresh(folder / key.name, key, sources, config.dataroot)
        if index is not None:
            return index
        stale = stale or f"the one saved in {folder} {why}"
    target = next((folder for folder in folders if _writable(folder)), None)
    if target is None:
        raise DataError(f"no writable folder for the split index of {split!r} (tried {', '.join(map(str, folders))}); "
                        f"set data.index_dir to a writable folder")
    path = target / key.name
    with _lock(target / f"{key.name}.lock", exclusive=True):
        index, why = _map_fresh(path, key, sources, config.dataroot)  # another process may have just built it
        if index is not None:
            return index
        reason = f"the one saved in {target} {why}" if why != NONE_SAVED else stale or NONE_SAVED
        source = f"infos file {key.infos_file}" if key.infos_file else "devkit tables"
        log.info("split index of %s: %s; building it from the %s into %s", split, reason, source, path)
        sources = source_files(key)  # as they are now, before the build reads them
        _remove_leftovers(target, key.name)
        start = time.perf_counter()
        built = _build(config, key, nusc, progress)
        SplitIndex.save(built, path, {"parameters": key.parameters(), "sources": sources})
        log.debug("split index of %s: %d samples, %.1f MB, built and saved in %.1f s", split, len(built),
                  built.nbytes / 2 ** 20, time.perf_counter() - start)
        del built
        index, why = _map_fresh(path, key, sources, config.dataroot)
    if index is None:
        raise DataError(f"{path}: the split index just saved {why}; a source file changed during the build, run "
                        f"again")
    return index


def _build(config: DataConfig, key: IndexKey, nusc, progress: bool) -> SplitIndex:
    """A fresh in-memory index of `key` from its source."""
    if key.source == "infos":
        return index_from_infos(key.infos_file, config.dataroot, config.version, key.split, key.sweep_candidates,
                                key.camera_channels, key.adjacent_count, key.adjacent_interval, progress=progress)
    if nusc is None:
        nusc = load_nuscenes(config.dataroot, config.version)
    return build_split_index(nusc, key.split, key.sweep_candidates, key.camera_channels, key.adjacent_count,
                             key.adjacent_interval, progress=progress)


def _map_fresh(path: Path, key: IndexKey, sources: list[dict], dataroot: str) -> tuple[SplitIndex | None, str]:
    """(the saved index at `path` mapped, "") when it is fresh, else (None, why it is not usable)."""
    if not (path / INDEX_HEADER).is_file():
        return None, NONE_SAVED
    try:
        metadata = read_index_header(path).get("metadata") or {}
    except DataError as exc:
        return None, f"is unreadable ({exc})"
    why = _differences(metadata, key, sources)
    if why:
        return None, why
    try:
        return SplitIndex.load(path, dataroot=str(dataroot)), ""
    except DataError as exc:
        return None, f"is damaged ({exc})"


def _differences(metadata: dict, key: IndexKey, sources: list[dict]) -> str:
    """Why a saved index's recorded parameters and sources are not `key`'s and `sources` ("" when equal)."""
    found = []
    recorded = metadata.get("parameters") or {}
    for name, value in key.parameters().items():
        if recorded.get(name) != value:
            found.append(f"{name} was {recorded.get(name)!r}, now {value!r}")
    before = {entry["path"]: entry for entry in metadata.get("sources") or []}
    now = {entry["path"]: entry for entry in sources}
    for path in sorted(before.keys() | now.keys()):
        name = Path(path).name
        if path not in now:
            found.append(f"{name} was removed")
        elif path not in before:
            found.append(f"{name} was added")
        elif before[path]["size"] != now[path]["size"]:
            found.append(f"{name} changed size ({before[path]['size']} -> {now[path]['size']} bytes)")
        elif before[path]["mtime_ns"] != now[path]["mtime_ns"]:
            found.append(f"{name} was modified (mtime_ns {before[path]['mtime_ns']} -> {now[path]['mtime_ns']})")
    if not found:
        return ""
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return "is stale: " + ", ".join(found[:3]) + more


# ------------------------------------------------------------------------------------------------ file system
def _writable(folder: Path) -> bool:
    """Whether an index can be written into `folder` (created if missing; a dataroot is never created)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _remove_leftovers(folder: Path, name: str) -> None:
    """Temporary folders of builds of `name` that died before their rename (call under the exclusive lock)."""
    for leftover in list(folder.glob(f".{name}.tmp-*")) + list(folder.glob(f".{name}.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold an fcntl lock on `path` (shared or exclusive). A shared lock on a read-only folder without a lock
    file is skipped: nobody can be writing an index there."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        if exclusive:
            raise
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the split index (lock %s)", path)
            fcntl.flock(descriptor, mode)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock
