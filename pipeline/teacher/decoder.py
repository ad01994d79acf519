"""The teacher's optional DETR decoder: SECONDFPN output -> 1x1 conv + LayerNorm ("bev_embed") -> BEVFormer's head.

The reference distils a BEVFormer student from a LiDAR transformer built to mirror it, so the student can inherit
its decoder and branches and imitate the feature that decoder reads. This is that teacher's decoder on the pillar
network: the BEV feature a BEVFormer student imitates is `bev_embed`, the input of the same head the student has.

    embed = BEVEmbedding(neck_channels=192, embed_dims=64)
    bev = embed(neck)                                       # (B, 192, Y, X) -> (B, 64, Y, X)
    head = decoder_head(model_config)                       # a BEVFormerHead over the teacher's head grid
    outputs = head(bev)                                     # BEVFormerHeadOutputs
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry.bev import BEVRange
from ..heads.detr.config import DETRHeadSpec
from ..heads.detr.head import BEVFormerHead
from .config import TeacherModelConfig

DECODER_PREFIX = "detr."  # the decoder head's keys in the teacher's head state (and the cache's teacher_head group)


class BEVEmbedding(nn.Module):
    """(B, C_neck, Y, X) -> (B, embed_dims, Y, X): a 1x1 conv, then a LayerNorm over the channels of every cell (the
    normalisation BEVFormer's encoder output has, so the inherited decoder reads features of the same scale)."""

    def __init__(self, neck_channels: int, embed_dims: int):
        super().__init__()
        self.projection = nn.Conv2d(neck_channels, embed_dims, kernel_size=1)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, neck: torch.Tensor) -> torch.Tensor:
        projected = self.projection(neck)  # (B, E, Y, X)
        return self.norm(projected.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over E per cell


def decoder_head_spec(config: TeacherModelConfig) -> DETRHeadSpec:
    """What the teacher's DETR head is built from: embed_dims and head from `config.decoder`, the BEV range = the head
    grid with the point cloud's z range (where box centres are decoded)."""
    if config.decoder is None:
        raise ValueError("the teacher config has no decoder section")
    grid = config.head_grid
    bev = BEVRange(grid.x_min, grid.x_max, grid.y_min, grid.y_max, grid.resolution,
                   config.point_cloud_range[2], config.point_cloud_range[5])
    return DETRHeadSpec(head=config.decoder.head, embed_dims=config.decoder.embed_dims, bev=bev)


def decoder_head(config: TeacherModelConfig) -> BEVFormerHead:
    """The DETR head of a teacher with a decoder section."""
    return BEVFormerHead(decoder_head_spec(config))
