"""Typed configuration of the camera students (BEVDet, BEVDepth, BEVDet4D, BEVDepth4D, BEVFormer).

The defaults are the full-size paper recipe (ResNet-50, 256x704 input, depth bins 1..60 m, BEV 128^2 at 0.8 m over
+-51.2 m, 64 LSS channels per frame, BEV encoder [128, 256, 512], neck 256). The small CPU configs in
configs/synthetic/ override what differs. The `bevformer` variant reads image_size, num_cameras, backbone, bev and
head.grid from this config and its transformer from the `bevformer` section (bevformer/config.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..data.config import DEFAULT_POINT_CLOUD_RANGE
from ..geometry.bev import BEVRange
from ..heads.center_head import CenterHeadConfig
from .bevformer.config import BEVFormerConfig

StudentVariant = Literal["bevdet", "bevdepth", "bevdet4d", "bevdepth4d", "bevformer"]


@dataclass
class ImageBackboneConfig:
    """ResNet image backbone with torchvision's layout and key names."""

    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth: 18/34 use BasicBlock, 50/101 Bottleneck
    width_multiplier: float = 1.0  # scales every stage width (1.0 = torchvision; 0.25 for tiny CPU configs)
    pretrained: str | None = None  # path of a torchvision ImageNet state_dict (.pth) loaded strictly, or None


@dataclass
class DepthBins:
    """Depth bins along each camera ray: bin k covers [start + k*step, start + (k+1)*step)."""

    start: float = 1.0  # metres, lower edge of the first bin
    stop: float = 60.0  # metres, exclusive upper end (BEVDet's dbound)
    step: float = 1.0  # metres per bin

    @property
    def count(self) -> int:
        """D, the number of bins (BEVDet: len(arange(start, stop, step)))."""
        return int(round((self.stop - self.start) / self.step))


