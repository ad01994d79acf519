"""The store's place: what may be written or deleted there, the marker, the writer lock and durable writes.

    kind = classify_store(location)           # "absent", "empty", "ours", "legacy", "foreign", "file", ...
    with writer_lock(location, command="distillbev extract-teacher ..."):
        write_marker(location)
        ...

Rules (see docs/cache.md):
- only a folder that carries this tool's marker (`distillbev_cache.json`, written before anything else) or an
  older store with a distillbev manifest counts as a teacher cache: only such a folder is ever cleared;
- one writer at a time: `StoreLock` holds an exclusive `flock` on `distillbev.lock` inside the store for the
  whole extraction. The kernel releases it when its holder dies, however it dies, so a lock left by a killed run
  is taken over without ceremony; the file names the holder (host, pid, start time, command) for the error a
  second writer gets. Forked extraction workers share the lock and die with their parent. On an object store,
  where there is no flock, the lock is a lease (`lease.py`): an object naming its holder and an expiry that the
  holder renews; a killed holder's lease is taken over once it has expired.
- durability: local files are fsync'ed (and their folders) before a marker that vouches for them; an object
  store's PUT is durable when it returns, so the fsync helpers do nothing there.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Literal

from ...cache_schemas import v2
from ..errors import CacheError
from .durable import fsync_dir, fsync_file
from .lease import LeaseLock
from .location import StoreLocation, redact_command, remote_error

logger = logging.getLogger(__name__)

PathKind = Literal["absent", "empty", "ours", "legacy", "foreign", "file", "dangling-link", "not-a-folder"]
_OWN_FILES = (v2.LOCK_FILE, v2.MARKER_FILE)


def classify_store_path(path: Path) -> PathKind:
    """What is at `path`, from the point of view of a teacher-cache writer.

    absent: nothing there; empty: a folder with nothing but (possibly) this tool's lock file; ours: a folder with
    this tool's marker; legacy: a zarr group whose attributes hold a distillbev manifest but no marker (stores of
    schema 1); foreign: any other non-empty folder; file / dangling-link / not-a-folder: refused outright.
    """
    if path.is_symlink() and not path.exists():
        return "dangling-link"
    if not path.exists():
        return "absent"
    if path.is_file():
        return "file"
    if not path.is_dir():
        return "not-a-folder"
    if (path / v2.MARKER_FILE).is_file():
        return "ours"
    entries = [p.name for p in path.iterdir()]
    if not entries or entries == [v2.LOCK_FILE]:
        return "empty"
    if _has_distillbev_manifest(path):
        return "legacy"
    return "foreign"


def classify_store(location: StoreLocation) -> PathKind:
    """`classify_store_path` for any location; on an object store a prefix with no keys is "absent"."""
    if location.is_local:
        return classify_store_path(location.path)
    try:
        entries = location.entries()
    except Exception as exc:
        raise remote_error(location, exc, "list") from exc
    if not entries:
        return "absent"
    if v2.MARKER_FILE in entries:
        return "ours"
    if entries == [v2.LOCK_FILE]:
        return "empty"
    if "zarr.json" in entries and _is_distillbev_metadata(location.get("zarr.json")):
        return "legacy"
    return "foreign"


def _has_distillbev_manifest(path: Path) -> bool:
    try:
        return _is_distillbev_metadata((path / "zarr.json").read_bytes())
    except OSError:
        return False


def _is_distillbev_metadata(raw: bytes | None) -> bool:
    try:
        metadata = json.loads(raw or b"null")
    except ValueError:
        return False
    attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
    return isinstance(attributes, dict) and "schema_version" in attributes and "teacher" in attributes


def refuse_unusable(path: Path | StoreLocation, kind: PathKind) -> None:
    """A one-line CacheError for a --cache path that cannot hold a store; returns for usable ones."""
    hint = "pass a new folder (it is created) or an existing teacher cache as --cache"
    if isinstance(path, StoreLocation) and path.is_local:
        path = path.path
    if kind == "file":
        raise CacheError(f"{path}: is a file, not a teacher cache folder; {hint}")
    if kind == "dangling-link":
        raise CacheError(f"{path}: is a symbolic link to {os.readlink(path)!r}, which does not exist; create the "
                         f"target folder or {hint}")
    if kind == "not-a-folder":
        raise CacheError(f"{path}: is not a folder; {hint}")
    if kind == "foreign":
        raise CacheError(f"{path}: exists and is not a teacher cache written by distillbev (no "
                         f"{v2.MARKER_FILE}); nothing was changed or deleted there, even with --overwrite; {hint}")


def write_marker(location: StoreLocation) -> None:
    """Mark the store as this tool's (first thing written into a new store; fsync'ed on a local disk)."""
    marker = {"format": v2.MARKER_FORMAT, "schema_version": v2.SCHEMA_VERSION,
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    location.put(v2.MARKER_FILE, json.dumps(marker, indent=1).encode())


def clear_store(location: StoreLocation) -> int:
    """Delete everything in a store except the lock; returns the number of entries (local) or keys removed.

    The marker goes last (and the caller writes it again first), so a store cleared halfway still counts as ours.
    """
    if not location.is_local:
        keys = [key for key in location.keys() if key not in _OWN_FILES]
        for key in keys:
            location.delete(key)
        location.delete(v2.MARKER_FILE)
        return len(keys)
    path = location.path
    entries = sorted((p for p in path.iterdir() if p.name not in _OWN_FILES), key=lambda p: p.name)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (path / v2.MARKER_FILE).unlink(missing_ok=True)
    return len(entries)


def storage_error(path: Path | str | StoreLocation, exc: OSError) -> CacheError:
    """A one-line CacheError for a failed write under `path`."""
    if exc.errno == errno.ENOSPC:
        hint = "free disk space (or pass another --cache path) and rerun the same command to resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the directory writable or pass another --cache path"
    else:
        hint = "check that the path is a writable directory on a local disk, or pass another --cache path"
    return CacheError(f"{path}: cannot write the teacher cache ({exc.__class__.__name__}: "
                      f"{exc.strerror or exc}); {hint}")


# -------------------------------------------------------------------------------------------------- durability
def fsync_keys(location: StoreLocation, keys: list[str], folders: bool = False) -> None:
    """fsync the files of `keys` in a local store, and with `folders` their folders (a rename is durable only then);
    an object store's writes are durable already."""
    if location.is_local:
        for key in keys:
            fsync_file(location.path / key)
        for folder in sorted({(location.path / key).parent for key in keys}) if folders else ():
            fsync_dir(folder)


