"""Teacher training engine: optimiser, schedule, one epoch, resumable run state, prediction and evaluation.

`run_teacher_training(config, run_dir, device, resume)` is the whole recipe; the loop pieces are small free
functions so tests can drive them on synthetic tensors. Run directory layout:

    RUN/config.yaml               the full experiment config that ran (`train.precision: auto` resolved)
    RUN/train_log.jsonl           one JSON record per `log_every` steps and per epoch
    RUN/checkpoints/epoch_N.pth   teacher checkpoint after epoch N (mmdet3d key names)
    RUN/latest.pth                the same plus optimiser / scheduler / epoch / RNG state (for --resume)
    RUN/eval/                     results.json, metrics_summary.json (devkit) after training

Under torchrun (`world.distributed`) every rank trains a DistributedDataParallel replica on its own part of each
epoch (DistributedSampler, reseeded per epoch), with the configured batch per rank; rank 0 alone writes the config,
the log (its own losses) and the checkpoints. The evaluation splits the val split over the ranks (r, r + W, ...)
and rank 0 scores the gathered predictions. A run resumes under another world size: the epoch count carries over
and the schedule continues at epochs done x the new steps per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..config import dump_config, to_dict
from ..data.collate import collate_samples
from ..data.dataset import NuScenesDetectionDataset
from ..data.handover import loader_workers
from ..data.types import Detections
from ..distributed import World, barrier, broadcast_buffers, gather_ordered, prepare_model, rank_indices, unwrap
from ..errors import CheckpointError
from ..eval import detections_to_results, evaluate_results, format_metrics_table
from ..precision import Precision, autocast, resolve_precision, set_memory_format, training_precision
from ..safe_pickle import load_checkpoint
from .checkpoint import load_teacher_checkpoint, save_teacher_checkpoint
from .config import TeacherExperimentConfig, TeacherTrainConfig
from .model import CenterPointTeacher

LOGGER = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, train: TeacherTrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on BatchNorm parameters and biases (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=train.lr, foreach=True)


def learning_rate_factor(step: int, total_steps: int, train: TeacherTrainConfig) -> float:
    """Multiplier of `train.lr` at `step` (0-based) of `total_steps`."""
    if train.schedule == "constant" or total_steps <= 1:
        return 1.0
    progress = min(step / (total_steps - 1), 1.0)
    warmup = min(max(train.warmup_fraction, 0.0), 1.0)
    if train.schedule == "onecycle":
        # CenterPoint's cyclic schedule: cosine rise from lr/10 to lr, then cosine decay to lr*1e-4
        start, end = 0.1, 1e-4
        if warmup > 0 and progress < warmup:
            return start + (1 - start) * (1 - math.cos(math.pi * progress / warmup)) / 2
        rest = (progress - warmup) / max(1 - warmup, 1e-9)
        return end + (1 - end) * (1 + math.cos(math.pi * rest)) / 2
    # cosine: linear warmup then cosine decay to 0
    if warmup > 0 and progress < warmup:
        return 0.001 + (1 - 0.001) * progress / warmup
    rest = (progress - warmup) / max(1 - warmup, 1e-9)
    return (1 + math.cos(math.pi * rest)) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, train: TeacherTrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (`learning_rate_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, train))


def train_step(model: CenterPointTeacher, points: list[torch.Tensor], gt_boxes: list[torch.Tensor],
               gt_labels: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               grad_clip: float = 0.0, precision: Precision = "fp32") -> dict[str, float]:
    """One forward/backward/update on a batch (tensors already on the model's device). Returns loss terms.

    The forward runs under `precision`'s autocast; the head loss casts its inputs to float32 itself."""
    model.train()
    with autocast(points[0].device, precision):
        outputs = model(points)  # through the DDP wrapper when there is one (it syncs the gradients)
    teacher = unwrap(model)
    losses = teacher.pts_bbox_head.loss(outputs.head, gt_boxes, gt_labels)
    if outputs.decoder is not None:
        weight = teacher.config.decoder.loss_weight
        decoder_losses = teacher.pts_detr_head.loss(outputs.decoder, gt_boxes, gt_labels)
        losses["loss_decoder"] = weight * sum(decoder_losses.values())
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    record = {"loss": float(total.detach()), **{name: float(value.detach()) for name, value in losses.items()}}
    if grad_clip > 0:
        record["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    return record


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def train_one_epoch(model: CenterPointTeacher, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, epoch: int,
                    train: TeacherTrainConfig, log_path: Path | None = None, num_steps: int | None = None,
                    start_step: int = 0, show_progress: bool = True) -> dict[str, float]:
    """Train over `loader` (yielding `Batch`es) for one epoch; returns the mean loss terms."""
    from tqdm import tqdm

    totals: dict[str, float] = {}
    count = 0
    step = start_step
    precision = resolve_precision(train.precision, device)[0]  # `run_teacher_training` resolved and logged it
    progress = tqdm(loader, total=num_steps, desc=f"teacher epoch {epoch}", leave=False, dynamic_ncols=True,
                    disable=not show_progress)
    started = time.perf_counter()
    for index, batch in enumerate(progress):
        if num_steps is not None and index >= num_steps:
            break
        batch = batch.to(device)
        record = train_step(model, batch.points, batch.gt_boxes, batch.gt_labels, optimizer, train.grad_clip,
                            precision)
        scheduler.step()
        step += 1
        count += 1
        for name, value in record.items():
            totals[name] = totals.get(name, 0.0) + value
        progress.set_postfix(loss=f"{record['loss']:.3f}", heatmap=f"{record['loss_heatmap']:.3f}",
                             box=f"{record['loss_box']:.3f}")
        if log_path is not None and (step % max(train.log_every, 1) == 0):
            _append_jsonl(log_path, {"kind": "step", "epoch": epoch, "step": step,
                                     "lr": optimizer.param_groups[0]["lr"],
                                     "seconds_per_step": (time.perf_counter() - started) / count, **record})
    progress.close()
    means = {name: value / max(count, 1) for name, value in totals.items()}
    means["steps"] = count
    means["seconds"] = time.perf_counter() - started
    return means


@torch.no_grad()
def predict(model: CenterPointTeacher, loader: Iterable, device: torch.device,
            show_progress: bool = True) -> dict[str, list[Detections]]:
    """Decoded detections (LiDAR frame, BEV augmentation undone) for every batch of `loader`: {"center": the
    CenterHead's} and, for a teacher with a decoder, {"decoder": the DETR head's}."""
    from tqdm import tqdm

    model.eval()
    detections: dict[str, list[Detections]] = {"center": []}
    for batch in tqdm(loader, desc="teacher predict", leave=False, dynamic_ncols=True, disable=not show_progress):
        batch = batch.to(device)
        outputs = model(batch.points)
        tokens = list(batch.sample_tokens)
        detections["center"] += model.pts_bbox_head.decode(outputs.head, tokens, batch.bev_aug)
        if outputs.decoder is not None:
            detections.setdefault("decoder", [])
            detections["decoder"] += model.pts_detr_head.decode(outputs.decoder, tokens, batch.bev_aug)
    return detections


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": [kind, int(position), int(has_gauss), float(cached)], "python": random.getstate()}


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, position, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def save_run_state(run_dir: Path, epoch: int, step: int, model: CenterPointTeacher,
                   optimizer: torch.optim.Optimizer, scheduler: Any, config: TeacherExperimentConfig,
                   steps_per_epoch: int = 0, world_size: int = 1) -> None:
    """epoch_N.pth (teacher checkpoint) and latest.pth (+ optimiser, scheduler, epoch, step, RNG, and the steps per
    epoch and world size they were counted under)."""
    meta = {"epoch": epoch, "step": step}
    save_teacher_checkpoint(model, run_dir / "checkpoints" / f"epoch_{epoch}.pth", config.model, meta)
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               "config": to_dict(config.model), "meta": meta, "format": "distillbev-teacher",
               "training": {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch, "step": step, "rng": _rng_state(),
                            "steps_per_epoch": steps_per_epoch, "world_size": world_size,
                            "experiment": to_dict(config)}}
    temporary = run_dir / "latest.pth.tmp"
    torch.save(payload, temporary)
    temporary.replace(run_dir / "latest.pth")


def load_run_state(run_dir: Path, model: CenterPointTeacher, optimizer: torch.optim.Optimizer,
                   scheduler: Any, steps_per_epoch: int = 0) -> tuple[int, int]:
    """Restore latest.pth into model / optimiser / scheduler / RNG; returns (epochs done, steps done).

    When the run was counted under another number of steps per epoch (another world size or batch), the step
    count and the schedule restart at epochs done x `steps_per_epoch`.
    """
    import warnings

    path = run_dir / "latest.pth"
    if not path.is_file():
        raise CheckpointError(f"{path}: nothing to resume (no latest.pth in the run directory); "
                              f"drop --resume to start a new run")

    training = load_checkpoint(path, what="resume checkpoint", fix="train-teacher writes only tensors and plain "
                               "values into latest.pth; delete the file and drop --resume to start over")["training"]
    load_teacher_checkpoint(model, path, strict=True)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    _restore_rng(training["rng"])
    epoch, step = int(training["epoch"]), int(training["step"])
    saved = int(training.get("steps_per_epoch", 0))
    if steps_per_epoch and saved and saved != steps_per_epoch:
        LOGGER.info("resuming with %d steps per epoch (the run had %d, world size %d): the schedule continues at "
                    "step %d", steps_per_epoch, saved, int(training.get("world_size", 1)), epoch * steps_per_epoch)
        step = epoch * steps_per_epoch
        scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # no optimizer.step() precedes this re-positioning step
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    return epoch, step


def _make_loader(dataset: Any, batch_size: int, shuffle: bool, num_workers: int | str, seed: int,
                 collate: Callable, device: torch.device | str, sampler: Any = None) -> torch.utils.data.DataLoader:
    """The loader of the teacher's batches: `num_workers` as `loader_workers` reads it (auto: follows the cores),
    batches pinned for asynchronous copies when the device is CUDA."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=loader_workers(num_workers), collate_fn=collate,
                                       generator=generator, drop_last=False, persistent_workers=False,
                                       pin_memory=torch.device(device).type == "cuda")


def evaluate_teacher(model: CenterPointTeacher, dataset: Any, collate: Callable, device: torch.device,
                     out_dir: Path, batch_size: int, num_workers: int | str = 0,
                     world: World = World()) -> dict[str, Any] | None:
    """Predict the dataset, write results.json and run the nuScenes evaluation into `out_dir` (the CenterHead's
    detections, the teacher's output); a teacher with a decoder also gets its DETR head scored into
    `out_dir`/decoder.

    Under torchrun rank r predicts samples r, r + W, ...; rank 0 gathers them in dataset order, writes and scores
    them and returns the summary (the other ranks return None).
    """
    indices = rank_indices(len(dataset), world)
    part = dataset if not world.distributed else torch.utils.data.Subset(dataset, indices)
    loader = _make_loader(part, batch_size, False, num_workers, 0, collate, device)
    detections = predict(model, loader, device, show_progress=world.is_main)
    summaries = {}
    for head, head_detections in detections.items():
        ordered = gather_ordered(list(zip(indices, head_detections)), len(dataset), world)
        if not world.is_main:
            continue
        head_dir = out_dir if head == "center" else out_dir / head
        head_dir.mkdir(parents=True, exist_ok=True)
        result_path = head_dir / "results.json"
        result_path.write_text(json.dumps(detections_to_results(ordered, dataset)))
        summaries[head] = evaluate_results(result_path, dataset, head_dir)
        if not (head_dir / "metrics_summary.json").is_file():
            (head_dir / "metrics_summary.json").write_text(json.dumps(summaries[head], indent=2))
        LOGGER.info("teacher evaluation (%s head):\n%s", head, format_metrics_table(summaries[head]))
    return summaries.get("center")


def run_teacher_training(config: TeacherExperimentConfig, run_dir: str | Path, device: str | torch.device = "cpu",
                         resume: bool = False, world: World = World(), sync_bn: bool = False) -> dict[str, Any]:
    """Train the teacher as configured, checkpointing every epoch; evaluate the val split at the end.

    `world`: this rank under torchrun (`distributed.init_from_env`); the default is a single process.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    # `precision: auto` resolved once for this device; config.yaml and latest.pth record what ran
    precision = training_precision(config.train.precision, device, "train-teacher", announce=world.is_main)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    train = config.train
    data = dataclasses.replace(config.data, load_images=False)
    seed_everything(train.seed)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
    train_set = NuScenesDetectionDataset(data, data.train_split, "train")
    sampler = None
    if world.distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(
            train_set, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=train.seed)
    loader = _make_loader(train_set, train.batch_size, True, train.num_workers, train.seed, collate_samples, device,
                          sampler)
    steps_per_epoch = len(loader) if train.max_steps_per_epoch <= 0 else min(len(loader), train.max_steps_per_epoch)
    model = set_memory_format(CenterPointTeacher(config.model).to(device), train.channels_last)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, train.epochs * steps_per_epoch)
    start_epoch, step = 0, 0
    if resume:
        start_epoch, step = load_run_state(run_dir, model, optimizer, scheduler, steps_per_epoch)
        LOGGER.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch, step)
    model = prepare_model(model, world, str(device), sync_bn)
    if world.is_main:
        LOGGER.info("training on %d rank(s): batch %d per rank, effective batch %d, %d steps per epoch",
                    world.world_size, train.batch_size, train.batch_size * world.world_size, steps_per_epoch)
    log_path = run_dir / "train_log.jsonl"
    for epoch in range(start_epoch + 1, train.epochs + 1):
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch - 1)
        if sampler is not None:
            sampler.set_epoch(epoch)
        else:
            loader.generator.manual_seed(train.seed + epoch)
        means = train_one_epoch(model, loader, optimizer, scheduler, device, epoch, train,
                                log_path if world.is_main else None, num_steps=steps_per_epoch, start_step=step,
                                show_progress=world.is_main)
        step += int(means["steps"])
        if world.is_main:
            _append_jsonl(log_path, {"kind": "epoch", "epoch": epoch, "step": step, **means})
            LOGGER.info("epoch %d/%d: loss %.4f (heatmap %.4f, box %.4f) in %.1f s", epoch, train.epochs,
                        means.get("loss", float("nan")), means.get("loss_heatmap", float("nan")),
                        means.get("loss_box", float("nan")), means["seconds"])
            save_run_state(run_dir, epoch, step, unwrap(model), optimizer, scheduler, config, steps_per_epoch,
                           world.world_size)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "epochs": train.epochs, "steps": step,
                               "checkpoint": str(run_dir / "latest.pth")}
    if train.evaluate:
        broadcast_buffers(model, world)  # every rank predicts with the checkpoint's BatchNorm statistics
        val_set = NuScenesDetectionDataset(data, data.val_split, "test")
        summary["metrics"] = evaluate_teacher(unwrap(model), val_set, collate_samples, device, run_dir / "eval",
                                              train.batch_size, train.num_workers, world)
    barrier(world)  # every rank leaves after rank 0 has written its checkpoint and evaluation
    return summary
