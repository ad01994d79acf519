"""The BEVFormer encoder + head end to end on CPU (tiny shapes), the loss on a hand-made perfect prediction, and the
NMS-free decode into Detections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVRange
from distillbev.pipeline.heads.detr.box_coder import encode_boxes
from distillbev.pipeline.heads.detr.config import BEVFormerHeadConfig
from distillbev.pipeline.heads.detr.head import BEVFormerHead, BEVFormerHeadOutputs
from distillbev.pipeline.student.bevformer.config import BEVFormerConfig, BEVFormerEncoderConfig
from distillbev.pipeline.student.bevformer.encoder import BEVFormerEncoder
from distillbev.pipeline.student.view_transformer import CameraGeometry

IMAGE_SIZE = (32, 64)


def tiny_config(**head_overrides) -> BEVFormerConfig:
    head = dict(num_queries=12, num_layers=2, num_heads=2, num_points=2, feedforward_channels=32, max_detections=6)
    head.update(head_overrides)
    return BEVFormerConfig(
        embed_dims=16, bev=BEVRange(x_min=-16.0, x_max=16.0, y_min=-16.0, y_max=16.0, resolution=4.0, z_min=-3.0,
                                    z_max=3.0),
        encoder=BEVFormerEncoderConfig(num_layers=2, num_heads=2, num_levels=2, spatial_points=4, temporal_points=2,
                                       num_z_anchors=2, feedforward_channels=32),
        head=BEVFormerHeadConfig(**head))


def two_camera_geometry(batch: int) -> CameraGeometry:
    """Level cameras at the origin looking along +x and -x."""
    def camera(yaw: float) -> torch.Tensor:
        transform = torch.eye(4)
        transform[:3, 0] = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])  # right
        transform[:3, 1] = torch.tensor([0.0, 0.0, -1.0])  # down
        transform[:3, 2] = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])  # forward
        return transform

    intrinsics = torch.tensor([[30.0, 0.0, 31.5], [0.0, 30.0, 15.5], [0.0, 0.0, 1.0]])
    return CameraGeometry(intrinsics=intrinsics.expand(batch, 2, 3, 3).clone(),
                          camera_to_lidar=torch.stack([camera(0.0), camera(math.pi)]).expand(batch, 2, 4, 4).clone(),
                          image_aug=torch.eye(3).expand(batch, 2, 3, 3).clone(),
                          bev_aug=torch.eye(4).expand(batch, 4, 4).clone())


def test_encoder_and_head_train_end_to_end_with_a_previous_frame():
    torch.manual_seed(0)
    config = tiny_config()
    encoder, head = BEVFormerEncoder(config, num_cameras=2), BEVFormerHead(config.detr_head)
    geometry = two_camera_geometry(batch=2)
    features = [torch.randn(2, 2, 16, 8, 16, requires_grad=True), torch.randn(2, 2, 16, 4, 8)]
    with torch.no_grad():
        previous = encoder(features, geometry, IMAGE_SIZE)  # the first frame attends to itself
    motion = torch.eye(4).repeat(2, 1, 1)
    motion[:, 0, 3] = -4.0
    bev = encoder(features, geometry, IMAGE_SIZE, previous, motion)
    assert previous.shape == bev.shape == (2, 16, 8, 8)
    outputs = head(bev)
    assert outputs.class_logits.shape == (2, 2, 12, 10) and outputs.box_codes.shape == (2, 2, 12, 10)
    gt_boxes = [torch.tensor([[6.0, 2.0, 0.0, 4.2, 1.9, 1.6, 0.3, 1.0, 0.0],
                              [-8.0, -5.0, 0.5, 0.7, 0.7, 1.8, 1.0, 0.0, 0.0]]), torch.zeros(0, 9)]
    gt_labels = [torch.tensor([0, 8]), torch.zeros(0, dtype=torch.long)]
    losses = head.loss(outputs, gt_boxes, gt_labels)
    assert set(losses) == {"loss_cls", "loss_box", "d0.loss_cls", "d0.loss_box"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    checked = [("bev queries", encoder.bev_queries.weight), ("object queries", head.query_embedding.weight),
               ("image features", features[0])]
    for name, parameter in checked:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_loss_of_a_perfect_query_is_zero_for_the_boxes():
    torch.manual_seed(0)
    head = BEVFormerHead(tiny_config(num_layers=1, num_queries=3).detr_head)
    gt = torch.tensor([[6.0, 2.0, 0.0, 4.2, 1.9, 1.6, 0.3, 1.0, 0.0]])
    codes = torch.stack([encode_boxes(torch.tensor([-6.0, -6.0, 0.0, 1, 1, 1, 0, 0, 0])), encode_boxes(gt[0]),
                         encode_boxes(torch.tensor([9.0, 9.0, 0.0, 1, 1, 1, 0, 0, 0]))])
    logits = torch.full((3, 10), -9.0)
    logits[1, 0] = 9.0  # query 1: car, certain
    outputs = BEVFormerHeadOutputs(class_logits=logits[None, None], box_codes=codes[None, None])
    losses = head.loss(outputs, [gt], [torch.tensor([0])])
    assert losses["loss_box"].item() == pytest.approx(0.0, abs=1e-6)
    # every class score sits at sigmoid(+-9) on the right side, so the focal loss is close to zero
    assert 0.0 < losses["loss_cls"].item() < 1e-6


def test_decode_takes_top_scores_over_queries_and_classes_and_undoes_the_augmentation():
    head = BEVFormerHead(tiny_config(num_layers=1, num_queries=3, max_detections=2).detr_head)
    boxes = torch.tensor([[6.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.3, 1.0, 0.0],
                          [-8.0, -5.0, 0.5, 0.7, 0.7, 1.8, 1.0, 0.0, 0.0],
                          [70.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # beyond post_center_range
    logits = torch.full((3, 10), -5.0)
    logits[0, 1] = 1.0  # truck, p = 0.731
    logits[1, 8] = 2.0  # pedestrian, p = 0.881
    logits[2, 0] = 3.0  # car, the best score, but its box is out of range
    flip = torch.tensor(BEVAugmentation(flip_y=True).matrix(), dtype=torch.float32)
    augmented = torch.from_numpy(BEVAugmentation(flip_y=True).apply_boxes(boxes.numpy())).float()
    outputs = BEVFormerHeadOutputs(class_logits=logits[None, None], box_codes=encode_boxes(augmented)[None, None])
    (detections,) = head.decode(outputs, ["token"], flip[None])
    # top-2 over 3 x 10 scores: the car (dropped by the range) and the pedestrian; the truck is third
    assert detections.sample_token == "token"
    assert detections.labels.tolist() == [8]
    assert detections.scores.tolist() == pytest.approx([1 / (1 + math.exp(-2.0))])
    assert np.allclose(detections.boxes, boxes[1:2].numpy(), atol=1e-5)


def test_config_rejects_anchor_counts_that_do_not_divide_the_points():
    with pytest.raises(ConfigError, match="spatial_points 6 is not a multiple of encoder.num_z_anchors 4"):
        BEVFormerConfig(encoder=BEVFormerEncoderConfig(spatial_points=6))
