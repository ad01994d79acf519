"""Cost of one student training step: no distillation, DistillBEV with cached targets, DistillBEV with a live teacher.

    OMP_NUM_THREADS=1 python benchmarks/train.py [--student bevdet|bevformer] [--steps 5] [--shapes small,full]
        [--full-steps 2] [--modes baseline,cached,online] [--out FILE]

Per shape it prints a markdown table: the mean wall time of a step (DataLoader wait + forward + losses + backward +
gradient clipping + AdamW, after `--warmup` steps) for (a) the baseline student, (b) the student with targets read
from a zarr cache by DataLoader workers and the DistillBEV loss, (c) the student with the frozen teacher run under
no_grad inside the step (same loss); the share of the step spent blocked on the DataLoader iterator; and the
cached / online ratio. It ends with the approximate-mode gap (`warp.py`): per-layer cosine between the identity
view's cached maps warped into an augmentation and the teacher run on the augmented cloud.

- small: configs/synthetic/student_bevdet.yaml + teacher.yaml (--student bevformer: student_bevformer.yaml +
  teacher_detr.yaml, the CenterPoint teacher with a DETR decoder) on a generated synthetic dataroot, a two-view
  cache of the student's teacher layers extracted by `extract-teacher` from a randomly initialised teacher (timing
  needs no trained weights);
- full: configs/nuscenes/student_bevdepth4d.yaml (--student bevformer: student_bevformer.yaml, 928x1600 images)
  + teacher_pillar02.yaml (bevformer: teacher_pillar02_detr.yaml) on synthetic tensors of the real shapes (B=1, 6
  cameras plus the previous frame, ~250k points for the teacher, ~30k key-frame points for the student's depth
  targets) and a cache written at the teacher's full layer shapes for 3 samples.
The modes run interleaved: `--rounds` rounds, each building every mode afresh (student, loss, optimiser, DataLoader)
and timing its warm-up + steps, the mode order rotated from round to round, so a slow spell of the shared machine
spreads over the modes. Each table gives, per mode, the peak resident memory of the training process while that mode
ran (Linux VmHWM, reset through /proc/self/clear_refs before the mode is built; DataLoader workers excluded) and the
same peak above the resident memory at the mode's start (what the mode's student, loss, optimiser and steps add).
Every mode trains in the student config's arithmetic (`train.precision`, `train.channels_last`): bf16 with
channels_last for the synthetic bevdet configs, float32 for the nuScenes ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import ctypes
import gc
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.data import DataLoader

from common import FullShapeDataset, machine_header, mean_and_spread, write_random_cache
from distillbev.pipeline.cache.manifest import LayerSpec
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.config import dump_config, from_dict, load_config, to_dict
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import build_distill_loss, live_teacher
from distillbev.pipeline.distill.targets import DistillationDataset, collate_with_targets
from distillbev.pipeline.distill.train import DistillationSetup, training_step
from distillbev.pipeline.distill.warp import warp_bev
from distillbev.pipeline.geometry.bev import BEVAugmentation
from distillbev.pipeline.precision import set_memory_format
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset
from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherModelConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.stages.extract_teacher import command as extract_command

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.train")


@dataclasses.dataclass
class ShapeSetup:
    """What the three modes of one shape share."""

    description: str
    note: str
    cfg: StudentExperimentConfig
    teacher: torch.nn.Module  # frozen, for the online mode
    teacher_layers: dict[str, dict]  # cache manifest `layers`: name -> channels, shape
    cache_path: Path
    dataset_for: Callable[[str], object]  # targets mode -> the dataset DistillationDataset wraps
    batch_size: int
    workers: int
    warmup: int
    steps: int
    teacher_config: TeacherExperimentConfig | None = None  # small shapes: the random teacher and its checkpoint
    checkpoint: Path | None = None

    def make_student(self) -> torch.nn.Module:
        return build_student(self.cfg.model)


def extract_cache(teacher_cfg: TeacherExperimentConfig, checkpoint: Path, folder: Path, dataroot: Path,
                  views: int, layers: list[str]) -> Path:
    """Run `extract-teacher` (its default storage dtype) for the teacher `layers` on the synth_train split; returns
    the store path."""
    config_path = folder / "teacher.yaml"
    dump_config(teacher_cfg, config_path)
    cache_path = folder / f"cache_{checkpoint.stem}_{views}v.zarr"
    result = CliRunner().invoke(extract_command, [
        "--config", str(config_path), "--dataroot", str(dataroot), "--checkpoint", str(checkpoint),
        "--cache", str(cache_path), "--split", "synth_train", "--views", str(views), "--layers", ",".join(layers)],
        catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"extract-teacher failed:\n{result.output}")
    return cache_path


FULL_STUDENTS = {"bevdet": "student_bevdepth4d.yaml", "bevformer": "student_bevformer.yaml"}  # configs/nuscenes/
# each student's teacher: BEVFormer's is CenterPoint with a DETR decoder (its bev_embed is the distilled feature)
SMALL_TEACHERS = {"bevformer": "teacher_detr.yaml"}  # configs/synthetic/, else teacher.yaml
FULL_TEACHERS = {"bevformer": "teacher_pillar02_detr.yaml"}  # configs/nuscenes/, else teacher_pillar02.yaml


def teacher_layer_names(cfg: StudentExperimentConfig) -> list[str]:
    """The teacher layers the student's distillation pairs read, sorted."""
    return sorted({pair.teacher for pair in cfg.distill.layers})


