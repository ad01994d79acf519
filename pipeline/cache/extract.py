"""The extraction engine: run the frozen teacher over every sample-view and fill a v2 store, resumably.

The teacher and the sample source are injected, so the engine runs the real CenterPoint teacher from the stage
and tiny fakes in tests:

    run_teacher(points_list: list[Tensor (P, 5)]) -> TeacherOutputs-like (features layer -> (B, C, Y, X),
        heatmap (B, 10, Yh, Xh) logits, occupancy (B, Y, X) bool)
    load_points(sample_index, bev_aug) -> (sample_token, points Tensor (P, 5) augmented by bev_aug[, inputs])

`inputs` (`data/digest.py::InputDigests`, optional) are the files the points were read from with the SHA-256 of
the bytes read; the writer records them per sample and refuses a sample-view read from other bytes than the
sample's earlier ones (`input_digest.py`).

With `workers=N` the pending samples are split into N contiguous runs, one forked process each; a process owns
whole samples, and every array has one chunk per sample-view, so two processes never write the same chunk.
Inside a process a bounded queue hands finished sample-views to a writer thread, overlapping compression and I/O
with the next teacher forward pass. A sample-view's done marker is written after all its chunks; after a crash the
same command re-checks the done sample-views, skips those that pass and rewrites the rest, giving the same bytes
as an uninterrupted run (given a deterministic teacher: same device, same thread count). Under torchrun,
`distributed.py` runs the same steps with one rank per process.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...cache_schemas import v2
from ..errors import CacheError
from ..geometry.bev import BEVAugmentation
from ..heads.center_head import clip_sigmoid
from .manifest import ViewConfig, layer_specs, view_augmentations
from .checks import Damage, damaged_sample_views
from .lease import status_check
from .location import StoreLocation
from .store import classify_store, refuse_unusable, writer_lock
from .state import read_done
from .writer import SampleViewRecord, SampleViewWriter, finalize_store, prepare_store, set_done, set_status

logger = logging.getLogger(__name__)

RunTeacher = Callable[[list[torch.Tensor]], Any]
LoadPoints = Callable[[int, BEVAugmentation], tuple]  # (token, points) or (token, points, InputDigests)
FLOAT16_MAX = 65504.0


def spatial_attention(features: torch.Tensor, temperature: float = v2.ATTENTION_TEMPERATURE) -> torch.Tensor:
    """DistillBEV spatial attention: (B, C, Y, X) -> (B, Y, X) float32 with mean 1 over Y*X.

    A = Y*X * softmax over all cells of (mean_c |F| / temperature), in float32 (fp16 sums overflow).
    """
    b, _, y, x = features.shape
    magnitude = features.float().abs().mean(dim=1).reshape(b, y * x)  # (B, Y*X)
    return (torch.softmax(magnitude / temperature, dim=1) * (y * x)).reshape(b, y, x)


def records_from_outputs(outputs: Any, tasks: list[tuple[int, int]], tokens: list[str],
                         manifest: dict[str, Any], inputs: list | None = None) -> list[SampleViewRecord]:
    """Split a batch of teacher outputs into per-sample-view records, refusing non-finite or misfit outputs.

    inputs: per task, the `InputDigests` of the files its points were read from (or None)."""
    layers = layer_specs(manifest)
    fp16 = manifest["storage"]["dtype"] == "fp16"
    expected = {layer.name: (layer.channels, *layer.shape) for layer in layers}
    expected[v2.HEATMAP] = (v2.HEATMAP_CHANNELS, *manifest["heatmap"]["shape"])
    expected[v2.OCCUPANCY] = tuple(manifest["occupancy"]["shape"])
    maps = {layer.name: outputs.features.get(layer.name) for layer in layers}
    maps[v2.HEATMAP] = outputs.heatmap
    maps[v2.OCCUPANCY] = outputs.occupancy
    for name, tensor in maps.items():
        if tensor is None:
            raise CacheError(f"teacher output has no layer {name!r} that the store holds; "
                             f"the --layers or the teacher config differ from the store's manifest")
        if tuple(tensor.shape) != (len(tasks), *expected[name]):
            raise CacheError(f"teacher output {name!r} has shape {tuple(tensor.shape)}, the store expects "
                             f"{(len(tasks), *expected[name])}; the teacher config differs from the store's manifest")
    attention = {layer.name: spatial_attention(maps[layer.name]) for layer in layers}
    heatmap = clip_sigmoid(outputs.heatmap.float())
    for b, (sample_index, view) in enumerate(tasks):
        for name in [layer.name for layer in layers] + [v2.HEATMAP]:
            values = maps[name][b]
            # one pass, no temporary: a NaN makes both extremes NaN, an infinity shows in one of them
            low, high = (float(v) for v in torch.aminmax(values.detach()))
            if not (math.isfinite(low) and math.isfinite(high)):
                count = int((~torch.isfinite(values)).sum())
                raise CacheError(f"teacher output {name!r} of sample {tokens[b]} (index {sample_index}, view {view}) "
                                 f"has {count} NaN/Inf values; check the teacher checkpoint and that sample's points")
            if fp16 and name != v2.HEATMAP and max(-low, high) > FLOAT16_MAX:
                raise CacheError(f"teacher output {name!r} of sample {tokens[b]} (view {view}) exceeds the float16 "
                                 f"range ({max(-low, high):.3g}); extract with --dtype int8")
    records = []
    for b, (sample_index, view) in enumerate(tasks):
        records.append(SampleViewRecord(
            sample_index=sample_index, view=view, sample_token=tokens[b],
            features={layer.name: maps[layer.name][b].detach().float().cpu().numpy() for layer in layers},
            heatmap=heatmap[b].detach().cpu().numpy(),
            attention={name: a[b].detach().cpu().numpy() for name, a in attention.items()},
            occupancy=outputs.occupancy[b].detach().bool().cpu().numpy(),
            inputs=None if inputs is None else inputs[b]))
    return records


class _BackgroundWriter:
    """A writer thread behind a bounded queue; its errors surface on the next `put` or on `close`."""

    def __init__(self, writer: SampleViewWriter, report: Callable[[SampleViewRecord], None], max_pending: int):
        self.writer, self.report = writer, report
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            record = self.queue.get()
            if record is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            try:
                self.writer.write(record)
                self.report(record)
            except BaseException as exc:  # surfaced in the producer thread
                self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, record: SampleViewRecord | None) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(record, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.put(None)
        self.thread.join()
        self._raise_if_failed()


@dataclass
class _WorkerJob:
    path: StoreLocation
    tasks: list[tuple[int, int]]  # (sample_index, view), sorted
    sample_tokens: list[str]
    views: ViewConfig
    run_teacher: RunTeacher
    load_points: LoadPoints
    batch_size: int
    background_writer: bool
    max_pending: int


def _run_worker(job: _WorkerJob, report: Callable[[SampleViewRecord], None],
                still_wanted: Callable[[], bool] | None = None, still_held: Callable[[], bool] | None = None) -> None:
    """Compute and write every task of one worker, in order (`SampleViewWriter` asks both checks)."""
    writer = SampleViewWriter(job.path, still_wanted=still_wanted, still_held=still_held)
    sink = _BackgroundWriter(writer, report, job.max_pending) if job.background_writer else None
    augmentations: dict[int, list[BEVAugmentation]] = {}
    try:
        for start in range(0, len(job.tasks), job.batch_size):
            batch = job.tasks[start:start + job.batch_size]
            tokens, clouds, inputs = [], [], []
            for sample_index, view in batch:
                if sample_index not in augmentations:
                    augmentations = {sample_index: view_augmentations(job.views, sample_index)}
                token, points, *read = job.load_points(sample_index, augmentations[sample_index][view])
                inputs.append(read[0] if read else None)
                if token != job.sample_tokens[sample_index]:
                    raise CacheError(f"sample {sample_index} of the dataset is {token!r} but the store expects "
                                     f"{job.sample_tokens[sample_index]!r}; the split or dataroot changed: "
                                     f"extract into a new --cache path or pass --overwrite")
                tokens.append(token)
                clouds.append(points)
            with torch.no_grad():
                outputs = job.run_teacher(clouds)
            for record in records_from_outputs(outputs, batch, tokens, writer.manifest, inputs):
                if sink is None:
                    writer.write(record)
                    report(record)
                else:
                    sink.put(record)
    finally:
        if sink is not None:
            sink.close()


def die_with_parent(parent_pid: int) -> Callable[[], bool]:
    """Make this forked process die when `parent_pid` does; returns a check that the parent is still there.

    Linux delivers SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere, and for the window before
    the prctl call, the returned check (the parent is still our parent) stops the writer before its next write.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the prctl call took effect
        os._exit(1)
    return lambda: os.getppid() == parent_pid


