"""Teacher caches on object storage, against a real S3 server (SeaweedFS on 127.0.0.1, tests/s3_server.py).

The fake teacher of cache_fakes.py writes 5 samples x 3 views; every store written to S3 is compared chunk by chunk
with the same extraction on a local disk, which must hold the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cache_fakes import run_extract, slow_extraction_script, store_chunks

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.inspect.summary import summarize_cache
from distillbev.pipeline.cache.inspect.verify import verify_cache
from distillbev.pipeline.cache.lease import LeaseLock, _Objects
from distillbev.pipeline.cache.location import StoreLocation, parse_storage_options
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.errors import CacheError

pytestmark = pytest.mark.slow
TOTAL = 15  # 5 samples x 3 views


@pytest.fixture
def reference(tmp_path, manifest):
    path = tmp_path / "reference.zarr"
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    return store_chunks(path)


def test_server_listens_on_loopback_only(s3_server):
    assert s3_server.listening_addresses() == {"127.0.0.1"}


def test_locations_parse_urls_paths_and_options(tmp_path):
    local = StoreLocation.parse(tmp_path / "c.zarr")
    assert local.is_local and local.backend == "local" and local.path == tmp_path / "c.zarr"
    remote = StoreLocation.parse("s3://feats//runs/c.zarr/", {"endpoint_url": "http://127.0.0.1:9"})
    assert (remote.url, remote.backend, remote.name) == ("s3://feats/runs/c.zarr", "obstore", "c.zarr")
    assert remote.bucket_and_prefix() == ("feats", "runs/c.zarr")
    assert StoreLocation.parse(f"file://{tmp_path}/c.zarr").path == tmp_path / "c.zarr"
    assert parse_storage_options(["region=eu-west-1", "endpoint_url=http://h:1?a=b"]) == {
        "region": "eu-west-1", "endpoint_url": "http://h:1?a=b"}
    with pytest.raises(CacheError, match="expected KEY=VALUE"):
        parse_storage_options(["region"])
    with pytest.raises(CacheError, match="unknown storage option.*'endpoint'"):
        StoreLocation.parse("s3://feats/c.zarr", {"endpoint": "http://h"})
    with pytest.raises(CacheError, match="given for a local path"):
        StoreLocation.parse(tmp_path, {"region": "x"})
    with pytest.raises(CacheError, match="needs a bucket"):
        StoreLocation.parse("s3:///c.zarr")


def test_s3_settings_come_from_the_aws_environment_and_options_win(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    location = StoreLocation.parse("s3://b/p", {"endpoint_url": "http://option:2"})
    assert location.s3_settings() == {"key": "env-key", "secret": "env-secret", "endpoint_url": "http://option:2",
                                      "region": "eu-central-1"}
    fsspec = StoreLocation.parse("s3://b/p", {"backend": "fsspec"})._fsspec_options()
    assert fsspec == {"key": "env-key", "secret": "env-secret", "endpoint_url": "http://env:1",
                      "client_kwargs": {"region_name": "eu-central-1"}}


def test_a_location_keeps_the_environment_it_was_made_in(monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    location = StoreLocation.parse("s3://b/p")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2222")  # e.g. a forkserver started under another env
    assert pickle.loads(pickle.dumps(location)).s3_settings()["endpoint_url"] == "http://127.0.0.1:1111"
    assert StoreLocation.parse("s3://b/p").s3_settings()["endpoint_url"] == "http://127.0.0.1:2222"


@pytest.mark.parametrize("backend", ["obstore", "fsspec"])
def test_extraction_on_s3_equals_the_local_store(s3_env, manifest, reference, backend):
    url = s3_env.url(f"equal-{backend}.zarr")
    location = StoreLocation.parse(url, {"backend": backend})
    report = run_extract(location, manifest, workers=1, threads_per_worker=1)
    assert (report.state, report.written, report.status) == ("created", TOTAL, "complete")
    assert store_chunks(location) == reference
    assert location.get(v2.LOCK_FILE) is None  # the lease is given back
    marker = json.loads(location.get(v2.MARKER_FILE))
    assert marker["format"] == v2.MARKER_FORMAT
    # a store written through one backend reads through the other
    other = StoreLocation.parse(url, {"backend": "fsspec" if backend == "obstore" else "obstore"})
    cache = TeacherCache.open(other)
    local = TeacherCache.open(reference_store(manifest, s3_env))
    a, b = cache.read(4, 2), local.read(4, 2)
    assert all(torch.equal(a.features[k], b.features[k]) for k in a.features) and torch.equal(a.heatmap, b.heatmap)
    assert run_extract(location, manifest).state == "complete"  # the rerun finds every chunk present


def reference_store(manifest, server) -> str:
    """A local store of the same extraction (written once per test session)."""
    path = Path(server.workdir) / "local-reference.zarr"
    if not path.exists():
        run_extract(path, manifest, workers=1, threads_per_worker=1)
    return str(path)


def test_killed_extraction_on_s3_resumes_after_its_lease_expires(s3_env, manifest, reference, monkeypatch):
    url = s3_env.url("killed.zarr")
    location = StoreLocation.parse(url)
    env = {**os.environ, **s3_env.env(), "DISTILLBEV_LEASE_SECONDS": "4"}
    script = slow_extraction_script(url, seconds=0.25, workers=1)
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if location.get("done/zarr.json") is not None and read_done(location).sum() >= 4:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = int(read_done(location).sum())
    assert 4 <= done < TOTAL
    lease = json.loads(location.get(v2.LOCK_FILE))
    assert lease["pid"] == process.pid  # left behind by the kill
    monkeypatch.setenv("DISTILLBEV_LEASE_SECONDS", "4")
    with pytest.raises(CacheError, match=rf"another extraction is writing this store \(pid {process.pid} on .*"
                                         r"its lease runs until"):
        run_extract(location, manifest, workers=1, threads_per_worker=1)
    time.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.2)
    report = run_extract(location, manifest, workers=1, threads_per_worker=1)
    assert report.state == "resumed" and report.skipped >= done and report.skipped + report.written == TOTAL
    assert store_chunks(location) == reference
    verified = verify_cache(location, progress=False)
    assert verified.ok and verified.sample_views_checked == TOTAL
    summary = summarize_cache(location)
    assert summary.to_json()["path"] == url and summary.sample_views_done == TOTAL
    local = {a.name: a.stored_bytes for a in summarize_cache(reference_store(manifest, s3_env)).arrays}
    assert {a.name: a.stored_bytes for a in summary.arrays if a.name.startswith("features/")} == {
        name: size for name, size in local.items() if name.startswith("features/")}


def test_repair_on_s3_redoes_exactly_the_corrupt_sample_view(s3_env, manifest, reference):
    location = StoreLocation.parse(s3_env.url("repair.zarr"))
    run_extract(location, manifest, workers=1, threads_per_worker=1)
    key = "features/neck/c/3/1/0/0/0"  # sample 3, view 1
    damaged = bytearray(location.get(key))
    damaged[-10] ^= 0x01
    location.put(key, bytes(damaged))
    verified = verify_cache(location, progress=False)
    assert not verified.ok and verified.bad_sample_views == [("token-003", 1)]
    report = run_extract(location, manifest, workers=1, threads_per_worker=1, repair=True)
    assert (report.state, report.redone, report.written) == ("repaired", [(3, 1)], 1)
    assert store_chunks(location) == reference and verify_cache(location, progress=False).ok


def test_lease_is_renewed_while_held_and_refuses_a_second_writer(s3_env):
    location = StoreLocation.parse(s3_env.url("lease.zarr"))
    with LeaseLock(location, command="first", ttl=2.0) as first:
        time.sleep(3.0)  # longer than the ttl: only renewals keep it
        assert first.still_held()
        held = json.loads(location.get(v2.LOCK_FILE))
        assert held["owner"] == first.owner and held["expires_at"] > time.time()
        with pytest.raises(CacheError, match="running `first`"):
            LeaseLock(location, command="second", ttl=2.0).acquire()
    assert location.get(v2.LOCK_FILE) is None
    with LeaseLock(location, command="third", ttl=2.0) as third:
        assert third.still_held()


def test_two_takeovers_of_one_expired_lease_cannot_both_win(s3_env):
    location = StoreLocation.parse(s3_env.url("race.zarr"))
    stale = {"owner": "dead", "pid": 1, "host": "h", "since": "then", "expires_at": time.time() - 10}
    location.put(v2.LOCK_FILE, json.dumps(stale).encode())
    a, b = _Objects(location, v2.LOCK_FILE), _Objects(location, v2.LOCK_FILE)
    (_, etag_a), (_, etag_b) = a.read(), b.read()
    assert etag_a == etag_b
    assert a.replace(etag_a, json.dumps({"owner": "a"}).encode()) not in (False, None)
    assert b.replace(etag_b, json.dumps({"owner": "b"}).encode()) is False  # If-Match on a stale ETag
    assert json.loads(location.get(v2.LOCK_FILE))["owner"] == "a"
    assert a.create(json.dumps({"owner": "c"}).encode()) is False  # If-None-Match on an existing lease


def test_a_lost_lease_stops_the_writer(s3_env, caplog):
    location = StoreLocation.parse(s3_env.url("lost.zarr"))
    lock = LeaseLock(location, command="victim", ttl=2.0).acquire()
    try:
        location.put(v2.LOCK_FILE, json.dumps({"owner": "thief", "pid": 2, "host": "other",
                                               "expires_at": time.time() + 60}).encode())
        with caplog.at_level(logging.ERROR, logger="distillbev.pipeline.cache.lease"):
            deadline = time.monotonic() + 5
            while lock.still_held() and time.monotonic() < deadline:
                time.sleep(0.1)
        assert not lock.still_held() and lock.holder()["owner"] == "thief"
        lost = [r.getMessage() for r in caplog.records if "lost the writer lease" in r.getMessage()]
        assert len(lost) == 1 and "pid 2 on other" in lost[0]  # the log names who holds the lease now
    finally:
        lock.release()
    assert json.loads(location.get(v2.LOCK_FILE))["owner"] == "thief"  # release never deletes another's lease


class CacheReads(torch.utils.data.Dataset):
    """Every sample-view of a cache as (features of the neck, heatmap)."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_samples * self.cache.num_views

    def __getitem__(self, index: int):
        targets = self.cache.read(index // self.cache.num_views, index % self.cache.num_views)
        return targets.features["neck"], targets.heatmap


def test_dataloader_workers_read_s3_after_the_parent_did(s3_env, manifest, reference):
    url = s3_env.url("loader.zarr")
    run_extract(url, manifest, workers=1, threads_per_worker=1)
    cache = TeacherCache.open(url)
    first = cache.read(0, 0)  # the parent has used its object-store client
    assert cache.worker_start_method == "forkserver"
    loader = torch.utils.data.DataLoader(CacheReads(cache), batch_size=None, num_workers=2,
                                         multiprocessing_context=cache.worker_start_method)
    read = list(loader)
    local = TeacherCache.open(reference_store(manifest, s3_env))
    assert len(read) == TOTAL and torch.equal(read[0][0], first.features["neck"])
    for index, (neck, heatmap) in enumerate(read):
        expected = local.read(index // 3, index % 3)
        assert torch.equal(neck, expected.features["neck"]) and torch.equal(heatmap, expected.heatmap)


def test_a_forked_worker_gets_an_error_instead_of_a_hang(s3_env, manifest):
    url = s3_env.url("forked.zarr")
    run_extract(url, manifest, workers=1, threads_per_worker=1)
    cache = TeacherCache.open(url)
    cache.read(0, 0)
    loader = torch.utils.data.DataLoader(CacheReads(cache), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", timeout=60)
    with pytest.raises(Exception, match="obstore does not survive a fork"):
        next(iter(loader))


def test_workers_are_refused_on_an_object_store(s3_env, manifest):
    with pytest.raises(CacheError, match="torchrun --nproc-per-node 2"):
        run_extract(s3_env.url("workers.zarr"), manifest, workers=2)
    assert StoreLocation.parse(s3_env.url("workers.zarr")).keys() == []  # refused before anything was written


def test_missing_bucket_is_one_readable_error(s3_env, manifest):
    with pytest.raises(CacheError, match=r"s3://no-such-bucket/c.zarr: cannot list the object store .*check the "
                                         r"bucket, the endpoint and the credentials"):
        run_extract("s3://no-such-bucket/c.zarr", manifest)
