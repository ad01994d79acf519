"""The student training loop: one step = student forward, detection (+ depth) loss, DistillBEV loss.

`train_student` wires the run (data, cache, models, optimiser, checkpoints); the step and the epoch are small
functions so benchmarks and tests can drive them directly.

Under torchrun `run_epochs` steps a DistributedDataParallel wrapper of `TrainableModules` (the student and the
DistillBEV loss) on this rank's shard of each epoch (`train_sampler`); rank 0 alone writes the log (its own losses)
and the checkpoints, which record the steps per epoch and the world size so a run resumes under another one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import dump_config, to_dict
from ..data.handover import block_bytes, check_shared_memory, loader_workers
from ..distributed import World
from ..heads.targets import gt_heatmap_max
from ..losses.distill import DistillBEVLoss
from ..precision import PrecisionSetting, autocast, resolve_precision
from ..safe_pickle import load_checkpoint
from .config import StudentExperimentConfig
from .targets import DistillationDataset, TargetsBatch, collate_with_targets

log = logging.getLogger(__name__)


@dataclass
class DistillationSetup:
    """Everything a training step needs besides the batch."""

    student: torch.nn.Module
    distill_loss: DistillBEVLoss | None
    teacher: torch.nn.Module | None  # only for `online` targets
    layers: list[tuple[str, str]]  # (student feature, teacher feature) pairs
    precision: PrecisionSetting = "fp32"  # autocast dtype of the student's forward; its outputs reach the losses in
    # float32. `auto` is resolved here for the student's device (`train_student` resolves and logs it first)

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.precision, next(self.student.parameters()).device)[0]


def teacher_targets_online(teacher: torch.nn.Module, batch, layers: list[str]) -> TargetsBatch:
    """Run the frozen teacher on the batch's (augmented) points: features, clip-sigmoid heatmap."""
    with torch.no_grad():
        outputs = teacher(batch.points)
    heatmap = outputs.heatmap.sigmoid().clamp(1e-4, 1 - 1e-4)
    return TargetsBatch(features={name: outputs.features[name] for name in layers}, heatmap=heatmap, attention=None)


def false_positive_gt_heatmap(gt_boxes, gt_labels, head_config, head_grid) -> torch.Tensor:
    """(B, Y, X) max-class GT gaussian heatmap for the FP rule, drawn with the head's own radius settings
    (gaussian_overlap, min_radius), as the head's targets are."""
    return gt_heatmap_max(gt_boxes, gt_labels, head_grid, gaussian_overlap=head_config.gaussian_overlap,
                          min_radius=head_config.min_radius)


def training_step(setup: DistillationSetup, batch, targets: TargetsBatch | None,
                  head_grid) -> dict[str, torch.Tensor]:
    """Loss terms of one batch (scalars). `head_grid` is the BEVGrid of the detection head; int8 teacher features
    (an int8 cache's handover) are dequantised here, on the device the batch was copied to."""
    student = setup.student
    targets = None if targets is None else targets.dequantized()
    with autocast(next(student.parameters()).device, setup.precision):
        outputs = student(batch)
    features = outputs.features  # as the forward made them: the loss casts them for its adapters' arithmetic
    if setup.precision != "fp32":
        outputs = outputs.float()
    losses = dict(student.detection_loss(outputs, batch))
    if outputs.depth is not None:
        losses["depth"] = student.depth_loss(outputs, batch)
    if setup.distill_loss is not None:
        # what the DataLoader workers computed of the loss (masks, scales, GT heatmap, teacher attention), if anything
        precomputed = None if targets is None else targets.precomputed
        if targets is None or targets.features is None:
            targets = teacher_targets_online(setup.teacher, batch, [t for _, t in setup.layers])
        gt_max = None
        if setup.distill_loss.needs_gt_heatmap and (precomputed is None or precomputed.gt_heatmap_max is None):
            # drawn with the CenterHead settings of the student config (the BEVFormer student's config keeps them
            # for this region, on the teacher heatmap's grid)
            gt_max = false_positive_gt_heatmap(batch.gt_boxes, batch.gt_labels, student.config.head, head_grid)
            gt_max = gt_max.to(targets.heatmap.device)
        losses.update(setup.distill_loss(
            student_features=features, teacher_features=targets.features, gt_boxes=batch.gt_boxes,
            teacher_heatmap=targets.heatmap, gt_heatmap_max=gt_max, teacher_attention=targets.attention,
            precomputed=precomputed))
    return losses