def _child_main(worker_id: int, job: _WorkerJob, messages: Any, threads: int, parent_pid: int,
                lock_held: Callable[[], bool] | None = None) -> None:
    """Entry point of a forked worker: reports progress, errors and completion through `messages`.

    It writes while its parent lives and (`lock_held`, the parent's lock check, inherited by the fork) the store's
    lock is still the parent's."""
    parent_alive = die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    try:
        _run_worker(job, lambda r: messages.put(("progress", worker_id, r.sample_index, r.view, r.nbytes)),
                    parent_alive, lock_held)
    except CacheError as exc:
        messages.put(("cache_error", worker_id, str(exc)))
        raise SystemExit(1)
    except BaseException:
        messages.put(("error", worker_id, traceback.format_exc()))
        raise SystemExit(1)
    messages.put(("finished", worker_id))


@dataclass
class ExtractionReport:
    """What one extraction call did.

    state: "created", "resumed", "repaired" (a complete store whose damaged sample-views were re-extracted) or
    "complete" (nothing to do). redone: sample-views marked done whose chunks failed their checks and were
    re-extracted. checked: "quick" or "crc" for a complete store. written_by: (worker, sample_index, view).
    """

    path: str
    state: str
    status: str
    total: int
    skipped: int
    written: int
    seconds: float
    raw_bytes: int
    written_by: list[tuple[int, int, int]] = field(default_factory=list)
    redone: list[tuple[int, int]] = field(default_factory=list)
    checked: str = ""