def small_shape_setup(folder: Path, steps: int, warmup: int, workers: int, student: str = "bevdet") -> ShapeSetup:
    """configs/synthetic student_<student> + teacher on a generated dataroot; a random teacher's two-view cache."""
    folder.mkdir(parents=True)
    student_config = REPO / "configs" / "synthetic" / f"student_{student}.yaml"
    cfg = load_config(StudentExperimentConfig, student_config)
    teacher_name = SMALL_TEACHERS.get(student, "teacher.yaml")
    teacher_cfg = load_config(TeacherExperimentConfig, REPO / "configs" / "synthetic" / teacher_name)
    samples_per_scene = 6
    train_scenes = math.ceil((steps + warmup) * cfg.train.batch_size / samples_per_scene)
    dataroot = folder / "synthetic"
    log.info("small: generating %d synthetic scenes", train_scenes + 1)
    generate_dataset(dataroot, SyntheticConfig.boxes(num_scenes=train_scenes + 1, samples_per_scene=samples_per_scene,
                                               val_scenes=1, sweeps_per_key_frame=max(teacher_cfg.data.num_sweeps, 1)),
                     progress=False)
    cfg.data.dataroot = teacher_cfg.data.dataroot = str(dataroot)
    torch.manual_seed(0)
    checkpoint = save_teacher_checkpoint(CenterPointTeacher(teacher_cfg.model), folder / "random_teacher.pth",
                                         config=teacher_cfg.model)
    log.info("small: extracting a two-view cache with the random teacher")
    cache_path = extract_cache(teacher_cfg, checkpoint, folder, dataroot, views=2, layers=teacher_layer_names(cfg))
    teacher = live_teacher(to_dict(teacher_cfg.model), checkpoint, torch.device("cpu"))

    def dataset_for(mode: str):
        data = dataclasses.replace(cfg.data)
        if mode == "online":  # the live teacher sees the sweeps it was trained with (as train_student does)
            data.num_sweeps = teacher_cfg.data.num_sweeps
            data.sweep_candidates = max(data.sweep_candidates, data.num_sweeps)
        return NuScenesDetectionDataset(data, data.train_split, mode="train")

    return ShapeSetup(
        description=f"configs/synthetic/{student_config.name} + configs/synthetic/{teacher_name}",
        note=(f"synthetic dataroot ({train_scenes} train scenes x {samples_per_scene} samples, JPEG decoding in "
              f"the workers), cache extracted from a random teacher ({teacher_cfg.data.num_sweeps} sweeps, 2 views, "
              f"{TeacherCache.open(cache_path).manifest['storage']['dtype']}); the student loads "
              f"{cfg.data.num_sweeps} sweeps, the online teacher "
              f"{teacher_cfg.data.num_sweeps}"),
        cfg=cfg, teacher=teacher, teacher_layers=TeacherCache.open(cache_path).manifest["layers"],
        cache_path=cache_path, dataset_for=dataset_for, batch_size=cfg.train.batch_size, workers=workers,
        warmup=warmup, steps=steps, teacher_config=teacher_cfg, checkpoint=checkpoint)


