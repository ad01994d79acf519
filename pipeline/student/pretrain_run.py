"""The `pretrain-backbone` loop: the student's ResNet and a centre head over the train split's camera images.

Writes OUT/backbone.pth (the backbone's state_dict in torchvision key names, what `backbone.pretrained` loads),
OUT/pretrain_log.jsonl (one line per step), OUT/pretrain_summary.json (with the losses on the val split) and
OUT/config.yaml. The loss terms are in `pretrain.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import dump_config
from ..data.classes import DETECTION_CLASSES
from ..data.collate import collate_samples
from ..data.dataset import NuScenesDetectionDataset
from ..errors import ConfigError
from ..precision import autocast, set_memory_format, training_precision
from .config import BackbonePretrainConfig
from .pretrain import STRIDE, CentrePretrainHead, image_centre_targets, pretrain_losses
from .resnet import ResNet, load_torchvision_checkpoint

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pth"


def pretrain_lr(config: BackbonePretrainConfig, iteration: int, total: int) -> float:
    """Linear warmup from lr/10 over warmup_iters, then cosine decay to 0 at `total` steps."""
    if iteration < config.warmup_iters:
        return config.lr * (0.1 + 0.9 * iteration / config.warmup_iters)
    progress = (iteration - config.warmup_iters) / max(1, total - config.warmup_iters)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain_backbone(cfg, out_dir: Path, device: str = "cpu") -> dict:
    """Pretrain the image backbone of the student config `cfg` (a StudentExperimentConfig) on its train split.

    The backbone starts from `model.backbone.pretrained` when the config names a file (e.g. ImageNet weights to
    adapt), else from a random init. Returns {"backbone": path, "steps": n, "seconds": s, "last": the last step's
    losses, "val": the val split's mean losses}.
    """
    config: BackbonePretrainConfig = cfg.pretrain
    model_config = cfg.model
    if not cfg.data.load_images:
        raise ConfigError("pretrain-backbone needs camera images: set the student config's data.load_images to true")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / BACKBONE_FILE
    if target.exists():
        raise ConfigError(f"{target}: already exists; choose another --out or remove it")
    # `train.precision: auto` resolved once for this device; OUT/config.yaml records what ran
    precision = training_precision(cfg.train.precision, device, "pretrain-backbone")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    torch.manual_seed(config.seed)
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, "train")
    steps_per_epoch = len(dataset) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"split {cfg.data.train_split!r} has {len(dataset)} key frames, fewer than "
                          f"pretrain.batch_size {config.batch_size}; lower the batch size")
    total = steps_per_epoch * config.epochs
    backbone = ResNet(model_config.backbone.depth, model_config.backbone.width_multiplier)
    if model_config.backbone.pretrained:
        load_torchvision_checkpoint(backbone, model_config.backbone.pretrained)
    head = CentrePretrainHead(backbone.pyramid_channels, len(DETECTION_CLASSES), config.head_channels)
    modules = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    set_memory_format(modules, cfg.train.channels_last)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    dump_config(cfg, out_dir / "config.yaml")
    log_path = out_dir / "pretrain_log.jsonl"
    log_path.write_text("")
    iteration, started, last = 0, time.perf_counter(), {}
    modules.train()
    for epoch in range(config.epochs):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            num_workers=config.num_workers, collate_fn=collate_samples,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        progress = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{config.epochs}", unit="step", leave=False)
        for batch in progress:
            lr = pretrain_lr(config, iteration, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, precision):
                losses, centres = batch_losses(cfg, modules, batch, device)
            total_loss = losses["heatmap"] + losses["depth"]
            if not torch.isfinite(total_loss):
                raise FloatingPointError(f"non-finite pretraining loss at step {iteration}: "
                                         f"{ {k: float(v) for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()
            iteration += 1
            last = {k: float(v.detach()) for k, v in losses.items()}
            with log_path.open("a") as f:
                f.write(json.dumps({"epoch": epoch, "iteration": iteration, "lr": lr, "centres": centres,
                                    **last}) + "\n")
            progress.set_postfix({k: f"{v:.3g}" for k, v in last.items()})
    held_out = validation_losses(cfg, modules, device)
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    torch.save(state, partial)
    os.replace(partial, target)  # a reader never sees a half-written checkpoint
    seconds = time.perf_counter() - started
    log.info("pretrained the image backbone for %d steps in %.1f s: %s (val split: %s)", iteration, seconds, target,
             held_out)
    summary = {"backbone": str(target), "steps": iteration, "seconds": round(seconds, 1),
               "last": {k: float(np.round(v, 4)) for k, v in last.items()}, "val": held_out}
    (out_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@torch.no_grad()
def validation_losses(cfg, modules: torch.nn.ModuleDict, device: str) -> dict[str, float]:
    """The two loss terms averaged over the val split's key frames (test mode: no augmentation), so a user can see
    whether the pretraining generalises beyond the train images (a train loss far below this is overfitting)."""
    config: BackbonePretrainConfig = cfg.pretrain
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.val_split, "test")
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
                        collate_fn=collate_samples)
    modules.eval()
    sums, batches = {"heatmap": 0.0, "depth": 0.0}, 0
    for batch in tqdm(loader, desc="pretrain val", unit="step", leave=False):
        for key, value in batch_losses(cfg, modules, batch, device)[0].items():
            sums[key] += float(value)
        batches += 1
    modules.train()
    return {key: round(value / max(1, batches), 4) for key, value in sums.items()}


def batch_losses(cfg, modules: torch.nn.ModuleDict, batch, device: str) -> tuple[dict[str, torch.Tensor], int]:
    """One collated Batch -> (the pretraining losses, the number of centres drawn): targets from its GT boxes and
    camera geometry, the backbone's pyramid over its B*N images, the head."""
    config: BackbonePretrainConfig = cfg.pretrain
    targets = image_centre_targets(batch.gt_boxes, batch.gt_labels, batch.intrinsics, batch.camera_to_lidar,
                                   batch.image_aug, batch.bev_aug, tuple(cfg.model.image_size), STRIDE,
                                   len(DETECTION_CLASSES), float(cfg.model.depth_bins.stop), config.min_overlap,
                                   config.min_radius)
    targets = dataclasses.replace(targets, heatmap=targets.heatmap.to(device),
                                  log_depth=targets.log_depth.to(device), centre_mask=targets.centre_mask.to(device))
    images = batch.images.flatten(0, 1).to(device)  # (B, N, 3, H, W) -> (B*N, 3, H, W)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    heatmap, log_depth = modules["head"](*modules["backbone"].forward_pyramid(images))
    return pretrain_losses(heatmap, log_depth, targets, config.depth_weight), targets.num_centres