def fsync_store(location: StoreLocation, names: list[str] | None = None) -> None:
    """fsync every file and folder of a local store, or of its arrays named in `names` (no-op on object stores)."""
    if not location.is_local:
        return
    path = location.path
    roots = [path] if names is None else [path / name for name in names]
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                if name != v2.LOCK_FILE:
                    fsync_file(Path(folder) / name)
            fsync_dir(Path(folder))
    fsync_dir(path)


# ----------------------------------------------------------------------------------------------------- the lock
def writer_lock(location: StoreLocation, command: str = "") -> "StoreLock | Any":
    """The writer lock of a store: an flock on a local disk, a lease on an object store."""
    if location.is_local:
        return StoreLock(location.path, command=command)
    return LeaseLock(location, command=command)


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a live holder from a reused pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


LOCK_ATTEMPTS = 5  # opens of the lock file when it keeps being replaced between open and flock


class StoreLock:
    """An exclusive writer lock on a store folder (context manager; `acquire` / `release` also work).

    CacheError when another live process holds it, naming that process and what it runs. An flock belongs to an
    open file, not to a name: once `distillbev.lock` is deleted or replaced (a cleanup script, `rsync --delete`),
    the next writer creates and locks a new file beside the old lock. So the lock counts as held only while the
    held descriptor is still the file at the lock's path (same device and inode), checked when it is taken and by
    `still_held`, which the writer asks before every sample-view: the first writer stops, the second one writes.
    """

    def __init__(self, path: Path | StoreLocation, command: str = "") -> None:
        self.path = path.path if isinstance(path, StoreLocation) else Path(path)
        self.lock_path = self.path / v2.LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self._lost_logged = False

    def _is_locked_file(self, fd: int) -> bool:
        """Whether `fd` is the file now at the lock's path (False when the path is gone or names another file)."""
        held = os.fstat(fd)
        try:
            current = os.stat(self.lock_path)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)

    def acquire(self) -> "StoreLock":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(self.path, exc) from exc
        for _ in range(LOCK_ATTEMPTS):
            fd = self._open_and_lock()
            try:
                if self._is_locked_file(fd):
                    break
            except OSError as exc:
                os.close(fd)
                raise storage_error(self.path, exc) from exc
            os.close(fd)  # the file was deleted or replaced after it was opened: lock the one there now
        else:
            raise CacheError(f"{self.lock_path}: the lock file was deleted or replaced {LOCK_ATTEMPTS} times while "
                             f"this extraction was taking it; stop whatever removes files in {self.path} (a cleanup "
                             f"script, rsync --delete) and rerun this command")
        previous = self.holder()
        if previous and previous.get("pid") and not self._same_process(previous):
            logger.info("%s: taking over the lock of a finished or killed run (pid %s on %s, started %s)",
                        self.path, previous.get("pid"), previous.get("host"), previous.get("since"))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start_time(os.getpid()),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": redact_command(self.command)}  # the lock file holds no credential
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        self._lost_logged = False
        return self

    def _open_and_lock(self) -> int:
        """A descriptor of the lock file (created if absent) holding its exclusive flock."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(self.path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CacheError(f"{self.path}: another extraction is writing this store ({self.describe_holder()}); "
                                 f"wait for it to finish, or stop it and rerun this command") from None
            raise CacheError(f"{self.lock_path}: cannot lock ({exc.strerror or exc}); the file system may not "
                             f"support flock: put the cache on a local disk") from exc
        return fd

    def _same_process(self, info: dict[str, Any]) -> bool:
        return info.get("host") == socket.gethostname() and info.get("pid") == os.getpid()

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says about its (last) holder."""
        try:
            data = json.loads(self.lock_path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def describe_holder(self) -> str:
        info = self.holder()
        if not info:
            return "holder unknown"
        # a lock file written by an older version may hold credentials in its command: never shown
        command = f", running `{redact_command(str(info['command']))}`" if info.get("command") else ""
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}{command}"

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def still_held(self) -> bool:
        """Whether this process still holds the lock: taken, and the lock's path still names the locked file (an
        flock is not lost while its holder lives, but a deleted or replaced lock file lets another writer in)."""
        if self._fd is None:
            return False
        try:
            same = self._is_locked_file(self._fd)
        except OSError as exc:
            same, why = False, f"cannot check the lock file ({exc.strerror or exc})"
        else:
            why = "the lock file was deleted or replaced (another extraction may be writing now)"
        if not same and not self._lost_logged:
            logger.error("%s: lost the writer lock: %s; this process stops writing", self.lock_path, why)
            self._lost_logged = True
        return same

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
