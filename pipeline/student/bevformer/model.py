"""`BEVFormerStudent`: ResNet + FPN -> BEVFormer encoder (with the previous frame's BEV) -> DETR head, as a
student of this project (the same `StudentOutputs` as `CameraStudent`, so the training loop and the DistillBEV loss
take it unchanged).

    model = BEVFormerStudent(config)               # a StudentModelConfig with variant bevformer
    outputs = model(batch)                         # StudentOutputs: features {"neck": bev_embed}, head, depth None
    losses = model.detection_loss(outputs, batch)  # Hungarian focal + L1 terms of every decoder layer

The distilled feature is the encoder output, the reference's `bev_embed` (B, C, Y, X). It is named "neck" here:
it is the pre-head BEV feature, the role the FPN_LSS output "neck" has in the lift-splat students, so the layer pair
`neck <-> neck` (the teacher's pre-head SECONDFPN output), the attention snapshots and the ablations address it the
same way for every student.

The previous frame (data config `load_previous_frame`) is encoded by the same network under no_grad and in eval mode
(the reference's obtain_history_bev: no dropout, BatchNorm running statistics), then aligned to the current frame by
the ego motion inside temporal self-attention. One previous frame, where the reference queues three: the batch
carries one adjacent frame (docs/method.md, "BEVFormer student").
"""

from __future__ import annotations

import torch
from torch import nn

from ...data.types import Batch
from ...errors import DataError
from ...heads.detr.head import BEVFormerHead
from ..config import StudentModelConfig
from ..image_neck import FeaturePyramid
from ..model import StudentOutputs, check_images
from ..resnet import ResNet, load_torchvision_checkpoint
from ..view_transformer import CameraGeometry
from .encoder import BEVFormerEncoder

PRE_HEAD = "neck"  # the name of the BEV feature in StudentOutputs.features


class BEVFormerStudent(nn.Module):
    """Images (+ the previous frame's images) -> BEV feature (B, C, Y, X) -> DETR head outputs."""

    def __init__(self, config: StudentModelConfig):
        super().__init__()
        if not config.is_transformer or config.bevformer is None:
            raise ValueError(f"BEVFormerStudent needs variant bevformer with a model.bevformer section, found variant "
                             f"{config.variant!r}; build lift-splat variants with CameraStudent")
        self.config = config
        transformer = config.bevformer
        levels = transformer.encoder.num_levels
        self.backbone = ResNet(config.backbone.depth, config.backbone.width_multiplier)
        if config.backbone.pretrained:
            load_torchvision_checkpoint(self.backbone, config.backbone.pretrained)
        # The deepest min(levels, 3) ResNet stages feed the FPN (BEVFormer-base: layer2-4 + one extra level;
        # BEVFormer-small: layer4 alone); levels beyond three are stride-2 convs on the last output.
        self.pyramid_inputs = min(levels, 3)
        self.image_neck = FeaturePyramid(self.backbone.pyramid_channels[3 - self.pyramid_inputs:],
                                         transformer.embed_dims, num_extra=levels - self.pyramid_inputs)
        self.encoder = BEVFormerEncoder(transformer, config.num_cameras)
        self.head = BEVFormerHead(transformer.detr_head)

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of every entry of StudentOutputs.features (for the distillation adapters)."""
        return {PRE_HEAD: self.config.bevformer.embed_dims}

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int]]:
        """(Y, X) of every entry of StudentOutputs.features."""
        return {PRE_HEAD: tuple(self.config.bev.grid().shape)}

    def image_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, N, 3, H, W) -> num_levels maps (B, N, C, H_l, W_l), finest first (strides 8/16/32/64 for four
        levels)."""
        batch, cameras = images.shape[:2]
        stages = self.backbone.forward_pyramid(images.flatten(0, 1))[3 - self.pyramid_inputs:]  # (B*N, C_i, H_i, W_i)
        return [level.unflatten(0, (batch, cameras)) for level in self.image_neck(stages)]  # (B, N, C, H_l, W_l)

    def encode_frame(self, images: torch.Tensor, geometry: CameraGeometry, previous_bev: torch.Tensor | None = None,
                     prev_lidar_to_lidar: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, N, 3, H, W) (+ the previous BEV (B, C, Y, X) in its own LiDAR frame) -> BEV (B, C, Y, X)."""
        return self.encoder(self.image_features(images), geometry, self.config.image_size, previous_bev,
                            prev_lidar_to_lidar)

    def _check_images(self, images: torch.Tensor | None, name: str) -> torch.Tensor:
        return check_images(images, name, self.config)

    def previous_bev(self, batch: Batch, bev_aug: torch.Tensor) -> torch.Tensor | None:
        """The previous frame's BEV (B, C, Y, X) under the current BEV augmentation, without gradient, or None when
        the batch has no previous frame (the current frame then attends to itself, as BEVFormer's first frame)."""
        if batch.prev_images is None:
            return None
        images = self._check_images(batch.prev_images, "prev_images")
        if batch.prev_lidar_to_lidar is None:
            raise DataError("batch.prev_images is set but batch.prev_lidar_to_lidar is None; the data loader must "
                            "provide the previous -> current LiDAR transform with the previous frame")
        geometry = CameraGeometry(batch.prev_intrinsics, batch.prev_camera_to_lidar, batch.prev_image_aug, bev_aug)
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.encode_frame(images, geometry)
        finally:
            self.train(training)

    def forward(self, batch: Batch) -> StudentOutputs:
        images = self._check_images(batch.images, "images")
        bev_aug = batch.bev_aug.to(images.device)
        previous = self.previous_bev(batch, bev_aug)
        motion = None if previous is None else batch.prev_lidar_to_lidar.to(images.device)
        geometry = CameraGeometry(batch.intrinsics, batch.camera_to_lidar, batch.image_aug, bev_aug)
        bev = self.encode_frame(images, geometry, previous, motion)  # (B, C, Y, X)
        return StudentOutputs(features={PRE_HEAD: bev}, head=self.head(bev), depth=None)

    def detection_loss(self, outputs: StudentOutputs, batch: Batch) -> dict[str, torch.Tensor]:
        """Hungarian-matched focal + L1 terms on the (BEV-augmented) GT boxes, every decoder layer (sum them)."""
        return self.head.loss(outputs.head, batch.gt_boxes, batch.gt_labels)