def split_tasks(pending: list[tuple[int, int]], workers: int) -> list[list[tuple[int, int]]]:
    """Split pending sample-views into at most `workers` contiguous runs of whole samples."""
    samples = sorted({s for s, _ in pending})
    parts = [part for part in np.array_split(np.array(samples, dtype=np.int64), max(1, workers)) if len(part)]
    owner = {int(s): i for i, part in enumerate(parts) for s in part}
    runs: list[list[tuple[int, int]]] = [[] for _ in parts]
    for sample_index, view in sorted(pending):
        runs[owner[sample_index]].append((sample_index, view))
    return runs


def _describe_damage(damage: dict, sample_tokens: list[str], limit: int = 3) -> str:
    items = sorted(damage.items())[:limit]
    text = "; ".join(f"sample {sample_tokens[s]} view {v} {found[0][0]}: {found[0][1]}" for (s, v), found in items)
    return text + (f" (and {len(damage) - limit} more)" if len(damage) > limit else "")


def extract_teacher_cache(path: str | Path | StoreLocation, *, manifest: dict[str, Any], sample_tokens: list[str],
                          head_state: dict[str, np.ndarray], run_teacher: RunTeacher, load_points: LoadPoints,
                          workers: int = 1, batch_size: int = 1, background_writer: bool = True,
                          max_pending: int = 4, threads_per_worker: int | None = None, overwrite: bool = False,
                          repair: bool = False, command: str = "", progress: bool = True,
                          check_store: Callable[[StoreLocation], None] | None = None) -> ExtractionReport:
    """Fill the store at `path` with every sample-view of `manifest`; resumes or repairs a store of the same manifest.

    The whole call holds the store's writer lock (a second extraction on the same store fails at once). Resume
    re-checks every sample-view marked done (chunks present, CRC32C) and redoes those that fail. On a complete
    store the chunks are checked for presence (quick), or with `repair` read and CRC-checked; damaged
    sample-views are re-extracted and the store is completed again under a new generation id, so a reader that
    opened the old one fails instead of mixing the two.

    workers=1 runs in this process; workers>1 forks that many processes (fork start method: the injected
    callables are inherited, not pickled; a CUDA teacher needs workers=1); they die with this process. Each
    worker computes with `threads_per_worker` torch threads (default: this process's threads // workers). CPU
    results depend on the thread count and batch composition, so a resumed or repaired store is bit-identical to
    an uninterrupted extraction when both use the same thread count and batch size. check_store: called with the
    store's location under its lock before anything is written; its error stops the run (the recipe refuses a
    resume with other compute settings there, `run.py`).
    """
    started = time.perf_counter()
    path = StoreLocation.parse(path)
    refuse_unusable(path, classify_store(path))
    path = path.resolved()
    if workers > 1 and not path.is_local:
        raise CacheError(f"{path}: --workers {workers} forks processes, and object-store clients do not survive a "
                         f"fork; extract with several processes under torchrun instead (torchrun --nproc-per-node "
                         f"{workers} -m distillbev.cli extract-teacher ...)")
    with writer_lock(path, command=command) as lock:
        if check_store is not None:
            check_store(path)
        prepared = prepare_extraction(path, manifest, sample_tokens, head_state, overwrite, repair, progress,
                                      status_check(lock))
        total = prepared.total
        if prepared.state == "complete":
            return ExtractionReport(str(path), prepared.state, v2.STATUS_COMPLETE, total, total, 0,
                                    time.perf_counter() - started, 0, checked=prepared.checked)
        pending = prepared.pending
        jobs = [_WorkerJob(path, run, list(sample_tokens), ViewConfig.from_json(manifest["views"]), run_teacher,
                           load_points, batch_size, background_writer, max_pending)
                for run in split_tasks(pending, workers)]
        report = ExtractionReport(str(path), prepared.state, v2.STATUS_WRITING, total, total - len(pending), 0, 0.0,
                                  0, redone=prepared.redone, checked=prepared.checked)
        _run_jobs(jobs, report, pending, workers, threads_per_worker, started, progress, still_held=lock.still_held)
        finalize_store(path, sample_tokens, still_held=status_check(lock))
    report.status = v2.STATUS_COMPLETE
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class PreparedStore:
    """A store ready for its workers: state "created" / "resumed" / "repaired" / "complete" (nothing to do).

    pending: the sample-views to extract, in order; redone: those among them that were marked done but failed
    their checks; checked: "quick" or "crc" for a store that was complete.
    """

    state: str
    total: int
    pending: list[tuple[int, int]] = field(default_factory=list)
    redone: list[tuple[int, int]] = field(default_factory=list)
    checked: str = ""


