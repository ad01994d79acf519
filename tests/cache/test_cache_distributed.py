"""Extraction under torchrun with 2 gloo ranks on CPU: the store equals a 1-process extraction byte for byte, and
a 2-rank run killed part-way resumes with 1 process to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_fakes import chunk_files, run_extract

from distillbev.pipeline.cache.distributed import rank_tasks
from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.cache.writer import set_done, set_status

SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from cache_fakes import FakeTeacher, head_state, load_points, make_manifest, token_of
from distillbev.pipeline.cache.distributed import extract_distributed

dist.init_process_group("gloo")
teacher = FakeTeacher()
def run_teacher(points):
    time.sleep({delay})
    return teacher(points)
manifest = make_manifest(FakeTeacher())
report = extract_distributed({path!r}, manifest=manifest, sample_tokens=[token_of(i) for i in range(5)],
                             head_state=head_state(), run_teacher=run_teacher, load_points=load_points, threads=1,
                             progress=False)
# one write per line (print writes the text and the newline separately, and the ranks share the pipe)
by_rank = {{r: sum(1 for w, _, _ in report.written_by if w == r) for r in range(dist.get_world_size())}}
sys.stdout.write(f"rank {{dist.get_rank()}} written {{report.written}} by {{by_rank}}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""


def torchrun(path: Path, delay: float = 0.0) -> subprocess.Popen:
    script = path.parent / f"{path.name}.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), path=str(path), delay=delay))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def running(script: str) -> list[int]:
    """Processes whose command line names `script` (the torchrun launcher and its ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if script in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def test_rank_tasks_take_whole_samples():
    pending = [(s, v) for s in range(5) for v in range(2)]
    assert rank_tasks(pending, 0, 2) == [(0, 0), (0, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    assert rank_tasks(pending, 1, 2) == [(1, 0), (1, 1), (3, 0), (3, 1)]


def test_rank_tasks_balance_a_lopsided_remainder():
    # a 2-rank run killed after rank 0 finished its samples leaves only odd samples: both ranks get half of them
    pending = [(s, v) for s in (1, 3, 5, 7) for v in range(2)] + [(6, 1)]
    assert rank_tasks(pending, 0, 2) == [(1, 0), (1, 1), (5, 0), (5, 1), (7, 0), (7, 1)]
    assert rank_tasks(pending, 1, 2) == [(3, 0), (3, 1), (6, 1)]
    assert sorted(rank_tasks(pending, 0, 2) + rank_tasks(pending, 1, 2)) == sorted(pending)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, reference):
    path = tmp_path / "ranks.zarr"
    process = torchrun(path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    # 5 samples x 3 views: rank 0 owns samples 0, 2, 4 (9 sample-views), rank 1 samples 1, 3 (6)
    assert "rank 0 written 15 by {0: 9, 1: 6}" in output
    assert chunk_files(path) == reference


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the rank processes")
def test_two_ranks_killed_then_resumed_by_one_process(tmp_path, manifest, reference):
    path = tmp_path / "ranks.zarr"
    process = torchrun(path, delay=0.3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (path / "done" / "zarr.json").exists() and read_done(path).sum() >= 4:
            break
        time.sleep(0.05)
    script = str(path.parent / f"{path.name}.py")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the launcher and both ranks, as a lost node (until none is left)
        victims = [process.pid, *descendants(process.pid), *running(script)]
        victims = [pid for pid in dict.fromkeys(victims) if alive(pid)]
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    process.wait()
    done = int(read_done(path).sum())
    assert 4 <= done < 15
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert report.state == "resumed" and report.skipped == done and report.written == 15 - done
    assert chunk_files(path) == reference


@pytest.mark.slow
def test_two_ranks_share_the_resume_check_and_a_lopsided_remainder(tmp_path, manifest, reference):
    path = tmp_path / "ranks.zarr"
    run_extract(path, manifest, workers=1, threads_per_worker=1)
    # as a 2-rank run killed before rank 0's samples 0 and 2 were done, with a corrupt chunk in rank 1's share
    set_status(path, v2.STATUS_WRITING, manifest_generation=True)
    set_done(path, [(s, v) for s in (0, 2) for v in range(3)], 0)
    chunk = path / "features" / "neck" / "c" / "3" / "1" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    process = torchrun(path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    # rank 1 finds (3, 1) in its share; the 3 pending samples 0, 2, 3 are dealt out 0, 3 -> rank 0 and 2 -> rank 1
    assert "rank 0 written 7 by {0: 4, 1: 3}" in output
    assert chunk_files(path) == reference
