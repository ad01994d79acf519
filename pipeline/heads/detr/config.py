"""Typed configuration of the DETR-style detection head (BEVFormer's), shared by the BEVFormer student and the
decoder teacher that mirrors it.

The defaults are BEVFormer-base's head (projects/configs/bevformer/bevformer_base.py): 900 object queries, 6 decoder
layers with box refinement, focal + L1 losses and Hungarian matching, NMS-free top-300 decoding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...data.classes import DETECTION_CLASSES
from ...errors import ConfigError
from ...geometry.bev import BEVRange
from ..post_center import resolve_post_center_range


@dataclass
class BEVFormerHeadConfig:
    """DETR-style decoder over the BEV, its per-layer branches, Hungarian matching, losses and NMS-free decoding.

    `post_center_range` is derived and need not be written: the config that knows the BEV (the student's
    BEVFormerConfig, the teacher's model config, a DETRHeadSpec) fills it in from the BEV's extent and
    `post_center_margin` (`over`). An explicit range (configs and records written before) is kept as given.
    """

    num_queries: int = 900  # object queries
    num_layers: int = 6  # decoder layers, each with its own class and box branch (with_box_refine)
    num_heads: int = 8  # heads of the decoder's self-attention and BEV deformable cross-attention
    num_points: int = 4  # BEV sampling points per head in the cross-attention
    feedforward_channels: int = 512  # hidden width of each layer's FFN
    dropout: float = 0.1  # dropout on attention outputs and inside the FFN
    num_branch_fcs: int = 2  # hidden Linear layers of each class / box branch (num_reg_fcs)
    classes: tuple[str, ...] = DETECTION_CLASSES  # label l of the head is class id l (mmdet3d nuScenes order)
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)  # per box-code L1 weights
    class_loss_weight: float = 2.0  # sigmoid focal loss weight
    focal_alpha: float = 0.25  # focal loss and focal matching cost alpha
    focal_gamma: float = 2.0  # focal loss and focal matching cost gamma
    box_loss_weight: float = 0.25  # L1 loss weight on the box codes
    class_cost_weight: float = 2.0  # Hungarian matching: focal class cost weight
    box_cost_weight: float = 0.25  # Hungarian matching: L1 cost weight on the first 8 box codes
    max_detections: int = 300  # decode: top-k over query x class scores (max_num)
    score_threshold: float | None = None  # decode: drop detections below this score (None keeps all top-k)
    post_center_range: tuple[float, ...] | None = None  # decoded centres kept inside (x_min, y_min, z_min, x_max,
    # y_max, z_max); None: the BEV's x / y extent grown by post_center_margin, z [-10, 10]
    post_center_margin: float | None = None  # metres around the BEV; None: 10 m (BEVFormer's +-61.2 m), or what an
    # explicit post_center_range says

    def __post_init__(self) -> None:
        if len(self.code_weights) != 10:
            raise ConfigError(f"head.code_weights has {len(self.code_weights)} entries; give 10, one per box code "
                              f"(cx, cy, log l, log w, cz, log h, sin, cos, vx, vy)")
        unknown = [name for name in self.classes if name not in DETECTION_CLASSES]
        if unknown:
            raise ConfigError(f"head.classes names unknown classes {unknown}; use names from {list(DETECTION_CLASSES)}")
        if self.post_center_range is not None and len(self.post_center_range) != 6:
            raise ConfigError(f"head.post_center_range has {len(self.post_center_range)} values; give 6 "
                              f"(x_min, y_min, z_min, x_max, y_max, z_max)")

    @property
    def class_ids(self) -> list[int]:
        """Global class id of every head label."""
        return [DETECTION_CLASSES.index(name) for name in self.classes]

    def over(self, bev: BEVRange) -> "BEVFormerHeadConfig":
        """This head decoding over `bev`: its post_center_range derived from the BEV's x / y extent and the margin
        when not given (pipeline/heads/post_center.py); a ConfigError when a given range and margin disagree."""
        try:
            post_center_range, margin = resolve_post_center_range(
                self.post_center_range, self.post_center_margin, (bev.x_min, bev.x_max, bev.y_min, bev.y_max))
        except ValueError as exc:
            raise ConfigError(f"head: {exc}") from exc
        if post_center_range == self.post_center_range and margin == self.post_center_margin:
            return self
        return dataclasses.replace(self, post_center_range=post_center_range, post_center_margin=margin)


@dataclass(frozen=True)
class DETRHeadSpec:
    """What a DETR head is built from: its own settings, the width C of the BEV feature (B, C, Y, X) it reads and
    that BEV's metric range (x / y extent of the grid and the z range its box centres are scaled onto). The head's
    post_center_range is derived from `bev` here when its config leaves it out."""

    head: BEVFormerHeadConfig
    embed_dims: int
    bev: BEVRange

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", self.head.over(self.bev))
        if self.head.num_heads <= 0 or self.embed_dims % self.head.num_heads:
            raise ConfigError(f"embed_dims {self.embed_dims} is not divisible by head.num_heads "
                              f"{self.head.num_heads}; pick a head count that divides it")
        self.bev.grid()  # raises if the x / y range is not a whole number of cells