@dataclass
class StudentModelConfig:
    """A camera student; `variant` picks depth supervision (bevdepth*) and two-frame fusion (*4d), or BEVFormer.

    `bev` is the student's BEV range, given once: `head.grid` (None) becomes bev's grid, `bevformer.bev` (None)
    becomes `bev`, and each head's post_center_range follows from its grid and margin. A given copy must agree
    (configs, checkpoints and manifests written before record every copy). For `bevformer` the LSS fields (depth
    bins, lss / depth-net / BEV-encoder channels, temporal settings) are unused, and `head` (a CenterHeadConfig)
    only gives `head.grid`: the grid of the teacher heatmap, which the cache check and the false-positive region
    read (bev's extent at any resolution: the CenterPoint teacher's head grid; bev's own resolution when not given).
    """

    variant: StudentVariant = "bevdepth4d"  # which student
    image_size: tuple[int, int] = (256, 704)  # (H, W) of the augmented input images
    num_cameras: int = 6  # N cameras per sample
    backbone: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    image_neck_channels: int = 512  # channels of the stride-16 image feature after the neck
    depth_bins: DepthBins = field(default_factory=DepthBins)
    bev: BEVRange = field(default_factory=BEVRange)
    lss_channels: int = 64  # context channels lifted per frame (numC_Trans)
    depth_net_channels: int = 512  # mid channels of BEVDepth's camera-aware depth net
    temporal_pre_process: bool = True  # BEVDet4D: a stride-1 residual stage on each frame's BEV before fusion
    temporal_pre_process_before_align: bool = True  # the reference's before=True: refine, then align the previous
    bev_encoder_channels: tuple[int, int, int] = (128, 256, 512)  # backbone0/1/2 widths (strides 2, 2, 2)
    bev_encoder_blocks: tuple[int, int, int] = (2, 2, 2)  # residual blocks per BEV encoder stage
    bev_neck_channels: int = 256  # FPN_LSS output = the pre-head feature "neck"
    head: CenterHeadConfig = field(default_factory=CenterHeadConfig)
    depth_loss_weight: float = 100.0  # BEVDepth's loss_depth_weight on the depth BCE
    bevformer: BEVFormerConfig | None = None  # the BEVFormer transformer (variant bevformer only)

    def __post_init__(self) -> None:
        height, width = self.image_size
        if height % 32 or width % 32:
            raise ValueError(f"image_size {self.image_size} must be multiples of 32 (the ResNet's stride)")
        if self.head.grid is None:
            self.head = dataclasses.replace(self.head, grid=self.bev.grid())
        if self.variant == "bevformer":
            self._check_bevformer()
            return
        if self.bevformer is not None:
            raise ValueError(f"model.bevformer is set but variant is {self.variant!r}; remove the bevformer section "
                             f"or set variant: bevformer")
        if self.depth_bins.count <= 0:
            raise ValueError(f"depth_bins {self.depth_bins} give no bins; need start < stop and step > 0")
        grid = self.bev.grid()
        num_y, num_x = grid.shape
        if num_y % 8 or num_x % 8:
            raise ValueError(f"BEV grid {num_y}x{num_x} must be divisible by 8 (three stride-2 BEV encoder stages)")
        if not self.head.grid.matches(grid):
            raise ValueError(f"head.grid {self.head.grid} must equal the student's BEV grid {grid} (the head runs on "
                             f"the neck output, which has the BEV grid's shape); give the range once: remove "
                             f"head.grid (it is derived from model.bev)")

    def _check_bevformer(self) -> None:
        if self.bevformer is None:
            raise ValueError("variant bevformer needs a model.bevformer section (a BEVFormerConfig); see "
                             "configs/synthetic/student_bevformer.yaml")
        if self.bevformer.bev is None:
            self.bevformer = dataclasses.replace(self.bevformer, bev=self.bev)
        if self.bevformer.bev != self.bev:
            raise ValueError(f"model.bevformer.bev {self.bevformer.bev} differs from model.bev {self.bev}; give the "
                             f"range once: remove model.bevformer.bev (it is model.bev)")
        grid, head_grid = self.bev.grid(), self.head.grid
        extent = (grid.x_min, grid.x_max, grid.y_min, grid.y_max)
        if (head_grid.x_min, head_grid.x_max, head_grid.y_min, head_grid.y_max) != extent:
            raise ValueError(f"head.grid {head_grid} must span the BEV range {extent} (it is the teacher heatmap's "
                             f"grid over the same area); set head.grid to the teacher's head grid")

    @property
    def lidar_range(self) -> tuple[float, float, float, float, float, float]:
        """The LiDAR crop that goes with this BEV (the experiment's data.point_cloud_range when not given): bev's x / y
        extent, so the training GT is the BEV's, and the loader's default z slab (what a LiDAR teacher reads; bev's
        own z range is where image features are pooled, a separate choice)."""
        z_min, z_max = DEFAULT_POINT_CLOUD_RANGE[2], DEFAULT_POINT_CLOUD_RANGE[5]
        return (self.bev.x_min, self.bev.y_min, z_min, self.bev.x_max, self.bev.y_max, z_max)

    @property
    def uses_depth_supervision(self) -> bool:
        return self.variant in ("bevdepth", "bevdepth4d")

    @property
    def is_temporal(self) -> bool:
        """The student reads the previous frame's cameras (BEVDet4D fusion, BEVFormer's temporal self-attention)."""
        return self.variant in ("bevdet4d", "bevdepth4d", "bevformer")

    @property
    def is_transformer(self) -> bool:
        """The BEVFormer student (encoder + DETR head) rather than a lift-splat one."""
        return self.variant == "bevformer"

    @property
    def feature_stride(self) -> int:
        """Image pixels per image-feature cell (the neck outputs stride 16)."""
        return 16


@dataclass
class BackbonePretrainConfig:
    """`distillbev pretrain-backbone`'s schedule (the student config's `pretrain` section)."""

    epochs: int = 24
    batch_size: int = 2  # key frames per step (each gives num_cameras images)
    lr: float = 2e-3  # AdamW, cosine decay to 0 after a linear warmup
    weight_decay: float = 0.01
    warmup_iters: int = 50
    head_channels: int = 64
    depth_weight: float = 1.0  # L1 on log camera depth at the centre cells, next to the mean focal loss per centre
    min_overlap: float = 0.7  # CenterNet's 2D gaussian radius overlap
    min_radius: int = 1  # cells; at stride 8 most boxes' CenterNet radius is below one cell
    num_workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_radius < 0:
            raise ValueError(f"pretrain.min_radius must be at least 0, found {self.min_radius}")
        for name in ("epochs", "batch_size", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be at least 1, found {getattr(self, name)}")
        if not 0.0 < self.min_overlap < 1.0:
            raise ValueError(f"pretrain.min_overlap must be in (0, 1), found {self.min_overlap}")