def full_shape_setup(folder: Path, steps: int, warmup: int, workers: int, student: str = "bevdet") -> ShapeSetup:
    """configs/nuscenes student_bevdepth4d (or student_bevformer) + teacher_pillar02 on random tensors of the real
    shapes, B=1."""
    folder.mkdir(parents=True)
    student_config = REPO / "configs" / "nuscenes" / FULL_STUDENTS[student]
    cfg = load_config(StudentExperimentConfig, student_config)
    teacher_name = FULL_TEACHERS.get(student, "teacher_pillar02.yaml")
    teacher_cfg = load_config(TeacherExperimentConfig, REPO / "configs" / "nuscenes" / teacher_name)
    torch.manual_seed(0)
    teacher = CenterPointTeacher(teacher_cfg.model).eval().requires_grad_(False)
    canvas = teacher_cfg.model.canvas_grid
    names = teacher_layer_names(cfg)
    layers = [LayerSpec(name, teacher.feature_channels[name], teacher.feature_shapes[name],
                        (canvas.x_max - canvas.x_min) / teacher.feature_shapes[name][1],
                        canvas.num_x / teacher.feature_shapes[name][1]) for name in names]
    num_samples = 3
    cache_path = folder / "full_cache.zarr"
    log.info("full: writing a random cache of %d samples x 2 views at %s", num_samples,
             {layer.name: (layer.channels, *layer.shape) for layer in layers})
    write_random_cache(cache_path, layers, canvas, teacher_cfg.model.head_grid.shape,
                       [f"full-shape-{i}" for i in range(num_samples)], views=2)
    cfg.train.batch_size = 1

    def dataset_for(mode: str):
        # ~30k key-frame points feed BEVDepth's depth targets; the online teacher sees ~250k (10 sweeps)
        points = 250_000 if mode == "online" else 30_000
        return FullShapeDataset(cfg.data, max(num_samples, warmup + steps), points, cfg.model.is_temporal)

    if warmup + steps > num_samples:
        raise SystemExit(f"full shapes: {num_samples} cached samples, --warmup + --full-steps must be <= that")
    height, width = cfg.data.final_size
    return ShapeSetup(
        description=f"configs/nuscenes/{student_config.name} + configs/nuscenes/{teacher_name}",
        note=(f"random tensors of the real shapes (B=1, 6 cameras {height}x{width} + the previous frame, ~250k "
              "points for the online teacher, ~30k for the student's depth targets, images drawn instead of "
              f"decoded), a cache of {num_samples} samples x 2 views written at the teacher's layer shapes (fp16); a "
              "few steps only"),
        cfg=cfg, teacher=teacher, teacher_layers={layer.name: layer.to_json() for layer in layers},
        cache_path=cache_path, dataset_for=dataset_for, batch_size=1, workers=workers, warmup=warmup, steps=steps)


