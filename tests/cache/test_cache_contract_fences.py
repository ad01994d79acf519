"""Fences of the cache contract that must hold when storage misbehaves: the local lock follows its file (a deleted or
replaced `distillbev.lock` is a lost lock), only real damage counts as damage (a transient read error neither
repairs nor bumps the generation), an unparseable lease is an error rather than an expiry, and `fsync_dir` raises
what it cannot ignore."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zarr
from cache_fakes import chunk_files, load_points, run_extract

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache import checks, durable, store
from distillbev.pipeline.cache.lease import LeaseLock
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.store import StoreLock
from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.errors import CacheError


def inode(path_or_fd: Path | int) -> tuple[int, int]:
    found = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return found.st_dev, found.st_ino


def attributes(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs)


# -------------------------------------------------------------------------------------- the lock follows its file
def test_a_deleted_lock_file_is_a_lost_lock_and_the_next_writer_locks_a_new_file(tmp_path):
    first = StoreLock(tmp_path / "cache.zarr", command="first").acquire()
    second = None
    try:
        assert first.still_held()
        (tmp_path / "cache.zarr" / v2.LOCK_FILE).unlink()  # a cleanup script, rsync --delete
        assert not first.still_held()  # the first writer stops before its next write
        second = StoreLock(tmp_path / "cache.zarr", command="second").acquire()
        assert second.still_held() and not first.still_held()  # never two writers that both believe they write
        assert json.loads((tmp_path / "cache.zarr" / v2.LOCK_FILE).read_text())["command"] == "second"
    finally:
        first.release()
        if second is not None:
            assert second.still_held()  # the first one's release leaves the new file's lock alone
            second.release()


def test_a_replaced_lock_file_is_a_lost_lock(tmp_path):
    folder = tmp_path / "cache.zarr"
    with StoreLock(folder, command="first") as lock:
        (tmp_path / "other.lock").write_text("{}")
        os.replace(tmp_path / "other.lock", folder / v2.LOCK_FILE)
        assert not lock.still_held()


def test_a_lock_file_swapped_between_open_and_flock_is_locked_again(tmp_path, monkeypatch):
    folder = tmp_path / "cache.zarr"
    real_flock = store.fcntl.flock
    swaps = []

    def flock_then_swap(fd, operation):
        real_flock(fd, operation)
        if operation & store.fcntl.LOCK_EX and not swaps:  # another process replaced the file meanwhile
            (folder / v2.LOCK_FILE).unlink()
            (folder / v2.LOCK_FILE).write_text("{}")
            swaps.append(inode(folder / v2.LOCK_FILE))

    fake_fcntl = SimpleNamespace(flock=flock_then_swap, LOCK_EX=store.fcntl.LOCK_EX, LOCK_NB=store.fcntl.LOCK_NB,
                                 LOCK_UN=store.fcntl.LOCK_UN)
    monkeypatch.setattr(store, "fcntl", fake_fcntl)
    with StoreLock(folder, command="writer") as lock:
        assert len(swaps) == 1
        assert inode(lock._fd) == inode(folder / v2.LOCK_FILE) == swaps[0]  # the lock is on the file in place
        assert lock.still_held()
        assert json.loads((folder / v2.LOCK_FILE).read_text())["command"] == "writer"


def test_an_extraction_whose_lock_file_is_deleted_stops_and_the_next_run_finishes(tmp_path, manifest):
    path = tmp_path / "cache.zarr"
    loads = []

    def delete_the_lock_at_the_fifth_load(index, bev_aug):
        loads.append(index)
        if len(loads) == 5:
            (path / v2.LOCK_FILE).unlink()
        return load_points(index, bev_aug)

    with pytest.raises(CacheError, match="lost its lock"):
        run_extract(path, manifest, points=delete_the_lock_at_the_fifth_load, workers=1, threads_per_worker=1,
                    background_writer=False)
    assert int(read_done(path).sum()) == 4  # the sample-view loaded after the deletion was not written
    assert attributes(path)["status"] == v2.STATUS_WRITING
    reference = tmp_path / "reference.zarr"
    run_extract(reference, manifest, workers=1, threads_per_worker=1)
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert report.state == "resumed" and report.written == 15 - 4
    assert chunk_files(path) == chunk_files(reference)


# ------------------------------------------------------------------------- only damage counts as damage
def test_a_transient_read_error_of_a_static_array_leaves_a_complete_store_untouched(complete, manifest,
                                                                                    monkeypatch):
    before = attributes(complete)
    files = chunk_files(complete)
    real_read = checks.single_chunk_bytes
    failures = []

    def fails_once(array):
        if not failures:
            failures.append(array.path)
            raise OSError(errno.EIO, "Input/output error (a transient storage error)")
        return real_read(array)

    monkeypatch.setattr(checks, "RETRY_SECONDS", 0.0, raising=False)
    monkeypatch.setattr(checks, "single_chunk_bytes", fails_once)
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert failures and report.state == "complete" and report.written == 0
    after = attributes(complete)
    assert (after["generation"], after["status"]) == (before["generation"], v2.STATUS_COMPLETE)
    assert chunk_files(complete) == files


def test_a_lasting_read_error_fails_naming_the_store_and_array_without_a_new_generation(complete, manifest,
                                                                                       monkeypatch):
    before = attributes(complete)
    calls = []

    def always_fails(array):
        calls.append(array.path)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checks, "RETRY_SECONDS", 0.0, raising=False)
    monkeypatch.setattr(checks, "single_chunk_bytes", always_fails)
    with pytest.raises(CacheError) as error:
        run_extract(complete, manifest, workers=1, threads_per_worker=1)
    message = str(error.value)
    assert str(complete) in message and f"array {v2.VIEWS}" in message and "Input/output error" in message
    assert len(calls) == getattr(checks, "READ_ATTEMPTS", None)  # retried, then given up on the first array
    assert attributes(complete) == before


def test_a_corrupt_static_chunk_is_still_damage_and_is_rewritten(complete, manifest):
    reference = chunk_files(complete)
    generation = attributes(complete)["generation"]
    tokens = complete / v2.SAMPLE_TOKENS / "c" / "0"
    data = bytearray(tokens.read_bytes())
    data[2] ^= 0x01
    tokens.write_bytes(bytes(data))
    assert run_extract(complete, manifest, workers=1, threads_per_worker=1).state == "complete"
    assert chunk_files(complete) == reference and attributes(complete)["generation"] != generation


# -------------------------------------------------------------------------- an unparseable lease is an error
@pytest.mark.parametrize("raw", [b"{garbage", b"[1, 2]", b'{"owner": "x"}', b'{"owner": "x", "expires_at": "soon"}',
                                 b""])
def test_parse_lease_refuses_what_is_not_a_lease(raw):
    from distillbev.pipeline.cache.lease import parse_lease

    with pytest.raises(CacheError) as error:
        parse_lease(raw, "s3://feats/cache.zarr/distillbev.lock")
    message = str(error.value)
    assert message.startswith("s3://feats/cache.zarr/distillbev.lock: ")
    assert "delete" in message and "no extraction" in message


def test_parse_lease_reads_a_lease():
    from distillbev.pipeline.cache.lease import parse_lease

    lease = {"owner": "abc", "host": "h", "pid": 3, "expires_at": 12.5, "command": "c"}
    assert parse_lease(json.dumps(lease).encode(), "where") == lease


def test_a_garbage_lease_object_is_refused_not_taken_over():
    location = StoreLocation.parse(f"memory://fences/{time.monotonic_ns()}/cache.zarr")
    location.put(v2.LOCK_FILE, b"{garbage")
    with pytest.raises(CacheError) as error:
        LeaseLock(location, command="second", ttl=2.0).acquire()
    assert f"{location}/{v2.LOCK_FILE}" in str(error.value) and "delete it by hand" in str(error.value)
    assert location.get(v2.LOCK_FILE) == b"{garbage"  # left for a person to look at


def test_an_expired_lease_is_still_taken_over():
    location = StoreLocation.parse(f"memory://fences/{time.monotonic_ns()}/cache.zarr")
    stale = {"owner": "dead", "pid": 1, "host": "h", "since": "then", "expires_at": time.time() - 10}
    location.put(v2.LOCK_FILE, json.dumps(stale).encode())
    lock = LeaseLock(location, command="next", ttl=60.0).acquire()
    try:
        assert lock.still_held() and json.loads(location.get(v2.LOCK_FILE))["owner"] == lock.owner
    finally:
        lock.release()


@pytest.mark.slow
def test_a_garbage_lease_on_s3_is_refused(s3_env):
    location = StoreLocation.parse(s3_env.url("garbage-lease.zarr"))
    location.put(v2.LOCK_FILE, b"not json")
    with pytest.raises(CacheError, match=r"distillbev.lock: .*delete it by hand"):
        LeaseLock(location, command="second", ttl=2.0).acquire()
    assert location.get(v2.LOCK_FILE) == b"not json"


# ------------------------------------------------------------------------------ fsync_dir raises what it must
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_fsync_dir_raises_a_real_error(tmp_path, monkeypatch, code):
    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(durable.os, "fsync", failing_fsync)
    with pytest.raises(OSError) as error:
        durable.fsync_dir(tmp_path)
    assert error.value.errno == code


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_fsync_dir_ignores_a_file_system_that_cannot_fsync_a_folder(tmp_path, monkeypatch, code):
    calls = []

    def refusing_fsync(fd):
        calls.append(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(durable.os, "fsync", refusing_fsync)
    assert durable.fsync_dir(tmp_path) is None and len(calls) == 1


def test_an_eio_from_a_folder_fsync_fails_the_status_write(complete, monkeypatch):
    from distillbev.pipeline.cache.writer import set_status

    real_fsync = durable.os.fsync

    def folders_fail(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", folders_fail)
    with pytest.raises(CacheError, match=r"cannot write the teacher cache \(OSError: Input/output error\)"):
        set_status(StoreLocation.parse(complete), v2.STATUS_COMPLETE)
