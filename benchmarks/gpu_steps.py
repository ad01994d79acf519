"""Step time and peak device memory of every training stage at the paper's full shapes, on one device.

    python benchmarks/gpu_steps.py --device cuda [--out FILE] [--steps 3] [--warmup 1] [--workers N] [--budget-s S]
    python benchmarks/gpu_steps.py --device cpu --tiny      # the CPU self-check of scripts/gpu_check.sh --dry-run

`scripts/gpu_check.sh` runs it on a machine with one GPU. It prints one markdown table (and writes it to `--out`
after every row, so a run cut short by a time limit still leaves the rows it finished):

- **teacher step**: `configs/nuscenes/teacher_pillar02.yaml` at its batch (4), ~250k points per sample (9 sweeps and
  the key frame), one `pipeline/teacher/train.py` `train_step` (forward, CenterHead loss, backward, clipping, AdamW);
- **extraction**: the same teacher in eval mode, one sample-view per forward (`extract-teacher`'s default batch),
  then `records_from_outputs` (attention, heatmap, checks, the copy to the host) and the int8 `SampleViewWriter`
  (quantisation, zstd, CRC, fsync). Views/s counts the teacher side; the stage overlaps the write with the next
  forward in a background thread, so the write's seconds per view are reported beside it. The stores written here
  (random teachers, identity views) are the cached targets of the student rows;
- **students**, each in its config's arithmetic (`train.precision`, `train.channels_last`), baseline vs cached vs
  online: BEVDet-R50 (`student_bevdet.yaml`, 256x704, batch 8), BEVDepth4D-R50 (`student_bevdepth4d.yaml`, 256x704
  with the previous frame, batch 8) and BEVFormer-R50 (`student_bevformer.yaml`, 928x1600 with the previous frame,
  batch 1; its teacher `teacher_pillar02_detr.yaml`). A step is what `run_epochs` does: wait for the DataLoader,
  copy the batch and targets to the device, `training_step`, backward, gradient clipping, AdamW. The inputs are
  random tensors of the real shapes (`common.FullShapeDataset`: images drawn, not decoded; ~30k key-frame points for
  the student's depth targets, ~250k for the online teacher); the cached mode reads the int8 store through
  DataLoader workers, which also compute the loss's student-independent inputs, as `train-student` does.

Timings synchronise the device before each reading (CUDA kernels run asynchronously); peak memory is
`torch.cuda.max_memory_allocated` since the row began (reset before its models are built), or on a CPU the peak
resident memory of this process (DataLoader workers excluded). A row that runs out of device memory is reported as
such and the next row runs. `--tiny` swaps in the small synthetic configs (configs/synthetic/) with fewer points, the
batch of each config and one step per row, to check the script itself in a minute or two on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from common import FullShapeDataset, lidar_like_points, machine_header, mean_and_spread
from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.extract import records_from_outputs
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.writer import SampleViewWriter, finalize_store, prepare_store
from distillbev.pipeline.config import load_config, to_dict
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import build_distill_loss
from distillbev.pipeline.distill.targets import DistillationDataset, collate_with_targets, step_precompute
from distillbev.pipeline.distill.train import DistillationSetup, training_step
from distillbev.pipeline.precision import resolve_precision, set_memory_format
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.pipeline.teacher.train import build_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.gpu_steps")

MODES = (("baseline", "none"), ("cached", "cache"), ("online", "online"))  # row label -> DistillationDataset mode


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """One student of the table: its config and the teacher whose targets it distils."""

    name: str
    config: str  # relative to the repository
    teacher: str  # relative to the repository
    batch_size: int | None = None  # None: the config's train.batch_size


@dataclasses.dataclass(frozen=True)
class ShapeSet:
    """What the rows run on: the paper's full shapes, or the small synthetic configs of the self-check."""

    teacher: str  # the teacher of the teacher-step row
    students: tuple[StudentSpec, ...]
    teacher_points: int  # points per sample of the teacher (train step, extraction, online targets)
    student_points: int  # key-frame points per sample that the student's depth targets read
    label: str


