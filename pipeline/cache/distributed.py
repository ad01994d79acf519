"""Teacher extraction under torchrun: every rank runs the teacher on its own samples, rank 0 owns the store.

    torchrun --standalone --nproc-per-node 2 -m distillbev.cli extract-teacher ... --cache STORE

Rank 0 checks the store and holds its writer lock for the whole run. It creates or reopens the store, re-checks
what a resume or a repair must redo, and broadcasts the outcome; an error there reaches every rank as the same
CacheError. Rank r then extracts the pending sample-views of samples r, r + W, r + 2W, ..., so ranks own whole
samples and never share a chunk. The ranks gather their outcomes. If every rank finished, rank 0 finalizes the
store. The store equals a single-process extraction's byte for byte when the ranks compute with the same thread
count, and a run killed at any point resumes with any number of ranks (or none).
Ranks replace `--workers`: each rank extracts in its own process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ...cache_schemas import v2
from ..errors import CacheError, DistillBEVError
from .extract import (ExtractionReport, LoadPoints, RunTeacher, _run_jobs, _WorkerJob, pending_sample_views,
                      prepare_extraction)
from .manifest import ViewConfig
from .location import StoreLocation
from .store import classify_store, refuse_unusable, writer_lock
from .writer import finalize_store


def rank_tasks(pending: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The sample-views of rank `rank`: those of samples rank, rank + W, ... (whole samples, in order)."""
    return [(s, v) for s, v in pending if s % world_size == rank]


def extract_distributed(path: str | Path | StoreLocation, *, manifest: dict[str, Any], sample_tokens: list[str],
                        head_state: dict[str, np.ndarray], run_teacher: RunTeacher, load_points: LoadPoints,
                        batch_size: int = 1, background_writer: bool = True, max_pending: int = 4,
                        threads: int | None = None, overwrite: bool = False, repair: bool = False,
                        command: str = "", progress: bool = True) -> ExtractionReport:
    """`extract_teacher_cache` across the ranks of an initialised torch.distributed process group."""
    import torch.distributed as dist

    started = time.perf_counter()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    path = StoreLocation.parse(path)
    lock = None
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            refuse_unusable(path, classify_store(path))
            path = path.resolved()
            lock = writer_lock(path, command=command).acquire()
            prepared = prepare_extraction(path, manifest, sample_tokens, head_state, overwrite, repair, progress)
            outcome = [("ok", path, prepared)]
        except DistillBEVError as exc:
            outcome = [("error", str(exc), None)]
    dist.broadcast_object_list(outcome, src=0)
    kind, found, prepared = outcome[0]
    try:
        if kind == "error":
            raise CacheError(found)
        path = found
        total = prepared.total
        if prepared.state == "complete":
            return ExtractionReport(str(path), prepared.state, v2.STATUS_COMPLETE, total, total, 0,
                                    time.perf_counter() - started, 0, checked=prepared.checked)
        pending = pending_sample_views(path)
        mine = rank_tasks(pending, rank, world_size)
        report = ExtractionReport(str(path), prepared.state, v2.STATUS_WRITING, total, total - len(pending), 0,
                                  0.0, 0, redone=prepared.redone, checked=prepared.checked)
        job = _WorkerJob(path, mine, list(sample_tokens), ViewConfig.from_json(manifest["views"]), run_teacher,
                         load_points, batch_size, background_writer, max_pending)
        error = None
        try:
            _run_jobs([job], report, mine, 1, threads, started, progress and rank == 0,
                      lock.still_held if lock is not None else None)
        except DistillBEVError as exc:
            error = f"rank {rank}: {exc}"
        outcomes: list[Any] = [None] * world_size
        dist.all_gather_object(outcomes, (error, report.written, report.raw_bytes, report.written_by))
        errors = [e for e, _, _, _ in outcomes if e]
        if errors:
            raise CacheError(f"{'; '.join(errors)}; the store stays 'writing': rerun the same command (with any "
                             f"number of ranks) to resume")
        report.written = sum(o[1] for o in outcomes)
        report.raw_bytes = sum(o[2] for o in outcomes)
        report.written_by = [(r, s, v) for r, o in enumerate(outcomes) for _, s, v in o[3]]
        final: list[Any] = [None]
        if rank == 0:
            try:
                finalize_store(path, sample_tokens)
                final = [None]
            except DistillBEVError as exc:
                final = [str(exc)]
        dist.broadcast_object_list(final, src=0)
        if final[0] is not None:
            raise CacheError(final[0])
    finally:
        if lock is not None:
            lock.release()
    report.status = v2.STATUS_COMPLETE
    report.seconds = time.perf_counter() - started
    return report
