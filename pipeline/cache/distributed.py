"""Teacher extraction under torchrun: every rank runs the teacher on its own samples, rank 0 owns the store.

    torchrun --standalone --nproc-per-node 2 -m distillbev.cli extract-teacher ... --cache STORE

First every rank proves that it would write the store rank 0 writes: the ranks' manifests (checkpoint SHA-256,
dataset fingerprint, teacher config, grid, layers, views, split and its token order) are gathered and compared, and
any difference stops every rank before anything is written, naming the rank, its host and the fields
(`identity_problems`). Rank 0 takes the store's writer lock for the whole run and creates or reopens the store
(`prepare_store`: metadata, static arrays and, for a new store, the zeroed done markers in batches). Every pass over the sample-views is split
between the ranks, so no rank waits in a collective for a pass over the whole store: rank r re-checks the
sample-views of samples r, r + W, ... (`check_samples`: done markers read in batches, CRC32C of those marked done on a
resume), rank 0 marks the damaged ones (gathered from all ranks) not done, and the pending sample-views are dealt out
whole sample by whole sample (the i-th pending sample to rank i mod W), so ranks never share a chunk and a resume
with a lopsided remainder is balanced again. After extracting, each rank checks its own share of the store
(`verify_samples`: markers set, chunks present, markers fsync'ed), and rank 0 finalizes from the gathered results.
The other ranks are fenced by rank 0's lock: before each sample-view they read the lock object and stop once it
no longer names rank 0's holder, its lease has expired, or (same host) rank 0 has died (`holder_fence`). An error on
any rank reaches every rank as a CacheError at the next collective. The store equals a single-process
extraction's byte for byte when the ranks compute with the same thread count, and a run killed at any point resumes
with any number of ranks (or none). Ranks replace `--workers`: each rank extracts in its own process.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...cache_schemas import v2
from ..errors import CacheError, DistillBEVError
from .extract import (ExtractionReport, LoadPoints, RunTeacher, SharePlan, _run_jobs, _WorkerJob, check_samples,
                      settle)
from .manifest import ViewConfig, manifest_diff, tokens_sha256
from .lease import status_check
from .location import StoreLocation
from .store import _process_start_time, classify_store, refuse_unusable, writer_lock
from .writer import ShareCheck, finalize_store, prepare_store, verify_samples


def rank_tasks(pending: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The sample-views of rank `rank`: those of the i-th pending sample for i = rank, rank + W, ... (whole samples,
    in order; the ranks' counts differ by at most one sample)."""
    samples = sorted({s for s, _ in pending})
    mine = set(samples[rank::world_size])
    return [(s, v) for s, v in sorted(pending) if s in mine]


def check_share(rank: int, world_size: int, sample_count: int) -> range:
    """The samples rank `rank` checks before and after extracting: rank, rank + W, ..."""
    return range(rank, sample_count, world_size)


def rank_identity(manifest: dict[str, Any], sample_tokens: list[str]) -> dict[str, Any]:
    """What a rank would write: its host, its manifest and its split's tokens (compared across ranks)."""
    return {"host": socket.gethostname(), "manifest": manifest, "tokens_sha256": tokens_sha256(sample_tokens)}


def identity_problems(identities: list[dict[str, Any]]) -> list[str]:
    """One line per rank whose store would differ from rank 0's (`rank_identity` of every rank, in rank order).

    Node-local copies that differ (a stale checkpoint, another split file, an edited config) would otherwise write
    other features under rank 0's manifest, which no later check could tell apart.
    """
    first, problems = identities[0], []
    for rank, found in enumerate(identities[1:], start=1):
        diff = manifest_diff(first["manifest"], found["manifest"])
        if found["tokens_sha256"] != first["tokens_sha256"] and not diff:
            diff = [f"sample tokens (sha256): {first['tokens_sha256'][:12]} -> {found['tokens_sha256'][:12]}"]
        if diff:
            problems.append(f"rank {rank} on {found['host']} would write another store than rank 0 on "
                            f"{first['host']} (rank 0 -> rank {rank}: {'; '.join(diff)})")
    if problems:
        problems[-1] += ("; every rank must run with the same checkpoint, dataroot content, config, split and views "
                         "(node-local copies must be identical); nothing was written")
    return problems


def holder_fence(location: StoreLocation, holder: dict[str, Any]) -> Callable[[], bool]:
    """A check, run by a rank other than 0 before each sample-view, that rank 0 still holds the store's lock.

    `holder` is what rank 0's lock records (`lock.holder()`). The check reads the lock object: it must still name
    that holder (the lease's `owner`, or the lock file's host, pid and start), a lease must not have expired, and a
    local holder on this host must still be alive. So when rank 0 loses its lease (expired, or taken over), dies,
    or releases the lock, every rank stops within one sample-view.
    """
    keys = ("owner",) if "owner" in holder else ("host", "pid", "pid_start", "since")

    def still_wanted() -> bool:
        try:
            current = json.loads(location.get(v2.LOCK_FILE) or b"null")
        except ValueError:
            return False
        if not isinstance(current, dict) or any(current.get(key) != holder.get(key) for key in keys):
            return False
        if "expires_at" in current and not float(current["expires_at"]) > time.time():
            return False
        if "owner" not in holder and holder.get("host") == socket.gethostname():
            return _process_start_time(int(holder["pid"])) == holder.get("pid_start")
        return True

    return still_wanted


