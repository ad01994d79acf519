"""The lease fences its holder: a writer whose lease is lost, or whose monotonic deadline has passed (a process paused
past its ttl), writes no chunk, no done marker and no status.

The SIGSTOP test runs on the loopback S3 server (SeaweedFS, tests/s3_server.py); the others on zarr's in-memory
fsspec store or a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from cache_fakes import FakeTeacher, head_state, load_points, run_extract, slow_extraction_script, token_of

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache import lease, writer
from distillbev.pipeline.cache.extract import records_from_outputs
from distillbev.pipeline.cache.lease import LeaseLock
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.state import read_done, read_manifest
from distillbev.pipeline.cache.writer import SampleViewWriter, finalize_store, prepare_store, set_done, set_status
from distillbev.pipeline.errors import CacheError
from distillbev.pipeline.geometry.bev import BEVAugmentation

TOKENS = [token_of(i) for i in range(5)]
LOST = "lost its lock or lease"


class Clock:
    """A stand-in for `lease.monotonic` that moves only when a test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(lease, "monotonic", fake)
    return fake


def memory_location() -> StoreLocation:
    """A fresh store on fsspec's in-memory file system: a lease without a server (renewed by the owner check)."""
    return StoreLocation.parse(f"memory://leases/{uuid.uuid4().hex}.zarr")


def lease_object(location: StoreLocation) -> dict:
    return json.loads(location.get(v2.LOCK_FILE))


def store_objects(location: StoreLocation) -> dict[str, bytes]:
    """Every key of a store but its lock -> its bytes (chunks, done markers, metadata with the status)."""
    return {key: location.get(key) for key in location.keys() if key != v2.LOCK_FILE}


@pytest.mark.slow
def test_a_writer_paused_past_its_lease_writes_nothing_after_another_takes_it(s3_env):
    url = s3_env.url("paused.zarr")
    location = StoreLocation.parse(url)
    env = {**os.environ, **s3_env.env(), "DISTILLBEV_LEASE_SECONDS": "2"}
    # 0.5 s per sample-view: a done marker is followed by ~0.5 s without requests, in which the writer is stopped
    process = subprocess.Popen([sys.executable, "-c", slow_extraction_script(url, seconds=0.5, workers=1)], env=env,
                               stderr=subprocess.PIPE, text=True)
    taker = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if location.get("done/zarr.json") is not None and read_done(location).sum() >= 2:
                break
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        lease = json.loads(location.get(v2.LOCK_FILE))
        assert lease["pid"] == process.pid
        time.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.1)
        taker = LeaseLock(location, command="taker", ttl=60).acquire()  # the paused writer's lease has expired
        taken = store_objects(location)
        time.sleep(max(0.0, stopped + 3.0 - time.monotonic()))
        os.kill(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=60)
        after = store_objects(location)
        changed = sorted(key for key in set(taken) | set(after) if taken.get(key) != after.get(key))
        assert changed == []  # no chunk, marker or metadata written or changed after the takeover
        assert process.returncode != 0, stderr
        assert "lost the writer lease" in stderr and LOST in stderr, stderr
        assert 2 <= int(read_done(location).sum()) < 15
        assert json.loads(location.get(v2.LOCK_FILE))["owner"] == taker.owner  # the writer left the new lease alone
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()
        if taker is not None:
            taker.release()


# ------------------------------------------------------------------------------------ the monotonic deadline
def test_the_deadline_counts_from_the_clock_read_before_the_request(clock, monkeypatch):
    location = memory_location()
    create = lease._Objects.create

    def slow_create(objects, data):
        clock.now += 10.0  # the creating request takes 10 s
        return create(objects, data)

    monkeypatch.setattr(lease._Objects, "create", slow_create)
    lock = LeaseLock(location, command="writer", ttl=100.0).acquire()  # renews every 25 s (real time): not here
    try:
        assert lock.margin == 25.0  # ttl / 4
        clock.now = 1074.9  # started at 1000: held until 1000 + 100 - 25, not 1010 + 75
        assert lock.still_held()
        clock.now = 1075.0
        assert not lock.still_held()
        written = location.get(v2.LOCK_FILE)
        assert not lock.confirm() and not lock._renew()  # past its deadline a lease is never renewed again
        assert location.get(v2.LOCK_FILE) == written
    finally:
        lock.release()
    assert lease_object(location)["owner"] == lock.owner  # left to expire: by now it may be another's