GAP_AUGMENTATIONS = {
    "flip_x (y -> -y)": BEVAugmentation(flip_x=True),
    "flip_y (x -> -x)": BEVAugmentation(flip_y=True),
    "rotation 0.3 rad, scale 1.04": BEVAugmentation(rotation=0.3, scale=1.04),
    "rotation -0.2 rad, scale 0.96, flip_y": BEVAugmentation(rotation=-0.2, scale=0.96, flip_y=True),
}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def gap_teacher(small: ShapeSetup, trained_checkpoint: Path) -> tuple[TeacherExperimentConfig, Path, str]:
    """The trained teacher when its checkpoint exists (config and sweep count from the checkpoint), else the
    small shapes' random one."""
    if not trained_checkpoint.is_file():
        return small.teacher_config, small.checkpoint, "a randomly initialised teacher (no trained checkpoint found)"
    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    teacher_cfg = dataclasses.replace(small.teacher_config,
                                      model=from_dict(TeacherModelConfig, state["config"], source=str(trained_checkpoint)),
                                      data=dataclasses.replace(small.teacher_config.data))
    experiment = (state.get("training") or {}).get("experiment") or {}
    teacher_cfg.data.num_sweeps = int(experiment.get("data", {}).get("num_sweeps", teacher_cfg.data.num_sweeps))
    teacher_cfg.data.point_cloud_range = tuple(teacher_cfg.model.point_cloud_range)
    meta = state.get("meta") or {}
    return teacher_cfg, trained_checkpoint, (f"the TRAINED teacher {trained_checkpoint} (epoch {meta.get('epoch')}, "
                                             f"{teacher_cfg.data.num_sweeps} sweeps)")


def approximate_gap(small: ShapeSetup, folder: Path, trained_checkpoint: Path, samples: int) -> list[str]:
    """Per-layer cosine: identity view's cached maps warped into an augmentation vs the teacher on that cloud."""
    folder.mkdir(parents=True)
    teacher_cfg, checkpoint, which = gap_teacher(small, trained_checkpoint)
    dataroot = Path(small.cfg.data.dataroot)
    log.info("gap: extracting the identity view with %s", which)
    cache = TeacherCache.open(extract_cache(teacher_cfg, checkpoint, folder, dataroot, views=1,
                                            layers=teacher_layer_names(small.cfg)))
    teacher = live_teacher(to_dict(teacher_cfg.model), checkpoint, torch.device("cpu"))
    dataset = NuScenesDetectionDataset(teacher_cfg.data, "synth_train", mode="test")
    grid = cache.manifest["bev_grid"]
    extent = (grid["x_min"], grid["x_max"], grid["y_min"], grid["y_max"])
    count = min(samples, len(dataset))
    values: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for index in range(count):
        identity = cache.read(cache.index_of(dataset.sample_tokens[index]), 0)
        maps = dict(identity.features, heatmap=identity.heatmap)
        for name, augmentation in GAP_AUGMENTATIONS.items():
            points = dataset.get(index, bev_aug=augmentation, with_images=False).points
            with torch.no_grad():
                outputs = teacher([points])
            live = {layer: outputs.features[layer][0] for layer in identity.features}
            live["heatmap"] = outputs.heatmap[0].sigmoid().clamp(1e-4, 1 - 1e-4)
            for layer, cached in maps.items():
                values.setdefault((name, layer), []).append(
                    (cosine(warp_bev(cached, augmentation, extent), live[layer]), cosine(cached, live[layer])))
    lines = ["## Approximate targets: gap to the teacher on the augmented cloud", "",
             f"Teacher: {which}; synthetic synth_train samples 0..{count - 1} (test-mode sweeps), identity view "
             f"read from the cache, warped with `pipeline/distill/warp.py` (flips: index reversal; otherwise "
             f"bilinear), compared with the teacher run on the augmented cloud. Cosine over all (C, Y, X) values, "
             f"mean (min) over samples; the unwarped column compares the identity maps without warping (a control: "
             f"ReLU features share a large positive component, so cosine is never near 0).", "",
             "| augmentation | layer | cosine warped, mean (min) | cosine unwarped, mean |", "|---|---|---|---|"]
    for (name, layer), rows in values.items():
        warped = [w for w, _ in rows]
        lines.append(f"| {name} | {layer} | {sum(warped) / len(warped):.4f} ({min(warped):.4f}) "
                     f"| {sum(u for _, u in rows) / len(rows):.4f} |")
    return lines + [""]


MODES = (("baseline", "none"), ("cached", "cache"), ("online", "online"))


