"""The cache contract at the engine level: done means verified, strict reads, repair, the lock, the marker, layout
crashes, and workers that die with their parent. Every repaired store is compared with a clean one, chunk for chunk.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cache_fakes import (chunk_files, extract_slowly, load_points, make_manifest, run_extract,
                         slow_extraction_script, token_of)

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.store import StoreLock
from distillbev.pipeline.cache.state import read_done
from distillbev.pipeline.errors import CacheError


def chunk(path: Path, array: str, sample: int, view: int) -> Path:
    ndim = zarr.open_array(str(path / array), mode="r").ndim
    return path.joinpath(array, "c", str(sample), str(view), *["0"] * (ndim - 2))


def flip_byte(file: Path, position: int = -10) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0x01
    file.write_bytes(bytes(data))


def set_writing(path: Path) -> None:
    zarr.open_group(str(path), mode="r+").attrs["status"] = "writing"


# ------------------------------------------------------------------------------------------- done means verified
def test_resume_redoes_done_sample_views_whose_chunks_are_gone_or_torn(complete, manifest, reference):
    set_writing(complete)  # an interrupted run whose done markers survived but whose chunks did not
    chunk(complete, "features/neck", 1, 2).unlink()
    torn = chunk(complete, "heatmap", 3, 0)
    torn.write_bytes(torn.read_bytes()[:-7])
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert report.state == "resumed"
    assert report.redone == [(1, 2), (3, 0)] and report.written == 2 and report.skipped == 13
    assert chunk_files(complete) == reference


def test_complete_store_rerun_redoes_a_missing_chunk(complete, manifest, reference):
    chunk(complete, "attention/backbone2", 4, 1).unlink()
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert (report.state, report.checked, report.redone, report.written) == ("repaired", "quick", [(4, 1)], 1)
    assert chunk_files(complete) == reference
    assert zarr.open_group(str(complete), mode="r").attrs["status"] == "complete"


def test_repair_redoes_exactly_the_corrupt_sample_views(complete, manifest, reference):
    flip_byte(chunk(complete, "features/backbone1", 0, 1))
    truncated = chunk(complete, "occupancy", 2, 2)
    truncated.write_bytes(truncated.read_bytes()[:6])
    quick = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert (quick.state, quick.checked) == ("complete", "quick")  # present chunks: only --repair reads them
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1, repair=True)
    assert (report.state, report.checked, report.redone, report.written) == ("repaired", "crc", [(0, 1), (2, 2)], 2)
    assert chunk_files(complete) == reference
    again = run_extract(complete, manifest, repair=True)
    assert (again.state, again.written) == ("complete", 0)


def test_repair_rewrites_damaged_tokens_views_and_head(complete, manifest, reference):
    flip_byte(complete / "sample_tokens" / "c" / "0", position=2)
    flip_byte(complete / "views" / "c" / "0" / "0" / "0", position=-6)
    (complete / "teacher_head" / "task_heads.0.heatmap.1.bias" / "c" / "0").unlink()
    with pytest.raises(CacheError, match=r"sample_tokens: CRC32C checksum mismatch.*--repair"):
        TeacherCache.open(complete)
    generation = zarr.open_group(str(complete), mode="r").attrs["generation"]
    report = run_extract(complete, manifest, workers=1, threads_per_worker=1)
    assert report.state == "complete" and report.written == 0
    assert chunk_files(complete) == reference
    attributes = zarr.open_group(str(complete), mode="r").attrs
    assert attributes["status"] == "complete" and attributes["generation"] != generation
    assert TeacherCache.open(complete).sample_tokens == [token_of(i) for i in range(5)]


def test_all_zero_maps_are_written_and_count_as_done(tmp_path, manifest):
    def empty_for_sample_2(index, bev_aug):
        token, points = load_points(index, bev_aug)
        return token, points[:0] if index == 2 else points

    path = tmp_path / "cache.zarr"
    run_extract(path, manifest, points=empty_for_sample_2)
    assert chunk(path, "occupancy", 2, 0).is_file() and chunk(path, "features/neck", 2, 1).is_file()
    cache = TeacherCache.open(path)
    assert not cache.read(2, 0).occupancy.any() and float(cache.read(2, 0).features["neck"].abs().sum()) == 0.0
    assert run_extract(path, manifest, repair=True).state == "complete"


# ------------------------------------------------------------------------------------------------ strict reads
def test_reader_refuses_a_missing_chunk_instead_of_zeros(complete):
    chunk(complete, "features/neck", 3, 1).unlink()
    cache = TeacherCache.open(complete)
    with pytest.raises(CacheError) as error:
        cache.read(3, 1)
    assert str(error.value) == (
        f"{complete}: sample {token_of(3)} (index 3) view 1, features/neck: chunk missing (zarr would read it as "
        f"fill values); repair the store with `distillbev extract-teacher ... --cache {complete} --repair (with the "
        f"options that extracted it)`")


def test_reader_names_a_checksum_mismatch_also_in_dataloader_workers(complete):
    flip_byte(chunk(complete, "heatmap", 1, 0))
    cache = TeacherCache.open(complete)
    with pytest.raises(CacheError, match=rf"sample {token_of(1)} \(index 1\) view 0, heatmap: CRC32C checksum"):
        cache.read(1, 0)

    class Views(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return cache.read(index, 0).heatmap

    loader = torch.utils.data.DataLoader(Views(), batch_size=1, num_workers=1)
    from distillbev.pipeline.errors import one_line

    with pytest.raises(CacheError) as error:
        list(loader)
    assert "DataLoader worker" in str(error.value)
    assert one_line(error.value).startswith(f"{complete}: sample {token_of(1)} (index 1) view 0, heatmap: CRC32C")


def test_reader_fails_when_the_store_is_rewritten_under_it(complete, manifest):
    cache = TeacherCache.open(complete)
    cache.read(0, 0)
    chunk(complete, "heatmap", 4, 2).unlink()
    run_extract(complete, manifest)  # a repair: new generation
    with pytest.raises(CacheError, match=r"the store was rewritten while this job was reading it"):
        cache.read(0, 0)
    assert TeacherCache.open(complete).read(0, 0).heatmap.shape == (10, 8, 8)  # reopening sees the new store


# -------------------------------------------------------------------------------------------------- the lock
def test_second_extraction_is_refused_while_one_holds_the_lock(complete, manifest):
    with StoreLock(complete, command="distillbev extract-teacher --split first_run"):
        with pytest.raises(CacheError) as error:
            run_extract(complete, manifest)
    assert "another extraction is writing this store" in str(error.value)
    assert f"pid {os.getpid()}" in str(error.value) and "running `distillbev extract-teacher --split first_run`" in \
        str(error.value)
    assert run_extract(complete, manifest).state == "complete"  # released


def test_lock_of_a_killed_process_is_taken_over(complete, manifest):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from distillbev.pipeline.cache.store import StoreLock; "
        f"StoreLock(Path({str(complete)!r}), command='held').acquire(); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError, match=rf"pid {holder.pid} on .* running `held`"):
            run_extract(complete, manifest)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((complete / v2.LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the kill
    assert run_extract(complete, manifest).state == "complete"


# -------------------------------------------------------------------------- marker, overwrite, paths, layout
def test_overwrite_never_deletes_a_zarr_group_it_did_not_make(tmp_path, manifest):
    foreign = tmp_path / "someone_elses.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("data", shape=(3,), dtype="int32")[...] = [1, 2, 3]
    before = sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*"))
    with pytest.raises(CacheError, match="is not a teacher cache written by distillbev .* nothing was changed"):
        run_extract(foreign, manifest, overwrite=True)
    assert sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*")) == before
    assert list(zarr.open_array(str(foreign / "data"))[...]) == [1, 2, 3]


def test_overwrite_replaces_this_tools_store_keeping_nothing_stale(complete, teacher, manifest):
    other = make_manifest(teacher, views=2)
    with pytest.raises(CacheError, match=r'views.count: 3 -> 2\); nothing was changed'):
        run_extract(complete, other)
    report = run_extract(complete, other, overwrite=True)
    assert report.state == "created" and TeacherCache.open(complete).num_views == 2
    assert not chunk(complete, "heatmap", 0, 2).exists()


def test_killed_during_layout_creation_resumes_with_the_same_command(tmp_path, manifest, reference, monkeypatch):
    from distillbev.pipeline.cache import writer

    original = writer.write_static_arrays

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_static_arrays", disk_full)
    path = tmp_path / "cache.zarr"
    with pytest.raises(CacheError, match=r"No space left on device\); free disk space .* rerun the same command"):
        run_extract(path, manifest)
    assert (path / v2.MARKER_FILE).is_file() and "schema_version" not in json.loads((path / "zarr.json").read_text())[
        "attributes"]
    monkeypatch.setattr(writer, "write_static_arrays", original)
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)  # no --overwrite needed
    assert report.state == "created" and chunk_files(path) == reference


@pytest.mark.parametrize("kind", ["file", "dangling", "link-to-empty"])
def test_cache_paths_that_are_files_or_links(tmp_path, manifest, kind):
    path = tmp_path / "cache.zarr"
    if kind == "file":
        path.write_text("x")
        with pytest.raises(CacheError, match=r"cache.zarr: is a file, not a teacher cache folder"):
            run_extract(path, manifest)
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")
        with pytest.raises(CacheError, match=r"is a symbolic link to .*nowhere', which does not exist"):
            run_extract(path, manifest)
    else:
        (tmp_path / "target").mkdir()
        path.symlink_to(tmp_path / "target")
        assert run_extract(path, manifest).status == "complete"
        assert (tmp_path / "target" / v2.MARKER_FILE).is_file() and TeacherCache.open(path).num_samples == 5


def test_moved_dataroot_resumes_but_other_content_is_refused_before_writing(complete, teacher, manifest):
    set_writing(complete)
    moved = json.loads(json.dumps(manifest))
    moved["dataset"]["dataroot"] = "/mnt/elsewhere/fake"
    assert run_extract(complete, moved).state == "resumed"
    stamps = {p: p.stat().st_mtime_ns for p in complete.rglob("*") if p.name != v2.LOCK_FILE}
    edited = make_manifest(teacher, fingerprint="e" * 64)
    with pytest.raises(CacheError, match=r'dataset.fingerprint: "f{64}" -> "e{64}"\); the dataroot.s tables or LiDAR '
                                         r'files differ from those the store was extracted from; nothing was changed'):
        run_extract(complete, edited)
    assert {p: p.stat().st_mtime_ns for p in complete.rglob("*") if p.name != v2.LOCK_FILE} == stamps


def test_same_manifest_but_other_tokens_is_refused(complete, manifest):
    set_writing(complete)
    tokens = zarr.open_group(str(complete), mode="r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokens["sample_tokens"][...] = np.array([token_of(i + 10) for i in range(5)], dtype=object)
    with pytest.raises(CacheError, match=r"sample_tokens differ from the dataset's split \(first difference at "
                                         r"index 0: stored 'token-010', dataset 'token-000'\)"):
        run_extract(complete, manifest)


# ------------------------------------------------------------------------------------ workers die with parent
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker processes")
def test_workers_die_with_a_killed_parent_and_the_rerun_completes(tmp_path, manifest, reference):
    path = tmp_path / "cache.zarr"
    script = slow_extraction_script(str(path), seconds=0.4, workers=2)
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and (not (path / "done").exists() or read_done(path).sum() < 2):
        time.sleep(0.1)
    workers = _children(parent.pid)
    assert len(workers) >= 2, workers  # the two extraction processes (and the queue's feeder, if any)
    os.kill(parent.pid, signal.SIGKILL)  # the parent alone, as the OOM killer or a preemption does
    parent.wait()
    time.sleep(1.0)
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in workers)
    snapshot = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    time.sleep(1.5)  # a surviving worker would go on writing a chunk every 0.4 s
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()} == snapshot
    done = int(read_done(path).sum())
    assert 0 < done < 15
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)  # the lock is free: no orphan holds it
    assert report.state == "resumed" and report.skipped + report.written == 15
    assert chunk_files(path) == reference


@pytest.mark.slow
def test_three_sigkills_then_resume_is_bit_identical(tmp_path, manifest, reference):
    import multiprocessing

    path = tmp_path / "cache.zarr"
    done_counts = []
    for kill in range(3):
        process = multiprocessing.get_context("fork").Process(target=extract_slowly, args=(path, manifest))
        process.start()
        target = 3 * (kill + 1)  # each run gets a few sample-views further before it is killed
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (path / "done" / "zarr.json").exists() and read_done(path).sum() >= target:
                break
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        assert process.exitcode == -signal.SIGKILL
        done_counts.append(int(read_done(path).sum()))
    assert done_counts == sorted(done_counts) and done_counts[-1] < 15
    report = run_extract(path, manifest, workers=1, threads_per_worker=1)
    assert report.state == "resumed" and report.skipped == done_counts[-1]
    assert chunk_files(path) == reference