class TrainableModules(torch.nn.Module):
    """The student and the DistillBEV loss (its adapters and g convs) as one module whose forward is the whole
    `training_step`; under torchrun one DistributedDataParallel wrapper holds it.

    One wrapper rather than one per module: the student's features only reach a loss through the distillation
    module, so a single forward covers every trainable parameter, one reducer averages all their gradients in one
    pass, and one buffer broadcast per step keeps the student's and the adapters' BatchNorm statistics at rank 0's.
    The frozen teacher of `online` targets is not a submodule (nothing of it is synchronised).
    """

    def __init__(self, setup: DistillationSetup, head_grid) -> None:
        super().__init__()
        self.student = setup.student
        if setup.distill_loss is not None:
            self.distill_loss = setup.distill_loss
        self._setup = setup
        self._head_grid = head_grid

    def forward(self, batch, targets: TargetsBatch | None) -> dict[str, torch.Tensor]:
        return training_step(self._setup, batch, targets, self._head_grid)


def train_sampler(train_set: DistillationDataset, world: World,
                  seed: int) -> torch.utils.data.distributed.DistributedSampler | None:
    """This rank's shard of every epoch under torchrun, None for one process (which shuffles as it always has).

    A DistributedSampler over the dataset's positions: each epoch (set_epoch) a permutation drawn from seed + epoch,
    padded with its first positions to a multiple of the world size, rank r taking positions r, r + W, ... of it. With
    CBGS the positions are the resampled index list, so the ranks split that list the same way.
    """
    if not world.distributed:
        return None
    return torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=world.world_size, rank=world.rank,
                                                           shuffle=True, seed=seed, drop_last=False)


def steps_per_epoch(cfg: StudentExperimentConfig, train_set: DistillationDataset, sampler=None) -> int:
    """Steps of one epoch on this rank: its shard (the whole set for one process) in full batches (drop_last)."""
    return (len(train_set) if sampler is None else len(sampler)) // cfg.train.batch_size


def learning_rate(cfg: StudentExperimentConfig, epoch: int, iteration: int) -> float:
    """Linear warmup over the first iterations, then step decay (x0.1) after each epoch in lr_steps."""
    train = cfg.train
    lr = train.lr * (0.1 ** sum(epoch >= step for step in train.lr_steps))
    if iteration < train.warmup_iters:
        ratio = train.warmup_ratio + (1 - train.warmup_ratio) * iteration / train.warmup_iters
        lr *= ratio
    return lr


def save_checkpoint(path: Path, setup: DistillationSetup, optimizer, epoch: int, iteration: int,
                    cfg: StudentExperimentConfig, steps_per_epoch: int = 0, world_size: int = 1) -> None:
    """The run state after `epoch`, with the steps per epoch and the world size its iteration count was made under."""
    tmp = path.with_suffix(".tmp")
    torch.save({
        "state_dict": {k: v.contiguous() for k, v in setup.student.state_dict().items()},  # NCHW even if trained NHWC
        "distill_state_dict": None if setup.distill_loss is None else setup.distill_loss.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "config": to_dict(cfg),
        "torch_rng": torch.get_rng_state(),
        "steps_per_epoch": steps_per_epoch,
        "world_size": world_size,
    }, tmp)
    tmp.replace(path)  # a kill mid-save never leaves a truncated checkpoint behind


