"""Fixtures of the cache tests (the fakes themselves live in cache_fakes.py)."""

from __future__ import annotations

import pytest
from cache_fakes import FakeTeacher, chunk_files, make_manifest, run_extract


@pytest.fixture
def teacher() -> FakeTeacher:
    return FakeTeacher()


@pytest.fixture
def manifest(teacher) -> dict:
    return make_manifest(teacher)


@pytest.fixture
def reference(tmp_path, manifest) -> dict:
    """Chunk bytes of an uninterrupted one-thread extraction of `manifest` (what every resume and repair must equal)."""
    path = tmp_path / "reference.zarr"
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    return chunk_files(path)


@pytest.fixture
def complete(tmp_path, manifest):
    """A complete store of `manifest`, extracted by one process with one thread."""
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    return path
