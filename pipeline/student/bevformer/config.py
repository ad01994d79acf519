"""Typed configuration of the BEVFormer student's encoder and detection head.

The defaults are BEVFormer-base's (projects/configs/bevformer/bevformer_base.py): 256 channels, 6 encoder and 6
decoder layers, 900 object queries, 4 image feature levels. The BEV is the student's model.bev (BEVFormer-base's
200x200 grid over +-51.2 m at 0.512 m with z in [-5, 3]: configs/nuscenes/student_bevformer.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigError
from ...geometry.bev import BEVRange
from ...heads.detr.config import BEVFormerHeadConfig, DETRHeadSpec


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
    # SCA memory (same outputs either way): queries sampled per camera at once (0: all at once), and whether training
    # recomputes the bilinear samples in the backward pass instead of keeping them (benchmarks/bevformer_memory.py)
    spatial_query_chunk: int = 2048
    spatial_recompute: bool = True


@dataclass
class BEVFormerConfig:
    """The BEVFormer student's transformer: shared width and BEV grid, encoder, head.

    `bev` is the student's `model.bev` and need not be written: StudentModelConfig fills it in (a given value must
    equal model.bev). Once the BEV is known the head's post_center_range is derived from it (head.over).
    """

    embed_dims: int = 256  # C of the BEV queries, the object queries and the image features SCA reads
    bev: BEVRange | None = None  # BEV grid (augmented LiDAR frame) and pillar z range; None: the student's model.bev
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
        if self.bev is None:
            return  # filled in by the student's model config
        if self.bev.z_max - self.bev.z_min < 1.0:
            raise ConfigError(f"bev z range [{self.bev.z_min}, {self.bev.z_max}) is under 1 m; the pillar anchors sit "
                              f"0.5 m inside both ends, so widen it")
        self.bev.grid()  # raises if the x / y range is not a whole number of cells
        self.head = self.head.over(self.bev)

    @property
    def detr_head(self) -> DETRHeadSpec:
        """What the detection head is built from: its settings, the BEV width and the BEV range."""
        if self.bev is None:
            raise ConfigError("bevformer.bev is not set: a BEVFormerConfig takes the student's model.bev when it is "
                              "part of a StudentModelConfig; give a bev when using one on its own")
        return DETRHeadSpec(head=self.head, embed_dims=self.embed_dims, bev=self.bev)
