"""Fixtures of the inspect-cache tests (the store builders live in inspect_stores.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inspect_stores import write_store

@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "cache.zarr"
    write_store(path)
    return path


@pytest.fixture(scope="module")
def tiny_dataroot(tiny_slice, tiny):
    """The hand-made tiny nuScenes dataroot of tests/data (2 samples, one object of each class)."""
    return tiny_slice.dataroot, list(tiny_slice.sample_tokens), tiny.VERSION