class TimedTeacher(torch.nn.Module):
    """Wraps the frozen teacher and records the wall seconds of each forward pass (the online mode's share)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.seconds: list[float] = []

    def forward(self, points):
        started = time.perf_counter()
        outputs = self.teacher(points)
        self.seconds.append(time.perf_counter() - started)
        return outputs


@dataclasses.dataclass
class StepTime:
    wall: float  # seconds from asking the DataLoader for the batch to the end of the optimiser step
    data: float  # seconds blocked on the DataLoader iterator
    cpu: float  # CPU seconds of this process (all its threads; DataLoader workers excluded)
    teacher: float  # seconds of the live teacher's forward pass (0 without one)


def time_steps(setup: DistillationSetup, train_set: DistillationDataset, batch_size: int, workers: int,
               head_grid, warmup: int, steps: int, grad_clip: float) -> list[StepTime]:
    """Timings of `steps` steps after `warmup` steps, each step as `run_epochs` trains."""
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=collate_with_targets, generator=torch.Generator().manual_seed(0))
    params = list(setup.student.parameters())
    if setup.distill_loss is not None:
        params += list(setup.distill_loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    setup.student.train()
    needed = warmup + steps
    if len(loader) < needed:
        raise SystemExit(f"the split has {len(loader)} batches of {batch_size}, the benchmark needs {needed}; "
                         f"lower --steps / --warmup")
    records = []
    iterator = iter(loader)
    for step in range(needed):
        teacher_before = sum(setup.teacher.seconds) if setup.teacher is not None else 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        batch, targets = next(iterator)
        data_seconds = time.perf_counter() - started
        losses = training_step(setup, batch, targets, head_grid)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if step >= warmup:
            teacher_seconds = sum(setup.teacher.seconds) - teacher_before if setup.teacher is not None else 0.0
            records.append(StepTime(time.perf_counter() - started, data_seconds,
                                    time.process_time() - cpu_started, teacher_seconds))
    del iterator  # stops the workers
    return records


def time_inference(shape: ShapeSetup) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of the student's eval-mode forward under no_grad (what an evaluation step costs), one
    sample per step, `shape.steps` steps after `shape.warmup`; for shapes whose training step does not fit."""
    from distillbev.pipeline.data.collate import collate_samples

    torch.manual_seed(0)
    student = shape.make_student().eval()
    dataset = shape.dataset_for("none")
    wall, cpu = [], []
    for step in range(shape.warmup + shape.steps):
        batch = collate_samples([dataset.get(step % len(dataset))])
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.no_grad():
            student(batch)
        if step >= shape.warmup:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
    return wall, cpu


def peak_memory_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _status_kib(field: str) -> int | None:
    """A `/proc/self/status` memory field (VmHWM, VmRSS) in KiB, None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the OS, so the next mode's resident memory starts
    from what is really in use (freed tensors of an earlier mode would otherwise be reused without raising RSS)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory() -> bool:
    """Reset this process's resident-memory high-water mark (VmHWM) to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass
class ModeMemory:
    start_gib: float  # resident memory when the mode was about to be built
    peak_gib: float  # high-water mark while the mode was built and stepped (ru_maxrss so far if not resettable)


