"""`CameraStudent`: image backbone + neck -> depth/context -> lift-splat -> (two-frame fusion) -> BEV encoder ->
BEV neck -> CenterHead, for the four variants BEVDet, BEVDepth, BEVDet4D and BEVDepth4D.

    model = CameraStudent(config)                   # a StudentModelConfig (the `model` section of a student YAML)
    outputs = model(batch)                        # StudentOutputs
    losses = model.detection_loss(outputs, batch)  # CenterHead loss dict
    depth = model.depth_loss(outputs, batch)       # BEVDepth variants only
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..data.types import Batch
from ..errors import DataError
from ..heads.center_head import CenterHead
from .bev_encoder import BEVEncoder, BEVNeck
from .config import StudentModelConfig
from .depth_net import CameraAwareDepthNet, PlainDepthNet, depth_bce_loss, depth_targets
from .image_neck import ImageNeck
from .resnet import ResNet, load_torchvision_checkpoint
from .temporal import TemporalFusion
from .view_transformer import CameraGeometry, LiftSplat

logger = logging.getLogger(__name__)


@dataclass
class StudentOutputs:
    """features: "backbone0", "backbone1", "backbone2" (BEV encoder stages, (B, Ci, Y/2^(i+1), X/2^(i+1))) and
    "neck" (pre-head feature, (B, C, Y, X)); head: CenterHead outputs per task; depth: (B*N, D, Hf, Wf) depth
    probabilities of the current frame (BEVDepth variants) or None."""

    features: dict[str, torch.Tensor]
    head: list[dict[str, torch.Tensor]]
    depth: torch.Tensor | None

    def float(self) -> "StudentOutputs":
        """Every floating tensor in float32 (the outputs of a bf16-autocast forward, before the losses)."""
        def cast(value):
            return value.float() if torch.is_tensor(value) and value.is_floating_point() else value

        if isinstance(self.head, list):  # CenterHead: a dict of maps per task
            head = [{k: cast(v) for k, v in task.items()} for task in self.head]
        else:  # a dataclass of tensors (BEVFormer's DETR head)
            head = dataclasses.replace(self.head, **{f.name: cast(getattr(self.head, f.name))
                                                     for f in dataclasses.fields(self.head)})
        return StudentOutputs(features={k: cast(v) for k, v in self.features.items()}, head=head,
                              depth=None if self.depth is None else cast(self.depth))


def check_images(images: torch.Tensor | None, name: str, config: StudentModelConfig) -> torch.Tensor:
    """`images` (B, N, 3, H, W) of batch field `name`, or a DataError saying what the data config must change."""
    if images is None:
        raise DataError(f"batch.{name} is None; the camera student needs images: set the data config's "
                        f"load_images to true")
    expected = (config.num_cameras, 3, *config.image_size)
    if images.dim() != 5 or tuple(images.shape[1:]) != expected:
        raise DataError(f"batch.{name} has shape {tuple(images.shape)}, the student expects (B, {expected[0]}, "
                        f"3, {expected[2]}, {expected[3]}); make the data config's final_size equal the "
                        f"student's image_size and use {expected[0]} cameras")
    return images


class CameraStudent(nn.Module):
    def __init__(self, config: StudentModelConfig):
        super().__init__()
        if config.is_transformer:
            raise ValueError("variant bevformer is not a lift-splat student; build it with "
                             "pipeline.student.build.build_student (BEVFormerStudent)")
        self.config = config
        self.backbone = ResNet(config.backbone.depth, config.backbone.width_multiplier)
        if config.backbone.pretrained:
            load_torchvision_checkpoint(self.backbone, config.backbone.pretrained)
        self.image_neck = ImageNeck(self.backbone.out_channels, config.image_neck_channels)
        bins = config.depth_bins.count
        if config.uses_depth_supervision:
            self.depth_net: nn.Module = CameraAwareDepthNet(config.image_neck_channels, config.depth_net_channels,
                                                            config.lss_channels, bins)
        else:
            self.depth_net = PlainDepthNet(config.image_neck_channels, config.lss_channels, bins)
        self.lift_splat = LiftSplat(config.image_size, config.feature_stride, config.depth_bins, config.bev)
        bev_channels = config.lss_channels
        self.temporal: TemporalFusion | None = None
        if config.is_temporal:
            self.temporal = TemporalFusion(config.lss_channels, config.bev, config.temporal_pre_process,
                                           config.temporal_pre_process_before_align)
            bev_channels = self.temporal.out_channels
        self.bev_encoder = BEVEncoder(bev_channels, config.bev_encoder_channels, config.bev_encoder_blocks)
        encoder_channels = self.bev_encoder.out_channels
        self.bev_neck = BEVNeck(encoder_channels[0], encoder_channels[2], config.bev_neck_channels)
        self.head = CenterHead(config.head, config.bev_neck_channels)
        self._warned_no_previous = False

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of every entry of StudentOutputs.features (for the distillation adapters)."""
        c0, c1, c2 = self.bev_encoder.out_channels
        return {"backbone0": c0, "backbone1": c1, "backbone2": c2, "neck": self.config.bev_neck_channels}

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int]]:
        """(Y, X) of every entry of StudentOutputs.features."""
        num_y, num_x = self.config.bev.grid().shape
        return {f"backbone{i}": (num_y // 2 ** (i + 1), num_x // 2 ** (i + 1)) for i in range(3)} | {
            "neck": (num_y, num_x)}

    def encode_frame(self, images: torch.Tensor, geometry: CameraGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, N, 3, H, W) -> BEV features (B, C_lss, Y, X) and depth probabilities (B*N, D, Hf, Wf)."""
        batch, cameras = images.shape[:2]
        stride16, stride32 = self.backbone(images.flatten(0, 1))  # (B*N, C3, H/16, W/16), (B*N, C4, H/32, W/32)
        features = self.image_neck(stride16, stride32)  # (B*N, C, Hf, Wf)
        depth_logits, context = self.depth_net(features, geometry)
        depth = depth_logits.softmax(dim=1)  # (B*N, D, Hf, Wf)
        return self.lift_splat(depth, context, geometry), depth

    def _check_images(self, images: torch.Tensor | None, name: str) -> torch.Tensor:
        return check_images(images, name, self.config)

    def forward(self, batch: Batch) -> StudentOutputs:
        images = self._check_images(batch.images, "images")
        bev_aug = batch.bev_aug.to(images.device)
        geometry = CameraGeometry(batch.intrinsics, batch.camera_to_lidar, batch.image_aug, bev_aug)
        bev, depth = self.encode_frame(images, geometry)  # (B, C, Y, X), (B*N, D, Hf, Wf)
        if self.temporal is not None:
            bev = self._fuse_previous(bev, batch, bev_aug)  # (B, 2C, Y, X)
        backbone0, backbone1, backbone2 = self.bev_encoder(bev)
        neck = self.bev_neck(backbone0, backbone2)  # (B, C_neck, Y, X)
        features = {"backbone0": backbone0, "backbone1": backbone1, "backbone2": backbone2, "neck": neck}
        return StudentOutputs(features=features, head=self.head(neck),
                              depth=depth if self.config.uses_depth_supervision else None)

    def _fuse_previous(self, bev: torch.Tensor, batch: Batch, bev_aug: torch.Tensor) -> torch.Tensor:
        if batch.prev_images is None:
            # BEVDet4D's convention for a frame without a predecessor: the frame is its own previous frame.
            if not self._warned_no_previous:
                logger.warning("4D student got a batch without previous frames; using the current frame as the "
                               "previous one (set the data config's load_previous_frame to true)")
                self._warned_no_previous = True
            identity = torch.eye(4, dtype=bev_aug.dtype, device=bev.device).expand(bev.shape[0], 4, 4)
            return self.temporal(bev, bev.detach(), identity, bev_aug)
        previous_images = self._check_images(batch.prev_images, "prev_images")
        if batch.prev_lidar_to_lidar is None:
            raise DataError("batch.prev_images is set but batch.prev_lidar_to_lidar is None; the data loader must "
                            "provide the previous -> current LiDAR transform with the previous frame")
        previous_geometry = CameraGeometry(batch.prev_intrinsics, batch.prev_camera_to_lidar, batch.prev_image_aug,
                                           bev_aug)
        # The previous frame trains nothing (DistillBEV's detach=True): no graph, less memory and time.
        with torch.no_grad():
            previous, _ = self.encode_frame(previous_images, previous_geometry)
        return self.temporal(bev, previous, batch.prev_lidar_to_lidar.to(bev.device), bev_aug)

    def detection_loss(self, outputs: StudentOutputs, batch: Batch) -> dict[str, torch.Tensor]:
        """CenterHead loss terms on the (BEV-augmented) GT boxes: {"loss_heatmap", "loss_box"} (sum them)."""
        return self.head.loss(outputs.head, batch.gt_boxes, batch.gt_labels)

    def depth_loss(self, outputs: StudentOutputs, batch: Batch) -> torch.Tensor:
        """BEVDepth's LiDAR depth BCE (times depth_loss_weight) on the current frame's depth probabilities."""
        if outputs.depth is None:
            raise ValueError(f"variant {self.config.variant!r} has no depth supervision; depth_loss applies to "
                             f"bevdepth and bevdepth4d")
        geometry = CameraGeometry(batch.intrinsics, batch.camera_to_lidar, batch.image_aug,
                                  batch.bev_aug.to(outputs.depth.device))
        # key-frame points only (time lag 0): sweeps smear moving objects and depend on the sweep count; the
        # uncropped cloud when the batch has it (facades above the crop's z range still give depth)
        clouds = batch.depth_points if batch.depth_points is not None else batch.points
        key_frame = [p[p[:, 4] == 0].to(outputs.depth.device) for p in clouds]
        one_hot, valid = depth_targets(key_frame, geometry,
                                       self.config.image_size, self.config.feature_stride, self.config.depth_bins)
        return depth_bce_loss(outputs.depth, one_hot, valid, self.config.depth_loss_weight)
