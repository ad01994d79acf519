"""Fixtures of the inspect-cache tests (the store builders live in inspect_stores.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from inspect_stores import write_store

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny_nuscenes.py"


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "cache.zarr"
    write_store(path)
    return path


@pytest.fixture(scope="module")
def tiny_dataroot(tmp_path_factory):
    """The hand-made tiny nuScenes dataroot of tests/data (2 samples, one object of each class)."""
    if not TINY.is_file():
        pytest.skip("tests/data/tiny_nuscenes.py is not available")
    spec = importlib.util.spec_from_file_location("distillbev_inspect_tests_tiny_nuscenes", TINY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    root = tmp_path_factory.mktemp("tiny_nuscenes")
    result = module.build_tiny_nuscenes(root)
    return root, list(result.sample_tokens), module.VERSION