def load_resume(path: Path, setup: DistillationSetup, optimizer, steps_per_epoch: int = 0) -> tuple[int, int]:
    """Restore the run state; returns (epochs done, iterations done).

    When the checkpoint counted another number of steps per epoch (another world size or batch), the iteration
    count, and with it the warmup, restarts at epochs done x `steps_per_epoch`; the epoch count carries over.
    """
    # weights only: a run directory can come from elsewhere
    state = load_checkpoint(path, what="resume checkpoint", fix="train-student writes only tensors and plain values "
                            "into latest.pth; delete the file and drop --resume to start over")
    setup.student.load_state_dict(state["state_dict"])
    if setup.distill_loss is not None and state.get("distill_state_dict") is not None:
        setup.distill_loss.load_state_dict(state["distill_state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    epoch, iteration = state["epoch"], state["iteration"]
    saved = int(state.get("steps_per_epoch", 0))
    if steps_per_epoch and saved and saved != steps_per_epoch:
        log.info("resuming with %d steps per epoch (the run had %d, world size %d): the schedule continues at "
                 "iteration %d", steps_per_epoch, saved, int(state.get("world_size", 1)), epoch * steps_per_epoch)
        iteration = epoch * steps_per_epoch
    return epoch, iteration


PREFETCH_FACTOR = 2  # batches each DataLoader worker keeps ready (torch's default)


def train_loader(cfg: StudentExperimentConfig, train_set: DistillationDataset, epoch: int, device: torch.device,
                 workers: int, sampler=None) -> DataLoader:
    """One epoch's loader: shuffled by seed + epoch (or this rank's `sampler`), `workers` processes handing batches
    over as one block each, pinned when the device is CUDA (so the step's non-blocking copies overlap)."""
    return DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                      drop_last=True, num_workers=workers, collate_fn=collate_with_targets,
                      generator=torch.Generator().manual_seed(cfg.train.seed + epoch), persistent_workers=False,
                      pin_memory=torch.device(device).type == "cuda",
                      prefetch_factor=PREFETCH_FACTOR if workers else None,
                      multiprocessing_context=train_set.worker_start_method if workers else None)


def check_loader_memory(cfg: StudentExperimentConfig, train_set: DistillationDataset, workers: int) -> int:
    """The shared-memory bytes the loader will hold, checked against /dev/shm's free space (`check_shared_memory`:
    a ConfigError naming Docker's --shm-size when they do not fit); 0 without workers. One batch is estimated from
    the first sample collated `train.batch_size` times."""
    if workers <= 0 or len(train_set) == 0:
        return 0
    first = train_set[0]
    batch_bytes = block_bytes(tuple(collate_with_targets([first] * cfg.train.batch_size)))
    return check_shared_memory(batch_bytes, workers, PREFETCH_FACTOR)


def run_epochs(cfg: StudentExperimentConfig, setup: DistillationSetup, train_set: DistillationDataset,
               optimizer, out_dir: Path, device: torch.device, head_grid, start_epoch: int = 0,
               start_iteration: int = 0, max_steps: int | None = None,
               after_epoch: Callable[[int, int], None] | None = None, world: World = World(),
               model: torch.nn.Module | None = None, sampler=None) -> int:
    """Train from `start_epoch` to `cfg.train.epochs`; returns the final iteration count.

    after_epoch(epoch, iteration) runs after each completed epoch (1-based), before its checkpoint is written, so an
    interrupted run redoes the epoch and its callback together.
    Under torchrun: `model` is the DDP-wrapped `TrainableModules` the steps go through (None: `training_step` on
    `setup` itself), `sampler` this rank's `train_sampler`; only rank 0 (`world.is_main`) writes.
    """
    log_path = out_dir / "train_log.jsonl"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    iteration = start_iteration
    epoch_steps = steps_per_epoch(cfg, train_set, sampler)
    workers = loader_workers(cfg.train.num_workers)
    if start_epoch < cfg.train.epochs:
        if world.is_main:
            log.info("DataLoader: %d worker(s) (train.num_workers %s), pinned batches: %s", workers,
                     cfg.train.num_workers, torch.device(device).type == "cuda")
        check_loader_memory(cfg, train_set, workers)
    for epoch in range(start_epoch, cfg.train.epochs):
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = train_loader(cfg, train_set, epoch, device, workers, sampler)
        setup.student.train()
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step", leave=False,
                        disable=not world.is_main)
        wait_start = time.perf_counter()
        for batch, targets in progress:
            data_seconds = time.perf_counter() - wait_start
            batch = batch.to(device)
            targets = None if targets is None else targets.to(device)
            lr = learning_rate(cfg, epoch, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # through the DDP wrapper under torchrun (it averages the gradients over the ranks in backward)
            losses = training_step(setup, batch, targets, head_grid) if model is None else model(batch, targets)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {iteration}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            iteration += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            record = {"epoch": epoch, "iteration": iteration, "lr": lr, "loss": float(total.detach()),
                      "grad_norm": float(grad_norm), "data_seconds": data_seconds, **values}
            if world.is_main:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            progress.set_postfix(postfix_terms(values) | {"loss": f"{record['loss']:.3g}"})
            wait_start = time.perf_counter()
            if max_steps is not None and iteration >= max_steps:
                return iteration
        if after_epoch is not None:
            after_epoch(epoch + 1, iteration)
        if world.is_main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs):
            ckpt_dir = out_dir / "checkpoints"
            ckpt_dir.mkdir(exist_ok=True)
            for path in (ckpt_dir / f"epoch_{epoch + 1}.pth", out_dir / "latest.pth"):
                save_checkpoint(path, setup, optimizer, epoch + 1, iteration, cfg, epoch_steps, world.world_size)
    return iteration


def postfix_terms(values: dict[str, float]) -> dict[str, str]:
    """Short progress-bar labels: the detection terms, and each distilled layer's summed KD terms."""
    shown: dict[str, float] = {}
    for key, value in values.items():
        name = key.removeprefix("loss_")
        if key.startswith("kd_"):
            name = "kd_" + key[3:].rsplit("_", 1)[0]
        shown[name] = shown.get(name, 0.0) + value
    return {k: f"{v:.3g}" for k, v in shown.items()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def write_config(cfg: StudentExperimentConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
