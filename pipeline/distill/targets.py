"""Student training samples paired with their teacher targets.

Three ways to get the teacher's targets for a training sample:
- `cache`: pick one of the sample's cached views and replay its stored BEV augmentation exactly (the student's
  points, boxes and camera geometry get the very augmentation the teacher saw);
- `approximate`: draw a fresh BEV augmentation and warp the identity view's cached maps into it (`warp.py`);
- `online`: draw a fresh augmentation; the teacher runs live on the augmented cloud inside the training step.
A baseline run draws fresh augmentations and uses no targets.

With a `StepPrecompute`, the workers also compute everything of the DistillBEV loss that does not depend on the
student (`pipeline/losses/distill.py` `precompute_targets`): per sample, on the boxes of the view it replays or the
augmentation it drew, the region masks and scales, the GT heatmap of the FP rule, the teacher's spatial attention
(when the cache does not hold it at the run's temperature), channel attention and channel mean. With `online`
targets only the GT-only parts can be done here (the teacher's maps come from the step). The workers then read only
the teacher layers the loss distils, and leave out the teacher heatmap once the FP masks are built from it.
`collate_with_targets` hands a worker's batch over as one shared-memory block (`pipeline/data/handover.py`).

An int8 cache's features cross that boundary as stored, int8 values with per-channel scales and offsets
(`QuantizedFeatures`, a quarter of the float32 bytes), and are dequantised on the training device after the copy
(`TargetsBatch.dequantized`, called by the training step); the workers dequantise a copy only for what they compute
from the maps (attention, channel means), which they hand over as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..cache.quantize import QuantizedFeatures, dequantized
from ..data.collate import collate_samples
from ..data.handover import HandedOverBatch, share_one_block_in_worker
from ..data.types import Batch, Sample
from ..geometry.bev import BEVAugmentation, BEVGrid, sample_bev_augmentation
from ..heads.targets import gt_heatmap_max
from ..losses.attention import spatial_attention
from ..losses.distill import DistillBEVLoss, DistillTargetSpec, PrecomputedTargets, precompute_targets
from .warp import warp_bev

TargetsMode = Literal["none", "cache", "approximate", "online"]


@dataclass
class TargetsBatch:
    """Teacher targets of a batch, stacked.

    features:  layer -> (B, C, Y, X) float32, or its int8 form from an int8 cache (`QuantizedFeatures`, made float32
               by `dequantized` on the training device), or None with a live teacher (it runs in the step);
    heatmap: (B, 10, Yh, Xh) probabilities, or None with a live teacher, or when the workers built every layer's
             masks (it feeds only the FP masks);
    attention: layer -> (B, Y, X) teacher spatial attention, or None (then computed from the features);
    precomputed: the loss's student-independent inputs from the workers, or None (then computed in the step).
    """

    features: dict[str, torch.Tensor | QuantizedFeatures] | None
    heatmap: torch.Tensor | None
    attention: dict[str, torch.Tensor] | None
    precomputed: PrecomputedTargets | None = None

    def dequantized(self) -> "TargetsBatch":
        """The targets with int8 features dequantised to float32 where they are (itself when none are int8)."""
        if self.features is None or not any(isinstance(v, QuantizedFeatures) for v in self.features.values()):
            return self
        return TargetsBatch({k: dequantized(v) for k, v in self.features.items()}, self.heatmap, self.attention,
                            self.precomputed)

    def to(self, device: torch.device | str) -> "TargetsBatch":
        return TargetsBatch(
            features=None if self.features is None else  # QuantizedFeatures.to copies non-blocking too
            {k: v.to(device, non_blocking=True) for k, v in self.features.items()},
            heatmap=None if self.heatmap is None else self.heatmap.to(device, non_blocking=True),
            attention=None if self.attention is None else
            {k: v.to(device, non_blocking=True) for k, v in self.attention.items()},
            precomputed=None if self.precomputed is None else self.precomputed.to(device),
        )


@dataclass
class TargetsItem:
    """One sample's targets: features layer -> (C, Y, X) float32 or int8 (`QuantizedFeatures`); heatmap
    (10, Yh, Xh); attention layer -> (Y, X); the
    loss's precomputed inputs (a batch of 1). features and heatmap are None with a live teacher; heatmap is also
    None once the precomputed inputs hold every layer's masks."""

    features: dict[str, torch.Tensor | QuantizedFeatures] | None
    heatmap: torch.Tensor | None
    attention: dict[str, torch.Tensor] | None
    precomputed: PrecomputedTargets | None = None


@dataclass(frozen=True)
class StepPrecompute:
    """What the workers need to compute the loss's student-independent inputs: the loss's spec, and the detection
    head's grid and gaussian settings for the GT heatmap of the FP rule (as `false_positive_gt_heatmap` draws it)."""

    loss: DistillTargetSpec
    head_grid: BEVGrid
    gaussian_overlap: float
    min_radius: int

    def gt_heatmap(self, sample: Sample) -> torch.Tensor | None:
        """(Yh, Xh) max-class GT gaussian heatmap of the sample, None when no layer has the FP region."""
        if not self.loss.needs_gt_heatmap:
            return None
        return gt_heatmap_max([sample.gt_boxes], [sample.gt_labels], self.head_grid,
                              gaussian_overlap=self.gaussian_overlap, min_radius=self.min_radius)[0]


def step_precompute(distill_loss: DistillBEVLoss, head_config, head_grid: BEVGrid) -> StepPrecompute:
    """The StepPrecompute of a run: `head_config` is the student's CenterHeadConfig (the BEVFormer student's config
    keeps it for the FP region), `head_grid` the grid of the teacher heatmap."""
    return StepPrecompute(distill_loss.target_spec(), head_grid, float(head_config.gaussian_overlap),
                          int(head_config.min_radius))