def run_mode(name: str, shape: ShapeSetup, label: str, mode: str) -> tuple[list[StepTime], ModeMemory]:
    """Build one mode afresh (student, loss, DataLoader, optimiser) and time its warm-up + steps."""
    cfg = shape.cfg
    release_free_memory()
    resettable = reset_peak_memory()
    start = (_status_kib("VmRSS") or 0) / 2**20
    torch.manual_seed(0)
    student = set_memory_format(shape.make_student(), cfg.train.channels_last)  # the config's arithmetic
    distill_loss = None if mode == "none" else build_distill_loss(cfg, student, shape.teacher_layers)
    setup = DistillationSetup(student=student, distill_loss=distill_loss,
                              teacher=TimedTeacher(shape.teacher) if mode == "online" else None,
                              layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers],
                              precision=cfg.train.precision)
    bev = cfg.model.bev
    train_set = DistillationDataset(shape.dataset_for(mode), mode=mode,
                                    cache=TeacherCache.open(shape.cache_path) if mode == "cache" else None,
                                    bev_extent=(bev.x_min, bev.x_max, bev.y_min, bev.y_max),
                                    **precompute_arguments(distill_loss, cfg))
    logging.info("%s: timing %s (%d + %d steps)", name, label, shape.warmup, shape.steps)
    records = time_steps(setup, train_set, shape.batch_size, shape.workers, cfg.model.head.grid,
                         shape.warmup, shape.steps, cfg.train.grad_clip)
    peak = (_status_kib("VmHWM") or 0) / 2**20 if resettable else peak_memory_gib()
    del setup, student, distill_loss, train_set
    release_free_memory()
    return records, ModeMemory(start, peak)


def precompute_arguments(distill_loss, cfg: StudentExperimentConfig) -> dict:
    """DistillationDataset keyword arguments that move the loss's student-independent work into the workers (empty
    when this checkout's DistillationDataset has no such option: the benchmark then times the in-step path)."""
    import inspect

    from distillbev.pipeline.distill import targets as targets_module

    if distill_loss is None or "precompute" not in inspect.signature(DistillationDataset).parameters:
        return {}
    return {"precompute": targets_module.step_precompute(distill_loss, cfg.model.head, cfg.model.head.grid)}