def prepare_extraction(path: StoreLocation, manifest: dict[str, Any], sample_tokens: list[str],
                       head_state: dict[str, np.ndarray], overwrite: bool, repair: bool,
                       progress: bool, still_held: Callable[[], bool] | None = None) -> PreparedStore:
    """Create or reopen the store (the caller holds its lock, whose check is `still_held`) and find every
    sample-view that must be (re)done.

    Resume re-checks (CRC) the sample-views marked done; a complete store is checked quick or, with `repair`, by
    CRC, and its damaged sample-views are marked not done under a new generation. Under torchrun the ranks run
    the same steps: rank 0 `prepare_store`, every rank `check_samples` on its share, rank 0 `settle`.
    """
    state = prepare_store(path, manifest, sample_tokens, head_state, overwrite=overwrite)
    share = check_samples(path, manifest, state, range(int(manifest["sample_count"])), repair, progress)
    return settle(path, manifest, state, share, sample_tokens, repair, still_held)


@dataclass
class SharePlan:
    """What `check_samples` found in some samples of a store: sample-views not marked done, and damaged ones."""

    not_done: list[tuple[int, int]] = field(default_factory=list)
    damage: Damage = field(default_factory=dict)

    def merged(self, other: "SharePlan") -> "SharePlan":
        return SharePlan(sorted(self.not_done + other.not_done), {**self.damage, **other.damage})


def check_samples(path: StoreLocation, manifest: dict[str, Any], state: str, samples: Sequence[int], repair: bool,
                  progress: bool) -> SharePlan:
    """The checks `prepare_extraction` runs on the sample-views of `samples` (a rank's share, or all of them).

    created: every sample-view is to do, nothing is read. resumed: the done markers are read in batches, and the
    sample-views marked done are CRC-checked. complete: every sample-view is checked quick (chunks present) or,
    with `repair`, by CRC.
    """
    views = range(int(manifest["views"]["count"]))
    if state == "created":
        return SharePlan([(s, v) for s in samples for v in views])
    if state == "complete":
        marked = [(s, v) for s in samples for v in views]
        not_done: list[tuple[int, int]] = []
    else:
        done = read_done(path, samples)
        marked = [(samples[i], int(v)) for i, v in zip(*np.nonzero(done))]
        not_done = [(samples[i], int(v)) for i, v in zip(*np.nonzero(~done))]
    full = repair or state != "complete"
    damage = damaged_sample_views(path.open_group(mode="r"), manifest, marked, full=full, progress=progress)
    return SharePlan(not_done, damage)