def test_a_paused_holder_finds_its_lease_lost_whatever_the_renew_thread_did(clock, caplog):
    lock = LeaseLock(memory_location(), command="writer", ttl=8.0).acquire()
    try:
        clock.now += 5.9  # deadline 1000 + 8 - 2
        assert lock.still_held()
        clock.now += 0.1  # a SIGSTOP: no renewal ran, and none has declared the lease lost
        with caplog.at_level(logging.ERROR, logger="distillbev.pipeline.cache.lease"):
            assert not lock.still_held() and not lock.still_held()
        lost = [r.getMessage() for r in caplog.records if "lost the writer lease" in r.getMessage()]
        assert len(lost) == 1 and "no renewal succeeded in the 6.0 s after the last one (6.0 s ago" in lost[0]
    finally:
        lock.release()


def test_confirm_renews_the_lease_and_moves_the_deadline(clock):
    location = memory_location()
    lock = LeaseLock(location, command="writer", ttl=100.0).acquire()
    try:
        first = lease_object(location)["expires_at"]
        clock.now = 1050.0
        assert lock.confirm()  # a renewal that started at 1050: held until 1125
        assert lease_object(location)["expires_at"] > first
        clock.now = 1124.9
        assert lock.still_held()
        clock.now = 1125.0
        assert not lock.still_held()
    finally:
        lock.release()


def test_confirm_is_false_once_another_process_holds_the_lease(clock):
    location = memory_location()
    lock = LeaseLock(location, command="writer", ttl=100.0).acquire()
    try:
        thief = {"owner": "thief", "pid": 2, "host": "other", "expires_at": time.time() + 60}
        location.put(v2.LOCK_FILE, json.dumps(thief).encode())
        assert lock.still_held()  # the clock alone cannot tell: the deadline is 75 s away
        assert not lock.confirm() and not lock.still_held()
    finally:
        lock.release()
    assert lease_object(location)["owner"] == "thief"


# ------------------------------------------------------------------------------ writes refused under a lost lock
@pytest.fixture
def prepared(tmp_path, manifest):
    path = StoreLocation.parse(tmp_path / "cache.zarr")
    prepare_store(path, manifest, TOKENS, head_state())
    return path


def store_files(path: StoreLocation) -> dict[str, bytes]:
    return {str(p.relative_to(path.path)): p.read_bytes() for p in sorted(path.path.rglob("*")) if p.is_file()}


def record(manifest, sample_index: int = 1, view: int = 2):
    """The fake teacher's record of one sample-view (unaugmented points)."""
    points = load_points(sample_index, BEVAugmentation())[1]
    return records_from_outputs(FakeTeacher()([points]), [(sample_index, view)], [token_of(sample_index)],
                                manifest)[0]


def test_status_and_marker_writes_are_refused_under_a_lost_lock(prepared):
    before = store_files(prepared)
    with pytest.raises(CacheError, match=rf"{LOST}.*so status 'complete' was not written"):
        set_status(prepared, v2.STATUS_COMPLETE, still_held=lambda: False)
    with pytest.raises(CacheError, match=rf"{LOST}.*so a batch of 2 done markers was not written"):
        set_done(prepared, [(0, 0), (0, 1)], 0, still_held=lambda: False)
    assert store_files(prepared) == before
    marker = prepared.path / v2.DONE / "c" / "0" / "0" / "0"
    marker.unlink()
    set_done(prepared, [(0, 0)], 0, still_held=lambda: True)  # a held lock writes as before
    assert marker.is_file() and not read_done(prepared)[0, 0]


def test_finalize_is_refused_under_a_lost_lock(tmp_path, manifest):
    path = StoreLocation.parse(tmp_path / "cache.zarr")
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    set_status(path, v2.STATUS_WRITING)
    before = store_files(path)
    with pytest.raises(CacheError, match=rf"{LOST}.*so status 'complete' was not written"):
        finalize_store(path, TOKENS, still_held=lambda: False)
    assert store_files(path) == before and read_manifest(path)["status"] == v2.STATUS_WRITING
    finalize_store(path, TOKENS, still_held=lambda: True)
    assert read_manifest(path)["status"] == v2.STATUS_COMPLETE


