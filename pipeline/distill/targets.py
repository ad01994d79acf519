"""Student training samples paired with their teacher targets.

Three ways to get the teacher's targets for a training sample:
- `cache`: pick one of the sample's cached views and replay its stored BEV augmentation exactly (the student's
  points, boxes and camera geometry get the very augmentation the teacher saw);
- `approximate`: draw a fresh BEV augmentation and warp the identity view's cached maps into it (`warp.py`);
- `online`: draw a fresh augmentation; the teacher runs live on the augmented cloud inside the training step.
A baseline run draws fresh augmentations and uses no targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.collate import collate_samples
from ..data.types import Batch, Sample
from ..geometry.bev import BEVAugmentation, sample_bev_augmentation
from .warp import warp_bev

TargetsMode = Literal["none", "cache", "approximate", "online"]


@dataclass
class TargetsBatch:
    """Teacher targets of a batch, stacked.

    features:  layer -> (B, C, Y, X) float32; heatmap: (B, 10, Yh, Xh) probabilities;
    attention: layer -> (B, Y, X) teacher spatial attention, or None (then computed from the features).
    """

    features: dict[str, torch.Tensor]
    heatmap: torch.Tensor
    attention: dict[str, torch.Tensor] | None

    def to(self, device: torch.device | str) -> "TargetsBatch":
        return TargetsBatch(
            features={k: v.to(device, non_blocking=True) for k, v in self.features.items()},
            heatmap=self.heatmap.to(device, non_blocking=True),
            attention=None if self.attention is None else
            {k: v.to(device, non_blocking=True) for k, v in self.attention.items()},
        )


@dataclass
class TargetsItem:
    """One sample's targets: features layer -> (C, Y, X); heatmap (10, Yh, Xh); attention layer -> (Y, X)."""

    features: dict[str, torch.Tensor]
    heatmap: torch.Tensor
    attention: dict[str, torch.Tensor] | None


class DistillationDataset(Dataset):
    """(Sample, TargetsItem | None) pairs over a training split, for one of the targets modes.

    The random draws (view choice, fresh augmentation, image augmentation) come from a generator seeded by
    (seed, epoch, position), so a run is reproducible across DataLoader workers and after a resume.
    """

    def __init__(self, dataset, mode: TargetsMode, cache=None, seed: int = 0,
                 bev_extent: tuple[float, float, float, float] | None = None,
                 use_cached_attention: bool = True, indices: list[int] | None = None) -> None:
        """indices: the dataset index behind each position (CBGS resampling repeats some), default every index once.
        Draws are seeded by position, so repeated samples get their own augmentation and view."""
        if mode in ("cache", "approximate") and cache is None:
            raise ValueError(f"targets mode {mode!r} needs a cache")
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        self.mode = mode
        self.cache = cache
        self.seed = seed
        self.epoch = 0
        self.bev_extent = bev_extent
        # cached attention was computed at the cache's temperature; recompute it when the run uses another one
        self.use_cached_attention = use_cached_attention
        self._cache_index = None if cache is None else [cache.index_of(t) for t in dataset.sample_tokens]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def worker_start_method(self) -> str | None:
        """DataLoader `multiprocessing_context` for this dataset's workers: the cache's (forkserver for an
        object-store cache, whose clients do not survive a fork), else None (the default fork)."""
        return None if self.cache is None else self.cache.worker_start_method

    def __len__(self) -> int:
        return len(self.indices)

    def _fresh_augmentation(self, rng: np.random.Generator) -> BEVAugmentation:
        data = self.dataset.config
        return sample_bev_augmentation(rng, data.bev_rotation_lim, data.bev_scale_lim,
                                       data.bev_flip_x_prob, data.bev_flip_y_prob)

    def __getitem__(self, position: int) -> tuple[Sample, TargetsItem | None]:
        rng = np.random.default_rng([self.seed, self.epoch, position])
        index = self.indices[position]
        if self.mode == "cache":
            cache_index = self._cache_index[index]
            view = int(rng.integers(self.cache.num_views))
            cached = self.cache.read(cache_index, view)
            sample = self.dataset.get(index, bev_aug=cached.bev_aug, rng=rng)
            sample.view_index = view
            return sample, TargetsItem(cached.features, cached.heatmap,
                                       cached.attention if self.use_cached_attention else None)
        augmentation = self._fresh_augmentation(rng)
        sample = self.dataset.get(index, bev_aug=augmentation, rng=rng)
        if self.mode == "approximate":
            cached = self.cache.read(self._cache_index[index], 0)
            return sample, TargetsItem(
                features={k: warp_bev(v, augmentation, self.bev_extent) for k, v in cached.features.items()},
                heatmap=warp_bev(cached.heatmap, augmentation, self.bev_extent),
                attention=None,  # recomputed from the warped features
            )
        return sample, None


def collate_with_targets(items: list[tuple[Sample, TargetsItem | None]]) -> tuple[Batch, TargetsBatch | None]:
    """Collate (sample, targets) pairs: a Batch plus stacked targets (None when the mode has none)."""
    batch = collate_samples([sample for sample, _ in items])
    targets = [t for _, t in items]
    if targets[0] is None:
        return batch, None
    attention = None
    if targets[0].attention is not None:
        attention = {k: torch.stack([t.attention[k] for t in targets]) for k in targets[0].attention}
    return batch, TargetsBatch(
        features={k: torch.stack([t.features[k] for t in targets]) for k in targets[0].features},
        heatmap=torch.stack([t.heatmap for t in targets]),
        attention=attention,
    )