def settle(path: StoreLocation, manifest: dict[str, Any], state: str, plan: SharePlan, sample_tokens: list[str],
           repair: bool, still_held: Callable[[], bool] | None = None) -> PreparedStore:
    """Mark the damaged sample-views of `plan` (every share's, merged) not done and say what is left to extract.

    A damaged complete store gets status "writing" under a new generation first, so its readers stop. still_held:
    the writer lock's check (`lease.status_check`), asked right before those writes.
    """
    total = int(manifest["sample_count"]) * int(manifest["views"]["count"])
    redone = sorted(plan.damage)
    if state == "complete":
        checked = "crc" if repair else "quick"
        if not redone:
            logger.info("%s: complete (%d sample-views, every chunk %s); nothing to do", path, total,
                        "passed its CRC32C check" if repair else "present")
            return PreparedStore("complete", total, checked=checked)
        logger.warning("%s: %d damaged sample-views will be re-extracted: %s", path, len(redone),
                       _describe_damage(plan.damage, sample_tokens))
        set_status(path, v2.STATUS_WRITING, manifest_generation=True, still_held=still_held)
        set_done(path, redone, 0, still_held=still_held)
        return PreparedStore("repaired", total, redone, redone, checked)
    if redone:
        logger.warning("%s: %d sample-views marked done failed their checks and will be redone: %s", path,
                       len(redone), _describe_damage(plan.damage, sample_tokens))
        set_done(path, redone, 0, still_held=still_held)
    if state == "resumed":
        logger.info("%s: resuming, %d of %d sample-views already done", path,
                    total - len(plan.not_done) - len(redone), total)
    return PreparedStore(state, total, sorted(plan.not_done + redone), redone)


def _run_jobs(jobs: list[_WorkerJob], report: ExtractionReport, pending: list[tuple[int, int]], workers: int,
              threads_per_worker: int | None, started: float, progress: bool,
              still_wanted: Callable[[], bool] | None = None, still_held: Callable[[], bool] | None = None) -> None:
    """Run the workers' jobs in this process or in forked ones, with a progress bar fed by their reports.

    still_wanted: checked before each sample-view is written (in this process: e.g. a torchrun rank's fence on rank
    0's lock). still_held: the lock's check of the process holding it (inherited by forked workers), asked before
    each sample-view and right before its chunk and marker writes."""
    from tqdm import tqdm

    bar = tqdm(total=len(pending), unit="view", desc="extract-teacher", disable=not progress, smoothing=0.1)
    lock = threading.Lock()

    def on_written(worker_id: int, sample_index: int, view: int, nbytes: int) -> None:
        with lock:
            report.written += 1
            report.raw_bytes += nbytes
            report.written_by.append((worker_id, sample_index, view))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{report.raw_bytes / elapsed / 1e6:.1f} MB/s raw", refresh=False)
            bar.update(1)

    threads = threads_per_worker or max(1, torch.get_num_threads() // max(1, workers))
    previous_threads = torch.get_num_threads()
    try:
        if len(jobs) <= 1 or workers <= 1:
            torch.set_num_threads(threads)  # restored below: only this call computes with it
            for job in jobs:
                _run_worker(job, lambda r: on_written(0, r.sample_index, r.view, r.nbytes), still_wanted,
                            still_held)
        else:
            _run_processes(jobs, on_written, threads, still_held)
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()


def _run_processes(jobs: list[_WorkerJob], on_written: Callable[[int, int, int, int], None], threads: int,
                   lock_held: Callable[[], bool] | None = None) -> None:
    """Fork one process per job, relay their progress, and fail fast (stopping the others) on any error."""
    context = multiprocessing.get_context("fork")
    messages = context.Queue()
    processes = [context.Process(target=_child_main, args=(i, job, messages, threads, os.getpid(), lock_held),
                                 name=f"extract-worker-{i}", daemon=True) for i, job in enumerate(jobs)]
    for process in processes:
        process.start()
    finished: set[int] = set()
    try:
        while len(finished) < len(processes):
            try:
                message = messages.get(timeout=0.2)
            except queue.Empty:
                _check_alive(processes, finished, messages, on_written)
                continue
            _handle(message, finished, on_written)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()


def _handle(message: tuple, finished: set[int], on_written: Callable[[int, int, int, int], None]) -> None:
    kind, worker_id = message[0], message[1]
    if kind == "progress":
        on_written(worker_id, *message[2:])
    elif kind == "finished":
        finished.add(worker_id)
    elif kind == "cache_error":
        raise CacheError(message[2])
    else:
        raise RuntimeError(f"extraction worker {worker_id} failed:\n{message[2]}")


def _check_alive(processes: list, finished: set[int], messages: Any,
                 on_written: Callable[[int, int, int, int], None]) -> None:
    for worker_id, process in enumerate(processes):
        if worker_id in finished or process.exitcode is None or process.exitcode == 0:
            continue
        # a failing worker sends its error before exiting: read what is left before calling it a crash
        while True:
            try:
                _handle(messages.get(timeout=1.0), finished, on_written)
            except queue.Empty:
                break
        raise CacheError(f"extraction worker {worker_id} (pid {process.pid}) died with exit code "
                         f"{process.exitcode} (a negative code is the signal, e.g. -9 = killed, often out of "
                         f"memory); the store stays 'writing': rerun the same command to resume")