def test_a_sample_view_is_not_written_when_the_lock_is_lost_while_it_is_encoded(prepared, manifest, monkeypatch):
    held = [True]
    encode = writer.encode_chunk

    def encode_then_lose(*args):
        held[0] = False  # e.g. the process was paused while it compressed
        return encode(*args)

    target = SampleViewWriter(prepared, still_held=lambda: held[0])
    monkeypatch.setattr(writer, "encode_chunk", encode_then_lose)
    before = store_files(prepared)
    with pytest.raises(CacheError, match=rf"{LOST}.*so sample-view \(1, 2\) was not written"):
        target.write(record(manifest))
    assert store_files(prepared) == before


def test_the_done_marker_is_not_written_when_the_lock_is_lost_while_the_chunks_are(prepared, manifest,
                                                                                   monkeypatch):
    held = [True]
    write_chunk = writer.write_local_chunk

    def write_then_lose(*args, **kwargs):
        write_chunk(*args, **kwargs)
        held[0] = False

    target = SampleViewWriter(prepared, still_held=lambda: held[0])
    monkeypatch.setattr(writer, "write_local_chunk", write_then_lose)
    with pytest.raises(CacheError, match=rf"{LOST}.*so the done marker of sample-view \(1, 2\) was not written"):
        target.write(record(manifest))
    assert not read_done(prepared).any()
    assert (prepared.path / "features" / "neck" / "c" / "1" / "2" / "0" / "0" / "0").exists()


# ------------------------------------------------------------------------------------- whole extractions
def test_an_extraction_paused_past_its_deadline_stops_before_its_next_write(clock, manifest):
    location = memory_location()
    loads = []

    def pause_at_the_fifth_load(index, bev_aug):
        loads.append(index)
        if len(loads) == 5:
            clock.now += 120.0  # longer than the lease's ttl - margin: as if the process had been stopped
        return load_points(index, bev_aug)

    with pytest.raises(CacheError, match=rf"{LOST}.*sample-view \(1, 1\)"):
        run_extract(location, manifest, points=pause_at_the_fifth_load, workers=1, threads_per_worker=1,
                    background_writer=False)
    assert int(read_done(location).sum()) == 4  # the sample-view loaded after the pause was not written
    assert read_manifest(location)["status"] == v2.STATUS_WRITING


def test_an_extraction_whose_lease_was_taken_does_not_complete_the_store(manifest, monkeypatch):
    monkeypatch.setenv("DISTILLBEV_LEASE_SECONDS", "600")  # no renewal runs: only the final confirm can tell
    location = memory_location()
    teacher = FakeTeacher()
    thief = {"owner": "thief", "pid": 2, "host": "other", "expires_at": time.time() + 600}

    def teacher_then_steal(points):
        if teacher.calls == 14:  # the last sample-view: the lease is taken while it is computed
            location.put(v2.LOCK_FILE, json.dumps(thief).encode())
        return teacher(points)

    with pytest.raises(CacheError, match=rf"{LOST}.*so status 'complete' was not written"):
        run_extract(location, manifest, teacher=teacher_then_steal, workers=1, threads_per_worker=1)
    assert int(read_done(location).sum()) == 15
    assert read_manifest(location)["status"] == v2.STATUS_WRITING
    assert lease_object(location)["owner"] == "thief"


@pytest.mark.slow
def test_confirm_is_a_conditional_write_on_s3(s3_env):
    location = StoreLocation.parse(s3_env.url("confirm.zarr"))
    lock = LeaseLock(location, command="writer", ttl=60.0).acquire()
    try:
        assert lock.confirm() and lock.still_held()
        thief = {"owner": "thief", "pid": 2, "host": "other", "expires_at": time.time() + 60}
        location.put(v2.LOCK_FILE, json.dumps(thief).encode())  # a new ETag: the holder's If-Match fails
        assert not lock.confirm() and not lock.still_held()
    finally:
        lock.release()
    assert lease_object(location)["owner"] == "thief"
