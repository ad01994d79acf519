"""The bytes a training batch takes through shared memory at the paper's full shapes, with an int8 cache's features
dequantised in the DataLoader worker (before) and handed over as stored, int8 values with per-channel scales and
offsets, dequantised on the device (after); and the DistillBEV loss terms of both batches.

    OMP_NUM_THREADS=1 python benchmarks/handover_bytes.py [--batch 8] [--workers 8] [--rounds 3] [--out FILE]

configs/nuscenes/student_bevdepth4d.yaml (BEVDepth4D, 6 cameras at 256x704 and the previous frame, batch 8) with
configs/nuscenes/teacher_pillar02.yaml's layers (backbone1 128 @ 128x128, backbone2 256 @ 64x64, neck 384 @ 128x128)
from an int8 cache of two random samples (ReLU'd normal maps, the extraction's default error budget) written at
those shapes; the samples are random tensors of the real shapes (`common.FullShapeDataset`). A batch is
`--batch` sample-views read by `DistillationDataset` as a training worker reads them (the loss's student-independent
inputs computed there too) and collated by `collate_with_targets` (timed in this process: the worker's CPU time per
batch, median of `--rounds`, the two handovers alternating); its bytes are those of the one shared-memory
block the worker hands over (`handover.block_bytes`, checked against the block `share_one_block` allocates). The
/dev/shm column is what a loader of `--workers` workers holds at most (workers x prefetch 2, +1 being taken).
The loss terms are the DistillBEV loss (adapters in float32, no student forward: random student features of the
student's shapes, seed 0) on each batch's targets, dequantised where the step dequantises them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import FullShapeDataset, machine_header, write_random_cache
from distillbev.cache_schemas.v2 import DEFAULT_INT8_ERROR
from distillbev.pipeline.cache.manifest import LayerSpec
from distillbev.pipeline.cache.quantize import QuantizedFeatures
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.config import load_config
from distillbev.pipeline.data.handover import block_bytes, share_one_block
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.run import build_distill_loss
from distillbev.pipeline.distill.targets import DistillationDataset, collate_with_targets, step_precompute
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher

REPO = Path(__file__).resolve().parents[1]
PREFETCH = 2  # the training loader's prefetch factor
MIB = 2**20


def full_shape_parts(folder: Path):
    """(student config, student, DistillBEV loss, int8 cache of 2 samples, the samples' dataset)."""
    cfg = load_config(StudentExperimentConfig, REPO / "configs" / "nuscenes" / "student_bevdepth4d.yaml",
                      ["train.precision=fp32"])
    teacher_cfg = load_config(TeacherExperimentConfig, REPO / "configs" / "nuscenes" / "teacher_pillar02.yaml")
    teacher = CenterPointTeacher(teacher_cfg.model)
    canvas = teacher_cfg.model.canvas_grid
    names = sorted({pair.teacher for pair in cfg.distill.layers})
    layers = [LayerSpec(name, teacher.feature_channels[name], teacher.feature_shapes[name],
                        (canvas.x_max - canvas.x_min) / teacher.feature_shapes[name][1],
                        canvas.num_x / teacher.feature_shapes[name][1]) for name in names]
    tokens = ["full-shape-0", "full-shape-1"]
    cache_path = folder / "int8_cache.zarr"
    write_random_cache(cache_path, layers, canvas, teacher_cfg.model.head_grid.shape, tokens, views=1, dtype="int8")
    cache = TeacherCache.open(cache_path)
    torch.manual_seed(0)
    student = build_student(cfg.model).eval()
    distill_loss = build_distill_loss(cfg, student, cache.manifest["layers"]).eval()
    dataset = FullShapeDataset(cfg.data, len(tokens), 30_000, previous_frame=cfg.model.is_temporal)
    return cfg, student, distill_loss, cache, dataset


def one_batch(parts, batch_size: int, int8_handover: bool):
    """(collated batch as a worker hands it over, seconds to read and collate it in this process)."""
    cfg, _, distill_loss, cache, dataset = parts
    pairs = DistillationDataset(dataset, mode="cache", cache=cache, seed=0, indices=[i % 2 for i in range(batch_size)],
                                precompute=step_precompute(distill_loss, cfg.model.head, cfg.model.head.grid),
                                int8_handover=int8_handover)
    start = time.perf_counter()
    handed = collate_with_targets([pairs[position] for position in range(batch_size)])
    return handed, time.perf_counter() - start


def parts_bytes(handed) -> dict[str, int]:
    """Bytes of the batch's block by what they hold."""
    batch, targets = handed
    parts = {"teacher features": block_bytes(targets.features),
             "images": block_bytes([batch.images, batch.prev_images])}
    parts["attention, masks, scales"] = block_bytes((targets.attention, targets.heatmap, targets.precomputed))
    parts["total"] = block_bytes(tuple(handed))
    parts["rest (points, boxes, geometry)"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
    return parts


def loss_terms(parts, handed) -> dict[str, float]:
    """The DistillBEV loss terms of the batch's targets (dequantised as the step does) on random student features."""
    cfg, student, distill_loss, _, _ = parts
    batch, targets = handed
    targets = targets.dequantized()
    generator = torch.Generator().manual_seed(0)
    features = {name: torch.randn(len(batch), channels, *student.feature_shapes[name], generator=generator)
                for name, channels in student.feature_channels.items()}
    with torch.no_grad():
        terms = distill_loss(student_features=features, teacher_features=targets.features, gt_boxes=batch.gt_boxes,
                             teacher_heatmap=targets.heatmap, gt_heatmap_max=None,
                             teacher_attention=targets.attention, precomputed=targets.precomputed)
    return {name: float(value) for name, value in terms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sample-views per batch (the paper's per-GPU batch)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers for the /dev/shm column")
    parser.add_argument("--rounds", type=int, default=3, help="batches built per handover (the median time is shown)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        parts = full_shape_parts(Path(folder))
        one_batch(parts, 1, True)  # opens the cache's arrays: not timed
        seconds: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.rounds):  # alternating, so a slow spell of a shared machine spreads over both
            handed = {label: one_batch(parts, args.batch, int8) for label, int8 in (("before", False),
                                                                                     ("after", True))}
            for label, (_, spent) in handed.items():
                seconds[label].append(spent)
        sizes = {label: parts_bytes(batch) for label, (batch, _) in handed.items()}
        for label, (batch, _) in handed.items():  # the block a worker allocates is the one counted
            block = share_one_block(tuple(batch), shared=False)
            assert block[0].images.untyped_storage().nbytes() == sizes[label]["total"], label
        assert all(isinstance(v, QuantizedFeatures) for v in handed["after"][0][1].features.values())
        terms = {label: loss_terms(parts, batch) for label, (batch, _) in handed.items()}
    cfg = parts[0]
    height, width = cfg.data.final_size
    lines = [machine_header(), "",
             f"configs/nuscenes/student_bevdepth4d.yaml (6 cameras {height}x{width} + the previous frame) with "
             f"configs/nuscenes/teacher_pillar02.yaml's layers, an int8 cache (error budget {DEFAULT_INT8_ERROR}); "
             f"one batch of {args.batch} sample-views as a training worker hands it over; /dev/shm: {args.workers} "
             f"workers x prefetch {PREFETCH} + 1; read + collate: this process, median of {args.rounds} batches",
             "",
             "| handover | teacher features MiB | images MiB | attention, masks, scales MiB | rest MiB | batch MiB | "
             f"/dev/shm MiB ({args.workers} workers) | read + collate s |", "|---|---|---|---|---|---|---|---|"]
    for label in handed:
        size = sizes[label]
        name = ("float32, dequantised in the worker" if label == "before"
                else "int8 + scales, dequantised on the device")
        lines.append(f"| {label}: {name} | {size['teacher features'] / MIB:.1f} | {size['images'] / MIB:.1f} | "
                     f"{size['attention, masks, scales'] / MIB:.1f} | "
                     f"{size['rest (points, boxes, geometry)'] / MIB:.1f} | {size['total'] / MIB:.1f} | "
                     f"{size['total'] * (args.workers * PREFETCH + 1) / MIB:.0f} | "
                     f"{statistics.median(seconds[label]):.2f} |")
    worst = max(abs(terms["after"][k] - v) / max(abs(v), 1e-12) for k, v in terms["before"].items())
    lines += ["", "| loss term | before | after | relative difference |", "|---|---|---|---|"]
    for name, value in terms["before"].items():
        found = terms["after"][name]
        lines.append(f"| {name} | {value:.9g} | {found:.9g} | {abs(found - value) / max(abs(value), 1e-12):.1e} |")
    lines += ["", f"largest relative difference of a loss term: {worst:.1e}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