class DistillationDataset(Dataset):
    """(Sample, TargetsItem | None) pairs over a training split, for one of the targets modes.

    The random draws (view choice, fresh augmentation, image augmentation) come from a generator seeded by
    (seed, epoch, position), so a run is reproducible across DataLoader workers and after a resume.
    """

    def __init__(self, dataset, mode: TargetsMode, cache=None, seed: int = 0,
                 bev_extent: tuple[float, float, float, float] | None = None,
                 use_cached_attention: bool = True, indices: list[int] | None = None,
                 precompute: StepPrecompute | None = None, int8_handover: bool = True) -> None:
        """indices: the dataset index behind each position (CBGS resampling repeats some), default every index once.
        Draws are seeded by position, so repeated samples get their own augmentation and view.
        precompute: compute the loss's student-independent inputs here, per sample (None: the step does).
        int8_handover: `cache` targets of an int8 cache leave as int8 (`QuantizedFeatures`), dequantised on the
        training device; False dequantises them here, to float32 (4x the bytes through shared memory)."""
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
        self.int8_handover = int8_handover
        self._cache_index = None if cache is None else [cache.index_of(t) for t in dataset.sample_tokens]
        self.precompute = None if mode == "none" else precompute
        # with the loss's spec known here, only the teacher layers it distils are read (None: every cached layer)
        self._teacher_layers = (None if self.precompute is None
                                else sorted({pair.teacher for pair in self.precompute.loss.pairs}))

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
            cached = self.cache.read(cache_index, view, layers=self._teacher_layers,
                                     dequantize=not self.int8_handover)
            sample = self.dataset.get(index, bev_aug=cached.bev_aug, rng=rng)
            sample.view_index = view
            item = TargetsItem(cached.features, cached.heatmap, cached.attention if self.use_cached_attention else None)
            return sample, self._with_precomputed(sample, item)
        augmentation = self._fresh_augmentation(rng)
        sample = self.dataset.get(index, bev_aug=augmentation, rng=rng)
        if self.mode == "approximate":
            cached = self.cache.read(self._cache_index[index], 0, layers=self._teacher_layers)
            item = TargetsItem(
                features={k: warp_bev(v, augmentation, self.bev_extent) for k, v in cached.features.items()},
                heatmap=warp_bev(cached.heatmap, augmentation, self.bev_extent),
                attention=None,  # recomputed from the warped features
            )
            return sample, self._with_precomputed(sample, item)
        if self.mode == "online" and self.precompute is not None:
            # the teacher runs in the step: only the GT-only inputs are computed here
            return sample, self._with_precomputed(sample, TargetsItem(None, None, None))
        return sample, None

    def _with_precomputed(self, sample: Sample, item: TargetsItem) -> TargetsItem:
        """The item with the loss's student-independent inputs of this sample (unchanged without `precompute`)."""
        if self.precompute is None:
            return item
        spec = self.precompute.loss
        attention = item.attention
        features = item.features
        if not (spec.config.attention or spec.config.spatial_l1):
            features = None  # nothing is computed from the maps
        elif features is not None:
            # what is computed from the maps needs them in float32: a copy here, the int8 form is handed over
            features = {name: dequantized(value) for name, value in features.items()}
        if features is not None and attention is None and spec.config.attention:
            # the teacher's spatial attention at the run's temperature, as the loss computes it (B = 1)
            attention = {name: spatial_attention(features[name][None].float(), spec.config.temperature)[0]
                         for name in {pair.teacher for pair in spec.pairs}}
        precomputed = precompute_targets(spec, sample.gt_boxes, self.precompute.gt_heatmap(sample),
                                         teacher_features=features, teacher_heatmap=item.heatmap)
        # the teacher heatmap only feeds the FP masks: once every layer's masks are built, the step does not need it
        heatmap = None if all(layer.regions is not None for layer in precomputed.layers.values()) else item.heatmap
        return TargetsItem(item.features, heatmap, attention, precomputed)


def _stack_features(maps: list[torch.Tensor | QuantizedFeatures]) -> torch.Tensor | QuantizedFeatures:
    """(C, Y, X) maps of one layer -> (B, C, Y, X), int8 ones kept int8."""
    if isinstance(maps[0], QuantizedFeatures):
        return QuantizedFeatures.stack(maps)
    return torch.stack(maps)


def collate_with_targets(items: list[tuple[Sample, TargetsItem | None]]) -> HandedOverBatch:
    """Collate (sample, targets) pairs: (Batch, stacked targets or None when the mode has none), as one block."""
    batch = collate_samples([sample for sample, _ in items])
    targets = [t for _, t in items]
    if targets[0] is None:
        return HandedOverBatch(share_one_block_in_worker((batch, None)))
    attention = None
    if targets[0].attention is not None:
        attention = {k: torch.stack([t.attention[k] for t in targets]) for k in targets[0].attention}
    precomputed = None
    if targets[0].precomputed is not None:
        precomputed = PrecomputedTargets.cat([t.precomputed for t in targets])
    # one shared-memory block per batch out of a worker (pipeline/data/handover.py)
    return HandedOverBatch(share_one_block_in_worker((batch, TargetsBatch(
        features=None if targets[0].features is None else
        {k: _stack_features([t.features[k] for t in targets]) for k in targets[0].features},
        heatmap=None if targets[0].heatmap is None else torch.stack([t.heatmap for t in targets]),
        attention=attention,
        precomputed=precomputed,
    ))))