def _gather(value: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def _raise_any(errors: list[str | None], resume_hint: bool) -> None:
    found = [e for e in errors if e]
    if found:
        hint = "; the store stays 'writing': rerun the same command (with any number of ranks) to resume"
        raise CacheError("; ".join(found) + (hint if resume_hint else ""))


def extract_distributed(path: str | Path | StoreLocation, *, manifest: dict[str, Any], sample_tokens: list[str],
                        head_state: dict[str, np.ndarray], run_teacher: RunTeacher, load_points: LoadPoints,
                        batch_size: int = 1, background_writer: bool = True, max_pending: int = 4,
                        threads: int | None = None, overwrite: bool = False, repair: bool = False,
                        command: str = "", progress: bool = True,
                        check_store: Callable[[StoreLocation], None] | None = None) -> ExtractionReport:
    """`extract_teacher_cache` across the ranks of an initialised torch.distributed process group.

    Only the store's URL travels between ranks (each rank opens it with its own storage options and credentials);
    a rank given another --cache is refused. check_store: run by rank 0 under the store's lock before anything is
    written; its error reaches every rank.
    """
    import torch.distributed as dist

    started = time.perf_counter()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    path = StoreLocation.parse(path)
    # every rank proves that it would write what rank 0 writes, before anything is written
    _raise_any(identity_problems(_gather(rank_identity(manifest, sample_tokens), world_size)), resume_hint=False)
    lock = None
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            refuse_unusable(path, classify_store(path))
            path = path.resolved()
            lock = writer_lock(path, command=command).acquire()
            if check_store is not None:
                check_store(path)
            state = prepare_store(path, manifest, sample_tokens, head_state, overwrite=overwrite)
            outcome = [("ok", str(path), state, lock.holder() or {})]
        except DistillBEVError as exc:
            outcome = [("error", str(exc), None, None)]
    dist.broadcast_object_list(outcome, src=0)
    kind, found, state, holder = outcome[0]
    try:
        if kind == "error":
            raise CacheError(found)
        if rank != 0:
            path = path.resolved()
            if str(path) != found:
                raise CacheError(f"rank {rank}: --cache is {path}, rank 0's is {found}; every rank must write the "
                                 f"same store")
        samples = int(manifest["sample_count"])
        share = check_share(rank, world_size, samples)
        plan, error = SharePlan(), None
        try:
            plan = check_samples(path, manifest, state, share, repair, progress and rank == 0)
        except DistillBEVError as exc:
            error = f"rank {rank}: {exc}"
        plans = _gather((error, plan), world_size)
        _raise_any([e for e, _ in plans], resume_hint=False)
        merged = SharePlan()
        for _, part in plans:
            merged = merged.merged(part)
        settled: list[Any] = [None]
        if rank == 0:
            try:
                settled = [settle(path, manifest, state, merged, sample_tokens, repair, status_check(lock))]
            except DistillBEVError as exc:
                settled = [str(exc)]
        dist.broadcast_object_list(settled, src=0)
        if isinstance(settled[0], str):
            raise CacheError(settled[0])
        prepared = settled[0]
        total = prepared.total
        if prepared.state == "complete":
            return ExtractionReport(str(path), prepared.state, v2.STATUS_COMPLETE, total, total, 0,
                                    time.perf_counter() - started, 0, checked=prepared.checked)
        pending = prepared.pending
        mine = rank_tasks(pending, rank, world_size)
        report = ExtractionReport(str(path), prepared.state, v2.STATUS_WRITING, total, total - len(pending), 0,
                                  0.0, 0, redone=prepared.redone, checked=prepared.checked)
        job = _WorkerJob(path, mine, list(sample_tokens), ViewConfig.from_json(manifest["views"]), run_teacher,
                         load_points, batch_size, background_writer, max_pending)
        error, check = None, ShareCheck(0)
        try:
            # rank 0 asks its own lock (before each sample-view and each write); the others, rank 0's lock object
            _run_jobs([job], report, mine, 1, threads, started, progress and rank == 0,
                      still_wanted=None if lock is not None else holder_fence(path, holder),
                      still_held=lock.still_held if lock is not None else None)
        except DistillBEVError as exc:
            error = f"rank {rank}: {exc}"
        outcomes = _gather((error, report.written, report.raw_bytes, report.written_by), world_size)
        _raise_any([o[0] for o in outcomes], resume_hint=True)
        try:
            check = verify_samples(path, manifest, share)
        except DistillBEVError as exc:
            error = f"rank {rank}: {exc}"
        checks = _gather((error, check), world_size)
        _raise_any([e for e, _ in checks], resume_hint=True)
        report.written = sum(o[1] for o in outcomes)
        report.raw_bytes = sum(o[2] for o in outcomes)
        report.written_by = [(r, s, v) for r, o in enumerate(outcomes) for _, s, v in o[3]]
        final: list[Any] = [None]
        if rank == 0:
            merged_check = ShareCheck(0)
            for _, part in checks:
                merged_check = merged_check.merged(part)
            try:
                finalize_store(path, sample_tokens, check=merged_check, still_held=status_check(lock))
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
