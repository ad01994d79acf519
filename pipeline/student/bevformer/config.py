"""Typed configuration of the BEVFormer student's encoder and detection head.

The defaults are BEVFormer-base's (projects/configs/bevformer/bevformer_base.py): 256 channels, a 200x200 BEV over
+-51.2 m at 0.512 m with z in [-5, 3], 6 encoder and 6 decoder layers, 900 object queries, 4 image feature levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...data.classes import DETECTION_CLASSES
from ...errors import ConfigError
from ..config import BEVRange


def bevformer_bev_range() -> BEVRange:
    """BEVFormer's point_cloud_range [-51.2, -51.2, -5, 51.2, 51.2, 3] on a 200x200 grid."""
    return BEVRange(x_min=-51.2, x_max=51.2, y_min=-51.2, y_max=51.2, resolution=0.512, z_min=-5.0, z_max=3.0)


@dataclass
class BEVFormerEncoderConfig:
    """BEV queries, temporal self-attention (TSA) and spatial cross-attention (SCA) layers."""

    num_layers: int = 6  # encoder layers, each TSA -> norm -> SCA -> norm -> FFN -> norm
    num_heads: int = 8  # attention heads of TSA and SCA
    num_levels: int = 4  # image feature levels SCA samples (the image FPN outputs)
    spatial_points: int = 8  # SCA sampling points per head and level, shared out over the pillar's z anchors
    temporal_points: int = 4  # TSA sampling points per head and frame
    num_z_anchors: int = 4  # reference points per BEV pillar (num_points_in_pillar)
    feedforward_channels: int = 512  # hidden width of each layer's FFN
    dropout: float = 0.1  # dropout on every attention output and inside the FFN


@dataclass
class BEVFormerHeadConfig:
    """DETR-style decoder over the BEV, its per-layer branches, Hungarian matching, losses and NMS-free decoding."""

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
    post_center_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)  # decoded centres kept inside

    def __post_init__(self) -> None:
        if len(self.code_weights) != 10:
            raise ConfigError(f"head.code_weights has {len(self.code_weights)} entries; give 10, one per box code "
                              f"(cx, cy, log l, log w, cz, log h, sin, cos, vx, vy)")
        unknown = [name for name in self.classes if name not in DETECTION_CLASSES]
        if unknown:
            raise ConfigError(f"head.classes names unknown classes {unknown}; use names from {list(DETECTION_CLASSES)}")
        if len(self.post_center_range) != 6:
            raise ConfigError(f"head.post_center_range has {len(self.post_center_range)} values; give 6 "
                              f"(x_min, y_min, z_min, x_max, y_max, z_max)")

    @property
    def class_ids(self) -> list[int]:
        """Global class id of every head label."""
        return [DETECTION_CLASSES.index(name) for name in self.classes]


@dataclass
class BEVFormerConfig:
    """The BEVFormer student's transformer: shared width and BEV grid, encoder, head."""

    embed_dims: int = 256  # C of the BEV queries, the object queries and the image features SCA reads
    bev: BEVRange = field(default_factory=bevformer_bev_range)  # BEV grid (augmented LiDAR frame) and pillar z range
    encoder: BEVFormerEncoderConfig = field(default_factory=BEVFormerEncoderConfig)
    head: BEVFormerHeadConfig = field(default_factory=BEVFormerHeadConfig)

    def __post_init__(self) -> None:
        for name, heads in (("encoder", self.encoder.num_heads), ("head", self.head.num_heads)):
            if heads <= 0 or self.embed_dims % heads:
                raise ConfigError(f"embed_dims {self.embed_dims} is not divisible by {name}.num_heads {heads}; "
                                  f"pick a head count that divides it")
        if self.embed_dims % 2:
            raise ConfigError(f"embed_dims {self.embed_dims} is odd; the learned BEV positional embedding gives half "
                              f"the channels to x and half to y, so use an even width")
        if self.encoder.spatial_points % self.encoder.num_z_anchors:
            raise ConfigError(f"encoder.spatial_points {self.encoder.spatial_points} is not a multiple of "
                              f"encoder.num_z_anchors {self.encoder.num_z_anchors}; each z anchor gets the same "
                              f"number of sampling points")
        if self.bev.z_max - self.bev.z_min < 1.0:
            raise ConfigError(f"bev z range [{self.bev.z_min}, {self.bev.z_max}) is under 1 m; the pillar anchors sit "
                              f"0.5 m inside both ends, so widen it")
        self.bev.grid()  # raises if the x / y range is not a whole number of cells
