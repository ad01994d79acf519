"""Every torchrun rank is checked and fenced: a rank that would write another store stops every rank before anything
is written, and the ranks other than 0 stop within one sample-view once rank 0 no longer holds the store's lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_fakes import FakeTeacher, make_manifest, token_of

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.distributed import holder_fence, identity_problems, rank_identity
from distillbev.pipeline.cache.lease import LeaseLock
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.store import StoreLock
from distillbev.pipeline.cache.state import read_done

TOKENS = [token_of(i) for i in range(5)]

SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from cache_fakes import FakeTeacher, head_state, load_points, make_manifest, token_of
from distillbev.pipeline.cache.distributed import extract_distributed
from distillbev.pipeline.errors import CacheError

dist.init_process_group("gloo")
rank = dist.get_rank()
teacher = FakeTeacher()
tokens = [token_of(i) for i in range(5)]
manifest = make_manifest(FakeTeacher())
if rank == 1 and {rank1_change!r} == "checkpoint":
    manifest = make_manifest(FakeTeacher(), sha="b" * 64)
if rank == 1 and {rank1_change!r} == "split order":
    tokens = tokens[::-1]
    manifest = make_manifest(FakeTeacher())
    manifest["dataset"]["sample_tokens_sha256"] = "reversed"
def run_teacher(points):
    time.sleep({delay})
    return teacher(points)
try:
    extract_distributed({path!r}, manifest=manifest, sample_tokens=tokens, head_state=head_state(),
                        run_teacher=run_teacher, load_points=load_points, threads=1, progress=False)
    sys.stdout.write(f"rank {{rank}} finished\\n")
except CacheError as exc:
    sys.stdout.write(f"rank {{rank}} refused: {{exc}}\\n")
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
"""


def torchrun(path: Path, rank1_change: str = "", delay: float = 0.0) -> subprocess.Popen:
    script = path.parent / f"{path.name}.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), path=str(path), rank1_change=rank1_change,
                                    delay=delay))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_rank_with_another_checkpoint_is_named_with_its_host_and_field():
    manifest = make_manifest(FakeTeacher())
    other = make_manifest(FakeTeacher(), sha="b" * 64)
    same = rank_identity(manifest, TOKENS)
    problems = identity_problems([same, same, {**rank_identity(other, TOKENS), "host": "node-2"}])
    assert len(problems) == 1
    assert problems[0].startswith("rank 2 on node-2 would write another store than rank 0")
    assert f"teacher.checkpoint_sha256: \"{'a' * 64}\" -> \"{'b' * 64}\"" in problems[0]
    assert "nothing was written" in problems[0]
    assert identity_problems([same, same]) == []


def test_a_rank_with_its_tokens_in_another_order_is_refused():
    manifest = make_manifest(FakeTeacher())
    problems = identity_problems([rank_identity(manifest, TOKENS), rank_identity(manifest, TOKENS[::-1])])
    assert len(problems) == 1 and "sample tokens (sha256)" in problems[0]


@pytest.mark.slow
@pytest.mark.parametrize("change, field", [("checkpoint", "teacher.checkpoint_sha256"),
                                           ("split order", "dataset.sample_tokens_sha256")])
def test_two_ranks_that_differ_stop_before_writing(tmp_path, change, field):
    path = tmp_path / "ranks.zarr"
    process = torchrun(path, rank1_change=change)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    for rank in (0, 1):
        assert f"rank {rank} refused: rank 1 on " in output and field in output
    assert not path.exists()  # rank 0 did not even create the store


def test_the_fence_of_a_local_lock_follows_its_holder(tmp_path):
    location = StoreLocation.parse(tmp_path / "store")
    lock = StoreLock(location).acquire()
    fence = holder_fence(location, lock.holder())
    assert fence()
    (tmp_path / "store" / v2.LOCK_FILE).write_text(json.dumps({**lock.holder(), "pid": 1, "host": "node-2"}))
    assert not fence()  # the file names another holder
    (tmp_path / "store" / v2.LOCK_FILE).unlink()
    assert not fence()  # deleted
    lock.release()
    lock = StoreLock(location).acquire()
    fence = holder_fence(location, lock.holder())
    assert fence()
    lock.release()  # a released lock file names no holder
    assert not fence()


def test_the_fence_of_a_local_lock_fails_when_its_holder_died(tmp_path):
    location = StoreLocation.parse(tmp_path / "store")
    location.path.mkdir()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)  # a process that has exited
    with StoreLock(location) as lock:
        holder = lock.holder()
        assert holder_fence(location, holder)()
        dead = {**holder, "pid": pid}
        (location.path / v2.LOCK_FILE).write_text(json.dumps(dead))
        assert not holder_fence(location, dead)()


def test_the_fence_of_a_lease_follows_its_owner_and_expiry(s3_env):
    location = StoreLocation.parse(s3_env.url("fence.zarr"))
    with LeaseLock(location, command="rank 0", ttl=60.0) as lock:
        holder = lock.holder()
        fence = holder_fence(location, holder)
        assert fence()
        expired = {**holder, "expires_at": time.time() - 1}
        location.put(v2.LOCK_FILE, json.dumps(expired).encode())
        assert not fence()  # rank 0 has not renewed it: it may be paused, or lost it
        location.put(v2.LOCK_FILE, json.dumps({**holder, "owner": "another writer"}).encode())
        assert not fence()  # taken over
        location.put(v2.LOCK_FILE, json.dumps(holder).encode())
        assert fence()


@pytest.mark.slow
def test_rank_1_writes_nothing_more_once_rank_0_lost_its_lock(tmp_path):
    path = tmp_path / "ranks.zarr"
    process = torchrun(path, delay=0.4)
    rank1 = [1, 3]  # rank 1's samples of a fresh 2-rank run (the pending samples dealt out in turn)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (path / "done" / "zarr.json").exists() and read_done(path, rank1).sum() >= 1:
            break
        time.sleep(0.05)
    (path / v2.LOCK_FILE).unlink()  # rank 0 no longer holds the store (a cleanup script, an rsync --delete)
    written_then = int(read_done(path, rank1).sum())
    output, _ = process.communicate(timeout=300)
    assert int(read_done(path, rank1).sum()) <= written_then + 1  # at most the sample-view it was writing
    assert int(read_done(path, rank1).sum()) < 6, output  # rank 1 did not finish its samples
    assert "rank 1 refused:" in output and "lost its lock" in output, output


@pytest.mark.slow
def test_forked_workers_stop_once_the_lock_file_is_deleted(tmp_path):
    from cache_fakes import slow_extraction_script

    path = tmp_path / "workers.zarr"
    process = subprocess.Popen([sys.executable, "-c", slow_extraction_script(str(path), seconds=0.4, workers=2)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (path / "done" / "zarr.json").exists() and read_done(path).sum() >= 2:
            break
        time.sleep(0.05)
    (path / v2.LOCK_FILE).unlink()
    written_then = int(read_done(path).sum())
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "lost its lock" in output, output
    assert int(read_done(path).sum()) <= written_then + 2  # at most the sample-view each worker was writing
    assert int(read_done(path).sum()) < 15