FULL = ShapeSet(
    teacher="configs/nuscenes/teacher_pillar02.yaml",
    students=(StudentSpec("BEVDet-R50", "configs/nuscenes/student_bevdet.yaml",
                          "configs/nuscenes/teacher_pillar02.yaml"),
              StudentSpec("BEVDepth4D-R50", "configs/nuscenes/student_bevdepth4d.yaml",
                          "configs/nuscenes/teacher_pillar02.yaml"),
              StudentSpec("BEVFormer-R50", "configs/nuscenes/student_bevformer.yaml",
                          "configs/nuscenes/teacher_pillar02_detr.yaml")),
    teacher_points=250_000, student_points=30_000,
    label="the paper's full shapes (configs/nuscenes/)")
TINY = ShapeSet(
    teacher="configs/synthetic/teacher.yaml",
    students=(StudentSpec("BEVDet (small)", "configs/synthetic/student_bevdet.yaml", "configs/synthetic/teacher.yaml"),
              StudentSpec("BEVDepth4D (small)", "configs/synthetic/student_bevdepth4d.yaml",
                          "configs/synthetic/teacher.yaml"),
              StudentSpec("BEVFormer (small)", "configs/synthetic/student_bevformer.yaml",
                          "configs/synthetic/teacher_detr.yaml", batch_size=1)),
    teacher_points=20_000, student_points=5_000,
    label="the small synthetic configs (configs/synthetic/), a self-check of this script, not a measurement")


class DeviceClock:
    """Wall time and peak memory on one device. CUDA kernels run asynchronously: every reading synchronises first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        """Start a row: free what earlier rows left, then restart the high-water mark."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: reset VmHWM to the current resident size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 2**20
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    @property
    def memory_label(self) -> str:
        return "peak GPU memory GiB (allocated)" if self.cuda else "peak RSS GiB (this process)"


@dataclasses.dataclass
class Row:
    """One line of the table."""

    stage: str
    config: str
    batch: int
    mode: str
    seconds: list[float] = dataclasses.field(default_factory=list)  # per timed step (extraction: per view)
    data_wait: list[float] = dataclasses.field(default_factory=list)  # seconds blocked on the DataLoader per step
    peak_gib: float | None = None
    note: str = ""
    failed: bool = False  # an error other than running out of memory (a bug, not a measurement)

    @property
    def mean(self) -> float | None:
        return mean_and_spread(self.seconds)[0] if self.seconds else None


def run_row(row: Row, clock: DeviceClock, body: Callable[[Row], None]) -> Row:
    """Run `body(row)` with the peak memory reset first; out of device memory and other errors end up in the row."""
    clock.reset_peak()
    message = None
    try:
        body(row)
    except torch.OutOfMemoryError as exc:
        message = "out of memory: " + str(exc).strip().splitlines()[0][:160]
    except Exception as exc:  # noqa: BLE001 - reported in the table, the next row still runs
        log.exception("%s %s failed", row.stage, row.mode)
        text = str(exc).strip()
        message = f"failed: {type(exc).__name__}" + (f": {text.splitlines()[0][:160]}" if text else "")
        row.failed = True
    if message is not None:
        row.note = f"{message}; {row.note}" if row.note else message
    row.peak_gib = clock.peak_gib()
    gc.collect()  # the frames of a failed row hold tensors until collected
    if clock.cuda:
        torch.cuda.empty_cache()
    return row


def teacher_config(path: str) -> TeacherExperimentConfig:
    return load_config(TeacherExperimentConfig, REPO / path)


def random_samples(data_config, count: int, points: int, previous_frame: bool = False) -> FullShapeDataset:
    """`count` samples of random values at `data_config`'s shapes (common.FullShapeDataset)."""
    return FullShapeDataset(data_config, count, points, previous_frame)


