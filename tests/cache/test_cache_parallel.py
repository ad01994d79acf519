"""Parallel extraction: workers own disjoint contiguous sample runs, so no chunk has two writers."""

from __future__ import annotations

import os

import torch

from cache_fakes import chunk_files, load_points, run_extract

from distillbev.pipeline.cache.extract import split_tasks


def test_split_tasks_gives_contiguous_disjoint_sample_runs():
    pending = [(s, v) for s in range(7) for v in range(2) if (s, v) != (3, 0)]
    runs = split_tasks(pending, 3)
    samples = [sorted({s for s, _ in run}) for run in runs]
    assert samples == [[0, 1, 2], [3, 4], [5, 6]]
    assert sorted(t for run in runs for t in run) == sorted(pending)
    assert split_tasks([(0, 0), (0, 1)], 4) == [[(0, 0), (0, 1)]]  # never more workers than samples


def test_two_workers_never_share_a_chunk(tmp_path, manifest):
    parent = os.getpid()
    log = tmp_path / "loads.txt"

    def logged_points(index, bev_aug):
        with open(log, "a") as handle:  # which process computed what, seen from inside the workers
            handle.write(f"{os.getpid()} {index}\n")
        return load_points(index, bev_aug)

    path = tmp_path / "parallel.zarr"
    report = run_extract(path, manifest, points=logged_points, workers=2, threads_per_worker=1)
    owners: dict[tuple[int, int], int] = {}
    for worker, sample_index, view in report.written_by:
        assert (sample_index, view) not in owners, "a sample-view was written twice"
        owners[(sample_index, view)] = worker
    assert len(owners) == 15 and set(owners.values()) == {0, 1}
    per_worker = {w: sorted({s for (s, _), o in owners.items() if o == w}) for w in (0, 1)}
    assert per_worker == {0: [0, 1, 2], 1: [3, 4]}
    # every per-sample-view chunk key (.../c/<sample>/<view>/...) belongs to exactly one worker
    for key in chunk_files(path):
        parts = key.split("/")
        if "c" in parts and parts[0] not in ("views", "sample_tokens", "teacher_head"):
            sample_index, view = int(parts[parts.index("c") + 1]), int(parts[parts.index("c") + 2])
            assert (sample_index, view) in owners, key
    pids = {}
    for line in log.read_text().split("\n"):
        if line:
            pid, index = map(int, line.split())
            pids.setdefault(index, set()).add(pid)
    assert all(len(p) == 1 for p in pids.values())  # each sample loaded by exactly one process
    assert parent not in set().union(*pids.values())  # and never by the parent
    assert pids[0] == pids[2] != pids[3] == pids[4]


def test_parallel_run_equals_serial_run(tmp_path, manifest):
    serial, parallel = tmp_path / "serial.zarr", tmp_path / "parallel.zarr"
    run_extract(serial, manifest, workers=1, threads_per_worker=1)
    run_extract(parallel, manifest, workers=2, threads_per_worker=1)
    assert chunk_files(serial) == chunk_files(parallel)


def test_batched_teacher_calls_store_the_same_values(tmp_path, manifest):
    from distillbev.pipeline.cache.reader import TeacherCache

    single, batched = tmp_path / "single.zarr", tmp_path / "batched.zarr"
    run_extract(single, manifest, threads_per_worker=1)
    run_extract(batched, manifest, threads_per_worker=1, batch_size=4)  # batches cross sample boundaries
    a, b = TeacherCache.open(single), TeacherCache.open(batched)
    for sample_index, view in [(0, 0), (1, 2), (4, 1)]:
        x, y = a.read(sample_index, view), b.read(sample_index, view)
        assert x.sample_token == y.sample_token and x.bev_aug == y.bev_aug
        for layer in x.features:  # a batched conv may sum in another order: equal up to rounding
            assert torch.allclose(x.features[layer], y.features[layer], rtol=2e-3, atol=1e-3)
