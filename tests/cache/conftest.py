"""Fixtures of the cache tests (the fakes themselves live in cache_fakes.py)."""

from __future__ import annotations

import pytest
from cache_fakes import FakeTeacher, make_manifest


@pytest.fixture
def teacher() -> FakeTeacher:
    return FakeTeacher()


@pytest.fixture
def manifest(teacher) -> dict:
    return make_manifest(teacher)
