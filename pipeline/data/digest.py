"""Content digests of the input files a sample's teacher points are built from, taken from the bytes as they are read.

The loader hashes every LiDAR file (and MVP virtual-point file) in the same pass that reads it, so the digest
describes exactly the bytes the teacher saw, at the cost of one SHA-256 over data already in memory (no second read
of the dataset):

    digests = InputDigests()
    points = load_lidar_points(index, i, config, rng=None, digests=digests)   # digests.paths, digests.digests

`extraction_input_files` lists the same files, in the same order, without reading them, so a later process can
re-hash them and compare (`train-student --verify-data`). A file's digest is the plain SHA-256 of its bytes: the
same value as `sha256sum FILE`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .virtual_points import virtual_path

DIGEST_BYTES = 32  # SHA-256
HASH_BLOCK = 1 << 22  # bytes per update when a file is hashed from disk


def bytes_digest(data) -> bytes:
    """SHA-256 of a bytes-like object (bytes, memoryview, a contiguous numpy array): 32 bytes."""
    return hashlib.sha256(data).digest()


def file_digest(path: str | Path) -> tuple[bytes, int]:
    """(SHA-256, size in bytes) of a file read from disk in blocks; OSError when it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.digest(), size


@dataclass
class InputDigests:
    """The files one sample's points were read from, in load order, with the SHA-256 of the bytes read.

    paths: as the loader opened them; digests: 32 bytes each; sizes: bytes read.
    """

    paths: list[str] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def add(self, path: str | Path, data) -> None:
        """Record one file from the bytes just read (`data`: any contiguous bytes-like object)."""
        view = memoryview(data)
        self.paths.append(str(path))
        self.digests.append(bytes_digest(view))
        self.sizes.append(view.nbytes)

    def rows(self, width: int) -> np.ndarray:
        """(width, 32) uint8: one row per file in load order, zero rows after the last (a sample with fewer
        sweeps reads fewer files); ValueError when more than `width` files were read."""
        if len(self.digests) > width:
            raise ValueError(f"{len(self.digests)} input files read, at most {width} expected")
        out = np.zeros((width, DIGEST_BYTES), dtype=np.uint8)
        for row, digest in enumerate(self.digests):
            out[row] = np.frombuffer(digest, dtype=np.uint8)
        return out


def files_per_sample(num_sweeps: int, virtual: bool) -> int:
    """The most input files one sample's teacher points read: the key frame and `num_sweeps` sweeps, each with its
    MVP virtual-point file when `virtual`."""
    return (1 + int(num_sweeps)) * (2 if virtual else 1)


def extraction_input_files(index, i: int, num_sweeps: int, virtual: bool) -> list[str]:
    """Sample i's input files in the order the test-mode loader reads them (`load_lidar_points(rng=None)`): key
    frame, then the nearest sweeps, each followed by its virtual-point file when `virtual`.

    `index` is a `SplitIndex` holding at least `num_sweeps` sweep candidates (ValueError otherwise).
    """
    if index.sweeps.files.shape[1] < num_sweeps:
        raise ValueError(f"the index holds {index.sweeps.files.shape[1]} sweep candidates, the teacher read "
                         f"{num_sweeps}")
    records = [index.path(index.lidar, i)]
    records += [index.path(index.sweeps, i, j) for j in range(min(int(index.sweep_counts[i]), num_sweeps))]
    return with_virtual_files(records, virtual)


def with_virtual_files(lidar_paths: list[str], virtual: bool) -> list[str]:
    """LiDAR file paths, each followed by its MVP virtual-point file when `virtual` (the loader's read order)."""
    if not virtual:
        return list(lidar_paths)
    return [path for lidar in lidar_paths for path in (lidar, str(virtual_path(lidar)))]


def digest_hex(row: np.ndarray | bytes) -> str:
    """A stored digest row (32 uint8) or 32 bytes as 64 hex characters."""
    return (row if isinstance(row, bytes) else np.asarray(row, dtype=np.uint8).tobytes()).hex()
