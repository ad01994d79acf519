"""Durable local writes: a file written through a temporary file, fsync'ed and renamed into place, and the folder
fsync'ed so the new name survives a power cut."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Errors of a file system that cannot fsync a folder (some network and FUSE mounts): names are then as durable as
# that file system makes them. Any other error (EIO above all) means a write may be lost, and is raised.
FOLDER_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def fsync_dir(path: Path) -> None:
    """Make the names in a folder durable (new files, renames); OSError unless the file system merely cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in FOLDER_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in FOLDER_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file, fsync it, rename it into place and fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
