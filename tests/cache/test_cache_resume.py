"""Resumable extraction: after a crash at any point, rerunning gives the same chunk bytes as one clean run."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import zarr
from cache_fakes import chunk_files, extract_slowly, load_points, make_manifest, run_extract

from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.errors import CacheError


def test_worker_killed_by_sigkill_then_resumed(tmp_path, manifest, reference):
    parent = os.getpid()

    def killing_points(index, bev_aug):
        if index == 4 and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return load_points(index, bev_aug)

    path = tmp_path / "cache.zarr"
    with pytest.raises(CacheError, match=r"worker 1 .* died with exit code -9"):
        # samples 0-2 go to worker 0, 3-4 to worker 1, which dies on sample 4 after writing sample 3
        run_extract(path, manifest, points=killing_points, workers=2, threads_per_worker=1, background_writer=False)
    assert zarr.open_group(str(path), mode="r").attrs["status"] == "writing"
    assert read_done(path)[3].all() and not read_done(path)[4].any()
    with pytest.raises(CacheError, match="partial"):
        TeacherCache.open(path)
    report = run_extract(path, manifest, workers=2, threads_per_worker=1)
    assert report.state == "resumed" and report.skipped >= 3 and report.written == 15 - report.skipped
    assert chunk_files(path) == reference


def test_whole_run_killed_mid_write_then_resumed(tmp_path, manifest, reference):
    path = tmp_path / "cache.zarr"
    process = multiprocessing.get_context("fork").Process(target=extract_slowly, args=(path, manifest))
    process.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (path / "done" / "zarr.json").exists() and read_done(path).sum() >= 4:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    done_before = int(read_done(path).sum())
    assert 4 <= done_before < 15
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert report.skipped == done_before
    assert chunk_files(path) == reference


def test_error_after_some_samples_then_resumed(tmp_path, manifest, reference):
    def failing_points(index, bev_aug):
        if index == 2:
            raise RuntimeError("sensor file vanished")
        return load_points(index, bev_aug)

    path = tmp_path / "cache.zarr"
    with pytest.raises(RuntimeError, match="vanished"):
        run_extract(path, manifest, points=failing_points, workers=1, threads_per_worker=1)
    assert read_done(path).sum() == 6  # samples 0 and 1, three views each
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert (report.skipped, report.written) == (6, 9)
    assert chunk_files(path) == reference


def test_torn_chunk_of_undone_view_is_rewritten(tmp_path, manifest, reference):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["status"] = "writing"
    group["done"][2, 1] = 0
    chunk = path / "features" / "neck" / "c" / "2" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])  # a torn chunk, as a crash mid-write on another store could leave
    (chunk.parent / "0.1234.partial").write_bytes(b"stray")  # what zarr's atomic write leaves when killed
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert (report.state, report.written, report.skipped) == ("resumed", 1, 14)
    assert chunk_files(path) == reference


def test_complete_store_is_left_alone(tmp_path, manifest):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest)

    def stamps():  # every file but the writer lock, which each run takes
        return {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and p.name != "distillbev.lock"}

    before = stamps()
    moved = dict(manifest, teacher=dict(manifest["teacher"], checkpoint_path="/elsewhere/fake.pth"),
                 created_at="2030-01-01T00:00:00+00:00", generation="0" * 32)  # moved file, later run
    report = run_extract(path, moved)
    assert (report.state, report.status, report.written, report.checked) == ("complete", "complete", 0, "quick")
    assert stamps() == before


def test_incompatible_store_refused_with_diff_then_overwritten(tmp_path, teacher, manifest):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest)
    other = make_manifest(teacher, dtype="int8", sha="b" * 64)
    with pytest.raises(CacheError) as error:
        run_extract(path, other)
    message = str(error.value)
    assert f'teacher.checkpoint_sha256: "{"a" * 64}" -> "{"b" * 64}"' in message
    assert 'storage.dtype: "fp16" -> "int8"' in message and "--overwrite" in message
    assert "created_at" not in message
    assert TeacherCache.open(path).manifest["storage"]["dtype"] == "fp16"  # untouched
    report = run_extract(path, other, overwrite=True)
    assert report.state == "created"
    cache = TeacherCache.open(path)
    assert cache.manifest["teacher"]["checkpoint_sha256"] == "b" * 64
    assert np.issubdtype(zarr.open_group(str(path), mode="r")["features/neck"].dtype, np.int8)


def test_partial_store_with_other_views_refused(tmp_path, teacher, manifest):
    def failing_points(index, bev_aug):
        if index == 1:
            raise RuntimeError("stop")
        return load_points(index, bev_aug)

    path = tmp_path / "cache.zarr"
    with pytest.raises(RuntimeError):
        run_extract(path, manifest, points=failing_points)
    with pytest.raises(CacheError, match=r"views.count: 3 -> 2"):
        run_extract(path, make_manifest(teacher, views=2))
