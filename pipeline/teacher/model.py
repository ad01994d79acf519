"""CenterPoint-pillar teacher: points -> pillars -> canvas -> SECOND -> SECONDFPN -> CenterHead, and with a
`decoder` section also SECONDFPN -> bev_embed -> a DETR head (decoder.py), the teacher of BEVFormer students.

Attribute names (`pts_voxel_encoder`, `pts_backbone`, `pts_neck`, `pts_bbox_head`) match mmdet3d's CenterPoint,
so `state_dict()` keys equal those of an mmdet3d 1.x `centerpoint_pillar02_second_secfpn` checkpoint; the decoder
adds `pts_bev_embed` and `pts_detr_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..heads.center_head import CenterHead
from ..heads.detr.head import BEVFormerHeadOutputs
from .backbone import SECOND
from .config import TeacherModelConfig
from .decoder import DECODER_PREFIX, BEVEmbedding, decoder_head
from .neck import SECONDFPN
from .pillars import PillarFeatureNet, scatter_to_canvas

# Feature names of `TeacherOutputs.features` (also the cache's layer names); a teacher with a decoder adds BEV_EMBED.
FEATURE_NAMES: tuple[str, ...] = ("backbone0", "backbone1", "backbone2", "neck")
BEV_EMBED = "bev_embed"


@dataclass
class TeacherOutputs:
    """What one teacher forward pass produces.

    features: "backbone0", "backbone1", "backbone2" (SECOND stages, (B, C_i, Y_i, X_i)) and "neck" (SECONDFPN,
        (B, C_neck, Yh, Xh)), all laid out [Y, X]; with a decoder also "bev_embed" (B, E, Yh, Xh).
    heatmap: (B, 10, Yh, Xh) heatmap logits, the tasks concatenated (= DETECTION_CLASSES order).
    head: per task {reg (B,2,Yh,Xh), height (B,1,..), dim (B,3,..), rot (B,2,..), vel (B,2,..), heatmap}.
    occupancy: (B, Y, X) bool, canvas cells holding at least one point.
    decoder: the DETR head's outputs (a teacher with a decoder), else None.
    """

    features: dict[str, torch.Tensor]
    heatmap: torch.Tensor
    head: list[dict[str, torch.Tensor]]
    occupancy: torch.Tensor
    decoder: BEVFormerHeadOutputs | None = None


class CenterPointTeacher(nn.Module):
    """The LiDAR teacher. `forward(points)` with points a list of B tensors (P_b, 5) in the LiDAR frame."""

    def __init__(self, config: TeacherModelConfig):
        super().__init__()
        self.config = config
        self.canvas_grid = config.canvas_grid
        self.head_grid = config.head_grid
        self.pts_voxel_encoder = PillarFeatureNet(
            config.point_features, config.pillar_channels, config.point_cloud_range, config.pillar_size,
            config.max_points_per_pillar, config.max_pillars, eps=config.pillar_bn_eps, momentum=config.bn_momentum)
        self.pts_backbone = SECOND(config.pillar_channels, config.backbone_channels, config.backbone_layer_nums,
                                   config.backbone_strides, eps=config.bn_eps, momentum=config.bn_momentum)
        self.pts_neck = SECONDFPN(config.backbone_channels, config.neck_channels, config.neck_upsample_strides,
                                  eps=config.bn_eps, momentum=config.bn_momentum)
        self.pts_bbox_head = CenterHead(config.head, config.neck_out_channels)
        if config.decoder is not None:
            self.pts_bev_embed = BEVEmbedding(config.neck_out_channels, config.decoder.embed_dims)
            self.pts_detr_head = decoder_head(config)

    @property
    def has_decoder(self) -> bool:
        return self.config.decoder is not None

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of every entry of `TeacherOutputs.features`."""
        channels = {f"backbone{i}": c for i, c in enumerate(self.config.backbone_channels)}
        channels["neck"] = self.config.neck_out_channels
        if self.has_decoder:
            channels[BEV_EMBED] = self.config.decoder.embed_dims
        return channels

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int]]:
        """(Y, X) of every entry of `TeacherOutputs.features`."""
        num_y, num_x = self.canvas_grid.shape
        shapes = {}
        stride = 1
        for i, s in enumerate(self.config.backbone_strides):
            stride *= s
            shapes[f"backbone{i}"] = ((num_y - 1) // stride + 1, (num_x - 1) // stride + 1)
        shapes["neck"] = self.head_grid.shape
        if self.has_decoder:
            shapes[BEV_EMBED] = self.head_grid.shape
        return shapes

    def head_state(self) -> dict[str, torch.Tensor]:
        """What a student may inherit: the CenterHead's state_dict, and the DETR head's under DECODER_PREFIX."""
        state = dict(self.pts_bbox_head.state_dict())
        if self.has_decoder:
            state.update({DECODER_PREFIX + k: v for k, v in self.pts_detr_head.state_dict().items()})
        return state

    def forward(self, points: list[torch.Tensor]) -> TeacherOutputs:
        """points: B tensors (P_b, >= 5) x, y, z, intensity, time lag -> `TeacherOutputs`."""
        num_y, num_x = self.canvas_grid.shape
        pillars = self.pts_voxel_encoder(points)
        canvas, occupancy = scatter_to_canvas(pillars, len(points), num_y, num_x)  # (B, C, Y, X), (B, Y, X)
        stages = self.pts_backbone(canvas)
        neck = self.pts_neck(stages)  # (B, C_neck, Yh, Xh)
        head = self.pts_bbox_head(neck)
        features = {f"backbone{i}": stage for i, stage in enumerate(stages)}
        features["neck"] = neck
        decoder = None
        if self.has_decoder:
            # The decoder runs in float32 (deformable sampling and Hungarian costs), under any autocast.
            with torch.autocast(neck.device.type, enabled=False):
                bev = self.pts_bev_embed(neck.float())  # (B, E, Yh, Xh)
                decoder = self.pts_detr_head(bev.contiguous())
            features[BEV_EMBED] = bev
        return TeacherOutputs(features=features, heatmap=CenterHead.concatenated_heatmap(head), head=head,
                              occupancy=occupancy, decoder=decoder)
