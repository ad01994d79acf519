"""Fixtures shared by every test area: the hand-made tiny nuScenes dataroot (tests/data/tiny_nuscenes.py) and a
real S3 server on 127.0.0.1 (tests/s3_server.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from module_loader import load_tests_module


def _load_tiny_module():
    return load_tests_module("data/tiny_nuscenes.py")


@pytest.fixture(scope="session")
def tiny():
    """The tiny_nuscenes module (constants and the builder)."""
    return _load_tiny_module()


@pytest.fixture(scope="session")
def tiny_slice(tmp_path_factory, tiny):
    """A read-only tiny dataroot shared by the session (do not modify it; use `tiny_slice_copy`)."""
    return tiny.build_tiny_nuscenes(tmp_path_factory.mktemp("tiny") / "nuscenes")


@pytest.fixture
def tiny_slice_copy(tmp_path, tiny_slice):
    """A private copy of the tiny dataroot that a test may break."""
    root = tmp_path / "nuscenes"
    shutil.copytree(tiny_slice.dataroot, root)
    copy = type(tiny_slice)(dataroot=root, version=tiny_slice.version, sample_tokens=list(tiny_slice.sample_tokens))
    copy.lidar_files = {k: root / p.relative_to(tiny_slice.dataroot) for k, p in tiny_slice.lidar_files.items()}
    copy.key_lidar_files = [root / p.relative_to(tiny_slice.dataroot) for p in tiny_slice.key_lidar_files]
    copy.camera_files = [root / p.relative_to(tiny_slice.dataroot) for p in tiny_slice.camera_files]
    return copy


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for one test module (bucket "feats"); stopped after it, so an idle
    server does not take CPU from the rest of the suite."""
    sys.path.insert(0, str(Path(__file__).parent))
    from s3_server import SeaweedS3

    with SeaweedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS environment of the test S3 server (credentials, endpoint, region) set for one test."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