def benchmark_shape(name: str, shape: ShapeSetup, modes: tuple[tuple[str, str], ...] = MODES,
                    rounds: int = 1) -> list[str]:
    """Run the modes of one shape (default all three) interleaved over `rounds`; markdown lines of its table."""
    if not modes:
        return []
    results: dict[str, list[StepTime]] = {label: [] for label, _ in modes}
    memory: dict[str, list[ModeMemory]] = {label: [] for label, _ in modes}
    for round_index in range(rounds):
        shift = round_index % len(modes)
        for label, mode in modes[shift:] + modes[:shift]:  # rotate the order from round to round
            records, used = run_mode(name, shape, label, mode)
            results[label] += records
            memory[label].append(used)
    labels = [label for label, _ in modes]
    reference = "baseline" if "baseline" in results else labels[0]
    baseline = mean_and_spread([r.wall for r in results[reference]])[0]
    baseline_cpu = mean_and_spread([r.cpu for r in results[reference]])[0]
    baseline_peak = max(m.peak_gib - m.start_gib for m in memory[reference])
    lines = [f"### {name}: {shape.description}", "",
             f"batch {shape.batch_size}, {shape.workers} DataLoader worker(s); {rounds} round(s), each building every "
             f"mode afresh and timing {shape.steps} steps after {shape.warmup} warm-up step(s), the mode order rotated "
             f"per round; mean over the {rounds * shape.steps} timed steps of each mode; {shape.note}; a shared "
             f"machine (other jobs on the same cores), so wall times carry their load", "",
             f"| mode | step s (mean ± sd) | step / {reference} | CPU s of the step | CPU / {reference} "
             "| teacher forward s | data wait s | data wait % of step | peak RSS GiB | peak above mode start GiB "
             f"| peak above start / {reference} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        rows = results[label]
        step_mean, step_sd = mean_and_spread([r.wall for r in rows])
        cpu_mean = mean_and_spread([r.cpu for r in rows])[0]
        share = sum(r.data for r in rows) / sum(r.wall for r in rows)
        peak = max(m.peak_gib for m in memory[label])
        above = max(m.peak_gib - m.start_gib for m in memory[label])
        above_ratio = above / baseline_peak if baseline_peak > 0 else float("nan")
        lines.append(f"| {label} | {step_mean:.3f} ± {step_sd:.3f} | {step_mean / baseline:.2f}x "
                     f"| {cpu_mean:.3f} | {cpu_mean / baseline_cpu:.2f}x "
                     f"| {mean_and_spread([r.teacher for r in rows])[0]:.3f} "
                     f"| {mean_and_spread([r.data for r in rows])[0]:.3f} | {100 * share:.1f}% "
                     f"| {peak:.2f} | {above:.2f} | {above_ratio:.2f}x |")
    if not {"cached", "online"} <= set(results):
        return lines + [""]
    cached = mean_and_spread([r.wall for r in results["cached"]])[0]
    online = mean_and_spread([r.wall for r in results["online"]])[0]
    cached_cpu = mean_and_spread([r.cpu for r in results["cached"]])[0]
    online_cpu = mean_and_spread([r.cpu for r in results["online"]])[0]
    lines += ["", f"cached / online step time: **{cached / online:.2f}** wall ({cached:.3f} s vs {online:.3f} s), "
                  f"**{cached_cpu / online_cpu:.2f}** CPU ({cached_cpu:.3f} s vs {online_cpu:.3f} s)", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode at the small shapes")
    parser.add_argument("--full-steps", type=int, default=2, help="timed steps per mode at the full shapes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first at the small shapes")
    parser.add_argument("--full-warmup", type=int, default=1, help="untimed steps first at the full shapes")
    parser.add_argument("--shapes", default="small,full", help="comma-separated: small, full")
    parser.add_argument("--student", default="bevdet", choices=sorted(FULL_STUDENTS),
                        help="bevdet: the synthetic bevdet and nuScenes bevdepth4d configs; bevformer: the BEVFormer "
                             "configs")
    parser.add_argument("--modes", default="baseline,cached,online",
                        help="comma-separated subset of baseline, cached, online (training steps) and inference "
                             "(the eval-mode forward alone)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds: each builds and times every mode once, the order rotated")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: small 1, full 1)")
    parser.add_argument("--gap-samples", type=int, default=4, help="samples of the approximate-mode gap")
    parser.add_argument("--trained-teacher", type=Path, default=Path("out/demo/teacher/latest.pth"),
                        help="teacher checkpoint for the approximate-mode gap (default: `make demo`'s; a random "
                             "teacher if missing)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(shapes) - {"small", "full"}
    if unknown:
        raise SystemExit(f"--shapes: unknown {sorted(unknown)}; use small and/or full")
    chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes = tuple((label, mode) for label, mode in MODES if label in chosen)
    inference = "inference" in chosen
    if len(modes) + inference != len(chosen):
        raise SystemExit(f"--modes: unknown {sorted(set(chosen) - {label for label, _ in MODES} - {'inference'})}; "
                         f"use baseline, cached, online and/or inference")
    folder = Path(tempfile.mkdtemp(prefix="train_bench_", dir=args.dir))
    lines = ["## Training step", "", machine_header(), ""]
    try:
        small = None
        if "small" in shapes or args.gap_samples > 0:
            small = small_shape_setup(folder / "small", args.steps, args.warmup, args.workers or 1, args.student)
        selected = {}
        if "small" in shapes:
            selected["small"] = small
        if "full" in shapes:
            selected["full"] = full_shape_setup(folder / "full", args.full_steps, args.full_warmup, args.workers or 1,
                                                args.student)
        for name, shape in selected.items():
            lines += benchmark_shape(name, shape, modes, args.rounds)
            if inference:
                wall, cpu = time_inference(shape)
                lines += [f"### {name}, inference: {shape.description}", "",
                          f"eval-mode forward under no_grad, 1 sample, mean over {shape.steps} steps after "
                          f"{shape.warmup} warm-up step(s)", "",
                          "| mode | forward s (mean ± sd) | CPU s | peak RSS GiB so far |", "|---|---|---|---|",
                          f"| inference | {mean_and_spread(wall)[0]:.3f} ± {mean_and_spread(wall)[1]:.3f} "
                          f"| {mean_and_spread(cpu)[0]:.3f} | {peak_memory_gib():.1f} |", ""]
        if args.gap_samples > 0:
            lines += approximate_gap(small, folder / "gap", args.trained_teacher, args.gap_samples)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
