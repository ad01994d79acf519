"""A tiny synthetic world (3 train and 3 val key frames, a random teacher and its 2-view cache) and two students
trained on it for 3 epochs, evaluating every 2 epochs and taking attention snapshots of 2 train samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from figures_world import World, build_world, one_thread, student_config


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("figures_world"))


@pytest.fixture(scope="session")
def trained_runs(world) -> dict[str, Path]:
    """{"baseline": RUN, "distilled": RUN} (run directory names bevdet_baseline, bevdet_distilled)."""
    from distillbev.pipeline.distill.run import train_student

    runs = {}
    with one_thread():
        for kind in ("baseline", "distilled"):
            runs[kind] = world.folder / "runs" / f"bevdet_{kind}"
            train_student(student_config(world, kind == "distilled"), runs[kind],
                          cache_path=world.cache_path if kind == "distilled" else None)
    return runs