# ------------------------------------------------------------------------------------------------- teacher rows
def teacher_step(row: Row, cfg: TeacherExperimentConfig, device: torch.device, clock: DeviceClock, points: int,
                 warmup: int, steps: int) -> None:
    """`train_step` of the teacher at its config's batch, on one batch drawn and moved to the device beforehand (the
    step without its data loading)."""
    precision = resolve_precision(cfg.train.precision, device)[0]
    torch.manual_seed(0)
    model = set_memory_format(CenterPointTeacher(cfg.model).to(device), cfg.train.channels_last)
    optimizer = build_optimizer(model, cfg.train)
    data = random_samples(cfg.data, row.batch, points)
    samples = [data.get(index) for index in range(row.batch)]
    batch = ([s.points.to(device) for s in samples], [s.gt_boxes.to(device) for s in samples],
             [s.gt_labels.to(device) for s in samples])
    row.note = f"{precision}, {points // 1000}k points per sample, the batch on the device beforehand"
    for step in range(warmup + steps):
        started = clock.now()
        train_step(model, *batch, optimizer, cfg.train.grad_clip, precision)
        if step >= warmup:
            row.seconds.append(clock.now() - started)


def extraction(row: Row, cfg: TeacherExperimentConfig, layers: list[str], store: Path, device: torch.device,
               clock: DeviceClock, points: int, samples: int) -> None:
    """The teacher over `samples` sample-views (one per forward, view 0) into an int8 store at `store`; the first
    view is the warm-up. The store is complete afterwards (the cached targets of the student rows)."""
    torch.manual_seed(0)
    model = CenterPointTeacher(cfg.model).to(device).eval()
    canvas = cfg.model.canvas_grid
    shapes, channels = model.feature_shapes, model.feature_channels
    specs = [LayerSpec(name, channels[name], shapes[name], (canvas.x_max - canvas.x_min) / shapes[name][1],
                       canvas.num_x / shapes[name][1]) for name in layers]
    tokens = [f"full-shape-{index}" for index in range(samples)]  # FullShapeDataset's tokens
    manifest = build_manifest(
        teacher_config=to_dict(cfg.model), checkpoint_path="random", checkpoint_sha256="", grid=canvas, layers=specs,
        heatmap_shape=cfg.model.head_grid.shape, occupancy_shape=canvas.shape, dtype="int8",
        views=ViewConfig(count=1), sample_tokens=tokens, int8_error=v2.DEFAULT_INT8_ERROR,
        dataset={"dataroot": "", "version": "random", "split": "bench", "num_sweeps": cfg.data.num_sweeps,
                 "fingerprint": "", "point_loading": {}})
    prepare_store(store, manifest, tokens, {}, overwrite=True)
    writer = SampleViewWriter(store)
    rng = np.random.default_rng(0)
    half_extent = cfg.model.point_cloud_range[3]
    clouds = [torch.from_numpy(lidar_like_points(rng, points, half_extent)) for _ in range(samples)]
    writes = []
    for index, cloud in enumerate(clouds):
        started = clock.now()
        with torch.no_grad():
            outputs = model([cloud.to(device)])
        (record,) = records_from_outputs(outputs, [(index, 0)], [tokens[index]], manifest)
        computed = clock.now()
        writer.write(record)
        written = time.perf_counter()
        if index > 0:
            row.seconds.append(computed - started)
            writes.append(written - computed)
    finalize_store(store, tokens)
    write_mean = mean_and_spread(writes)[0] if writes else float("nan")
    row.note = (f"teacher forward + targets to the host; the int8 write adds {write_mean:.3f} s/view in the "
                f"stage's background thread; layers {','.join(layers)}; {points // 1000}k points")


# ------------------------------------------------------------------------------------------------- student rows
def teacher_layers(cfg: StudentExperimentConfig) -> list[str]:
    """The teacher layers the student's distillation pairs read, sorted."""
    return sorted({pair.teacher for pair in cfg.distill.layers})


