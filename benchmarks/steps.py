"""Where a training step's time goes: the main job's teacher and BEVDet student, per phase and per arithmetic.

    python benchmarks/steps.py --dataroot DIR [--steps 4] [--threads 2] [--out FILE]

DIR is a synthetic dataroot (`distillbev make-synthetic --world 2 --out DIR`). For the teacher
(configs/synthetic/teacher.yaml, batch 4) and the BEVDet student (configs/synthetic/student_bevdet.yaml, batch 2,
baseline) it builds one batch from the train split, then times `--steps` steps (after one warm-up step) of each
arithmetic side by side, interleaved step by step so a shared machine slows every column alike:

- fp32: float32, NCHW (the configs before bf16);
- fp32 + channels_last;
- bf16 + channels_last (the configs' setting: `train.precision: bf16`, `train.channels_last: true`).

Each step is split into forward, loss, backward and optimiser (AdamW) time; the data-loading time of one batch (the
DataLoader worker's share, overlapped with the step in training) is measured once. A torch.profiler table of one
bf16 step lists the top operators by self CPU time. The allocator is tuned as every `distillbev` command tunes it
(pipeline/runtime.py); `DISTILLBEV_MALLOC_TUNING=0` measures glibc's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import time
from typing import Callable

import torch

from distillbev.pipeline.config import load_config
from distillbev.pipeline.data.collate import collate_samples
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.precision import autocast, set_memory_format
from distillbev.pipeline.runtime import tune_allocator
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher
from distillbev.pipeline.teacher.train import build_optimizer

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "synthetic")
MODES = {"fp32": ("fp32", False), "fp32 + channels_last": ("fp32", True), "bf16 + channels_last": ("bf16", True)}


@dataclasses.dataclass
class Network:
    """One network under test: how to build it, its batch, and its forward / loss on that batch."""

    name: str
    build: Callable[[], tuple]  # () -> (model, train config or None)
    forward: Callable  # (model, batch) -> outputs
    loss: Callable  # (model, outputs, batch) -> scalar
    batch: object
    load_seconds: float  # loading + collating one batch, single process


def teacher_network(dataroot: str) -> Network:
    cfg = load_config(TeacherExperimentConfig, os.path.join(CONFIGS, "teacher.yaml"), [f"data.dataroot={dataroot}"])
    data = dataclasses.replace(cfg.data, load_images=False)
    dataset = NuScenesDetectionDataset(data, data.train_split, "train")
    started = time.perf_counter()
    batch = collate_samples([dataset[i] for i in range(cfg.train.batch_size)])
    load = time.perf_counter() - started

    def loss(model, outputs, batch):
        return sum(model.pts_bbox_head.loss(outputs.head, batch.gt_boxes, batch.gt_labels).values())

    return Network(f"teacher (batch {cfg.train.batch_size}, {sum(len(p) for p in batch.points)} points)",
                   lambda: (CenterPointTeacher(cfg.model), cfg.train), lambda m, b: m(b.points), loss, batch, load)


def student_network(dataroot: str) -> Network:
    path = os.path.join(CONFIGS, "student_bevdet.yaml")
    cfg = load_config(StudentExperimentConfig, path, [f"data.dataroot={dataroot}"])
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="train")
    started = time.perf_counter()
    batch = collate_samples([dataset[i] for i in range(cfg.train.batch_size)])
    load = time.perf_counter() - started

    def loss(model, outputs, batch):
        return sum(model.detection_loss(outputs.float(), batch).values())

    return Network(f"BEVDet student (batch {cfg.train.batch_size}, baseline)", lambda: (build_student(cfg.model), None),
                   lambda m, b: m(b), loss, batch, load)


def timed_step(network: Network, model, optimizer, precision: str) -> dict[str, float]:
    times = {}
    t0 = time.perf_counter()
    with autocast("cpu", precision):
        outputs = network.forward(model, network.batch)
    t1 = time.perf_counter()
    total = network.loss(model, outputs, network.batch)
    t2 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    t3 = time.perf_counter()
    optimizer.step()
    t4 = time.perf_counter()
    times.update(forward=t1 - t0, loss=t2 - t1, backward=t3 - t2, optimizer=t4 - t3, step=t4 - t0)
    return times


def measure(network: Network, steps: int) -> tuple[str, str]:
    models = {}
    for name, (precision, channels_last) in MODES.items():
        torch.manual_seed(0)
        model, train_cfg = network.build()
        model = set_memory_format(model, channels_last).train()
        optimizer = build_optimizer(model, train_cfg) if train_cfg is not None else \
            torch.optim.AdamW(model.parameters(), lr=1e-3)
        models[name] = (model, optimizer, precision)
        timed_step(network, model, optimizer, precision)  # warm-up: oneDNN primitive creation, allocator
    records = {name: [] for name in MODES}
    for _ in range(steps):
        for name, (model, optimizer, precision) in models.items():
            records[name].append(timed_step(network, model, optimizer, precision))
    base = statistics.mean(r["step"] for r in records["fp32"])
    lines = [f"### {network.name}", "",
             f"Loading and collating one batch in one process: {1000 * network.load_seconds:.0f} ms (a DataLoader "
             f"worker does it while the step runs).", "",
             "| arithmetic | forward ms | loss ms | backward ms | AdamW ms | step ms | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in records.items():
        mean = {key: 1000 * statistics.mean(r[key] for r in rows) for key in rows[0]}
        lines.append(f"| {name} | {mean['forward']:.0f} | {mean['loss']:.0f} | {mean['backward']:.0f} | "
                     f"{mean['optimizer']:.0f} | {mean['step']:.0f} | {base / (mean['step'] / 1000):.2f}x |")
    model, optimizer, precision = models["bf16 + channels_last"]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_step(network, model, optimizer, precision)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=44)
    return "\n".join(lines), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    out = io.StringIO()
    out.write(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps per arithmetic "
              f"after one warm-up, interleaved; allocator {'tuned' if tuned else 'glibc defaults'}\n\n")
    for network in (teacher_network(args.dataroot), student_network(args.dataroot)):
        table, profile_table = measure(network, args.steps)
        out.write(table + "\n\nTop operators of one bf16 + channels_last step (torch.profiler, self CPU time):\n\n"
                  "```\n" + profile_table + "\n```\n\n")
    print(out.getvalue())
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(out.getvalue())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