def student_step(row: Row, cfg: StudentExperimentConfig, mode: str, teacher_cfg: TeacherExperimentConfig,
                 store: Path, device: torch.device, clock: DeviceClock, shapes: ShapeSet, samples: int,
                 workers: int, warmup: int, steps: int) -> None:
    """One mode of one student: built afresh, `warmup` + `steps` steps as `run_epochs` takes them."""
    cache = TeacherCache.open(store)
    torch.manual_seed(0)
    student = set_memory_format(build_student(cfg.model).to(device), cfg.train.channels_last)
    distill_loss = None if mode == "none" else build_distill_loss(cfg, student, cache.manifest["layers"]).to(device)
    teacher = None
    if mode == "online":  # a random teacher of the cache's architecture, frozen, run inside the step
        teacher = CenterPointTeacher(teacher_cfg.model).to(device).eval().requires_grad_(False)
    setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=teacher,
                              layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers],
                              precision=cfg.train.precision)
    points = shapes.teacher_points if mode == "online" else shapes.student_points
    bev = cfg.model.bev
    train_set = DistillationDataset(
        random_samples(cfg.data, samples, points, cfg.model.is_temporal), mode=mode,
        cache=cache if mode == "cache" else None, bev_extent=(bev.x_min, bev.x_max, bev.y_min, bev.y_max),
        indices=[position % samples for position in range((warmup + steps) * row.batch)],
        precompute=None if distill_loss is None else step_precompute(distill_loss, cfg.model.head, cfg.model.head.grid))
    loader = DataLoader(train_set, batch_size=row.batch, shuffle=False, drop_last=True, num_workers=workers,
                        collate_fn=collate_with_targets, pin_memory=clock.cuda,
                        multiprocessing_context=train_set.worker_start_method if workers else None)
    params = list(student.parameters()) + ([] if distill_loss is None else list(distill_loss.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    student.train()
    row.note = (f"{setup.precision}{', channels_last' if cfg.train.channels_last else ''}; "
                f"{workers} DataLoader worker(s); {points // 1000}k points per sample")
    iterator = iter(loader)
    try:
        for step in range(warmup + steps):
            started = clock.now()
            batch, targets = next(iterator)
            waited = time.perf_counter() - started
            batch = batch.to(device)
            targets = None if targets is None else targets.to(device)
            losses = training_step(setup, batch, targets, cfg.model.head.grid)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            if step >= warmup:
                row.seconds.append(clock.now() - started)
                row.data_wait.append(waited)
    finally:
        del iterator  # stops the workers


# ------------------------------------------------------------------------------------------------- the table
def table(rows: list[Row], memory_label: str) -> list[str]:
    lines = [f"| stage | config | batch | mode | step s (mean ± sd) | step / baseline | samples/s | data wait s "
             f"| {memory_label} | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    baselines = {row.stage: row.mean for row in rows if row.mode == "baseline" and row.mean}
    for row in rows:
        if row.seconds:
            mean, spread = mean_and_spread(row.seconds)
            step = f"{mean:.3f} ± {spread:.3f}"
            per = 1 if row.mode == "extract" else row.batch
            rate = f"{per / mean:.2f}" + (" views/s" if row.mode == "extract" else "")
            ratio = f"{mean / baselines[row.stage]:.2f}x" if row.stage in baselines else "–"
        else:
            step, rate, ratio = "–", "–", "–"
        wait = f"{mean_and_spread(row.data_wait)[0]:.3f}" if row.data_wait else "–"
        peak = f"{row.peak_gib:.2f}" if row.peak_gib is not None else "–"
        lines.append(f"| {row.stage} | {row.config} | {row.batch} | {row.mode} | {step} | {ratio} | {rate} | {wait} "
                     f"| {peak} | {row.note} |")
    return lines


def device_header(device: torch.device) -> str:
    if device.type != "cuda":
        return f"device {device} (no GPU: timings and memory are the CPU's)"
    properties = torch.cuda.get_device_properties(device)
    return (f"device {device}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, compute capability "
            f"{properties.major}.{properties.minor}, CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}, cudnn.benchmark {torch.backends.cudnn.benchmark}")


def shared_memory_note() -> str:
    """Free space of /dev/shm, through which DataLoader workers hand their batches over (a container's default of
    64 MB fails the student rows)."""
    try:
        return f"/dev/shm {shutil.disk_usage('/dev/shm').free / 2**30:.1f} GiB free"
    except OSError:
        return "/dev/shm not found"


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r}: not a torch device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
                             f"{torch.version.cuda}); run on a GPU machine or pass --device cpu --tiny")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true",
                        help="the small synthetic configs, one step per row: a self-check of this script")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 3, --tiny 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (cuDNN autotuning, allocator)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the student rows (default: on CUDA min(8, cores - 2), on a "
                             "CPU 0)")
    parser.add_argument("--students", default=None,
                        help="comma-separated subset of the student names (default: all of the shape set)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no row after this many seconds (the rows left are listed as not run)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="leave torch.backends.cudnn.benchmark off (default on: fixed shapes, tuned in warm-up)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="scratch folder for the stores (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here, after every row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = check_device(args.device)
    clock = DeviceClock(device)
    if clock.cuda and not args.no_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    shapes = TINY if args.tiny else FULL
    steps = args.steps if args.steps is not None else (1 if args.tiny else 3)
    workers = args.workers if args.workers is not None else (min(8, max(1, (os.cpu_count() or 2) - 2))
                                                             if clock.cuda else 0)
    students = list(shapes.students)
    if args.students:
        wanted = [name.strip() for name in args.students.split(",") if name.strip()]
        unknown = set(wanted) - {spec.name for spec in students}
        if unknown:
            raise SystemExit(f"--students: unknown {sorted(unknown)}; expected names among "
                             f"{[spec.name for spec in students]}")
        students = [spec for spec in students if spec.name in wanted]
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="gpu_steps_", dir=args.dir))
    rows: list[Row] = []
    header = ["## Training steps on one device: teacher, extraction, students (baseline / cached / online)", "",
              machine_header(), "", f"{device_header(device)}; {shared_memory_note()}", "",
              f"Shapes: {shapes.label}; {steps} timed step(s) per row after {args.warmup} warm-up step(s); see "
              "benchmarks/gpu_steps.py for what each row times.", ""]

    def emit() -> None:
        text = "\n".join(header + table(rows, clock.memory_label)) + "\n"
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)

    def within_budget(row: Row) -> bool:
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            row.note = f"not run: the {args.budget_s:.0f} s budget was spent"
            rows.append(row)
            emit()
            return False
        return True

    def add(row: Row, body: Callable[[Row], None]) -> None:
        if within_budget(row):
            log.info("row: %s %s (batch %d)", row.stage, row.mode, row.batch)
            rows.append(run_row(row, clock, body))
            emit()

    try:
        teacher = teacher_config(shapes.teacher)
        add(Row("teacher step", Path(shapes.teacher).name, teacher.train.batch_size, "train"),
            lambda row: teacher_step(row, teacher, device, clock, shapes.teacher_points, args.warmup, steps))
        # one int8 store per teacher, holding the layers of every student that distils it
        configs = {spec.name: load_config(StudentExperimentConfig, REPO / spec.config) for spec in students}
        batches = {spec.name: spec.batch_size or configs[spec.name].train.batch_size for spec in students}
        stores: dict[str, Path] = {}
        for path in dict.fromkeys(spec.teacher for spec in students):
            users = [spec for spec in students if spec.teacher == path]
            layers = sorted({layer for spec in users for layer in teacher_layers(configs[spec.name])})
            samples = max(3, *(batches[spec.name] for spec in users))  # a batch of distinct samples, 1 warm-up view
            store = folder / f"{Path(path).stem}.zarr"
            row = Row("extraction", Path(path).name, 1, "extract")
            add(row, lambda row, path=path, layers=layers, store=store, samples=samples: extraction(
                row, teacher_config(path), layers, store, device, clock, shapes.teacher_points, samples))
            if not row.failed and row.seconds:
                stores[path] = store
        for spec in students:
            cfg = configs[spec.name]
            for label, mode in MODES:
                row = Row(spec.name, Path(spec.config).name, batches[spec.name], label)
                if spec.teacher not in stores:
                    row.note = "not run: its teacher's store was not written"
                    rows.append(row)
                    emit()
                    continue
                samples = max(3, batches[spec.name])
                add(row, lambda row, cfg=cfg, mode=mode, spec=spec, samples=samples: student_step(
                    row, cfg, mode, teacher_config(spec.teacher), stores[spec.teacher], device, clock, shapes,
                    samples, workers, args.warmup, steps))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    emit()
    print("\n".join(header + table(rows, clock.memory_label)))
    if args.out is not None:
        print(f"\nwritten to {args.out}")
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
