"""The BEVFormer student of this project (pipeline/student/bevformer/model.py): its forward on tiny shapes, the FPN
levels, the previous frame, the configs (strict loading, the synthetic grid equal to the teacher's), the skipped
head inheritance and the resampling adapter that pairs a 200^2 BEV with a 128^2 teacher."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from distillbev.pipeline.config import from_dict, load_config, load_config_data
from distillbev.pipeline.distill.config import StudentExperimentConfig
from distillbev.pipeline.distill.inherit import inherit_teacher_head
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.geometry.bev import BEVGrid, BEVRange
from distillbev.pipeline.heads.center_head import CenterHeadConfig
from distillbev.pipeline.heads.detr.config import BEVFormerHeadConfig
from distillbev.pipeline.heads.detr.head import BEVFormerHeadOutputs
from distillbev.pipeline.losses.adapters import ResampleConv1x1Adapter
from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig
from distillbev.pipeline.losses.distill import DistillBEVLoss
from distillbev.pipeline.student.bevformer.config import BEVFormerConfig, BEVFormerEncoderConfig
from distillbev.pipeline.student.bevformer.model import BEVFormerStudent
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.student.config import ImageBackboneConfig, StudentModelConfig
from distillbev.pipeline.student.model import CameraStudent
from distillbev.pipeline.teacher.config import TeacherExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = (64, 128)
# +-16 m at 2 m: 32 m / 2 m = 16 cells per side
TINY_BEV = BEVRange(x_min=-16.0, x_max=16.0, y_min=-16.0, y_max=16.0, resolution=2.0, z_min=-3.0, z_max=3.0)


def tiny_model_config(num_levels: int = 2, dropout: float = 0.1) -> StudentModelConfig:
    transformer = BEVFormerConfig(
        embed_dims=16, bev=TINY_BEV,
        encoder=BEVFormerEncoderConfig(num_layers=1, num_heads=2, num_levels=num_levels, spatial_points=2,
                                       temporal_points=2, num_z_anchors=2, feedforward_channels=32, dropout=dropout),
        head=BEVFormerHeadConfig(num_queries=10, num_layers=2, num_heads=2, num_points=2, feedforward_channels=32,
                                 dropout=dropout, max_detections=5))
    return StudentModelConfig(
        variant="bevformer", image_size=IMAGE_SIZE, backbone=ImageBackboneConfig(depth=18, width_multiplier=0.25),
        bev=TINY_BEV, head=CenterHeadConfig(grid=BEVGrid(-16.0, 16.0, -16.0, 16.0, 0.8)), bevformer=transformer)


def test_forward_gives_the_bev_feature_at_the_config_grid(make_batch):
    torch.manual_seed(0)
    config = tiny_model_config()
    student = build_student(config)
    assert isinstance(student, BEVFormerStudent)
    batch = make_batch(IMAGE_SIZE, batch_size=2, previous=True)
    outputs = student(batch)
    assert set(outputs.features) == {"neck"}
    assert outputs.features["neck"].shape == (2, 16, 16, 16)  # (B, embed_dims, 32 m / 2 m, 32 m / 2 m)
    assert student.feature_shapes == {"neck": (16, 16)} and student.feature_channels == {"neck": 16}
    assert isinstance(outputs.head, BEVFormerHeadOutputs) and outputs.depth is None
    assert outputs.head.class_logits.shape == (2, 2, 10, 10)  # (decoder layers, B, queries, classes)
    losses = student.detection_loss(outputs, batch)
    assert set(losses) == {"loss_cls", "loss_box", "d0.loss_cls", "d0.loss_box"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert student.backbone.conv1.weight.grad.abs().sum() > 0  # the images train through SCA
    detections = student.head.decode(outputs.head, batch.sample_tokens, batch.bev_aug)
    assert [len(d.boxes) for d in detections] == [5, 5]  # max_detections, all centres inside post_center_range


def test_lift_splat_variants_still_build_camera_students():
    config = StudentModelConfig(variant="bevdet", image_size=IMAGE_SIZE, bev=BEVRange(-16.0, 16.0, -16.0, 16.0, 0.8),
                                head=CenterHeadConfig(grid=BEVGrid(-16.0, 16.0, -16.0, 16.0, 0.8)),
                                backbone=ImageBackboneConfig(depth=18, width_multiplier=0.25))
    assert isinstance(build_student(config), CameraStudent)


@pytest.mark.parametrize("levels, shapes", [
    (1, [(2, 4)]),  # layer4 alone (stride 32)
    (2, [(4, 8), (2, 4)]),  # layer3, layer4
    (4, [(8, 16), (4, 8), (2, 4), (1, 2)]),  # layer2-4 + one stride-2 conv: strides 8, 16, 32, 64 of 64x128
])
def test_the_fpn_gives_num_levels_maps_of_embed_dims_channels(levels, shapes):
    student = BEVFormerStudent(tiny_model_config(num_levels=levels))
    maps = student.image_features(torch.randn(1, 6, 3, *IMAGE_SIZE))
    assert [tuple(m.shape) for m in maps] == [(1, 6, 16, *shape) for shape in shapes]


def test_the_previous_frame_is_encoded_without_gradient_dropout_or_a_lasting_mode_change(make_batch):
    torch.manual_seed(0)
    student = BEVFormerStudent(tiny_model_config(dropout=0.5)).train()
    batch = make_batch(IMAGE_SIZE, batch_size=1, previous=True)
    first = student.previous_bev(batch, batch.bev_aug)
    second = student.previous_bev(batch, batch.bev_aug)
    assert torch.equal(first, second)  # eval mode: dropout 0.5 would make two draws differ
    assert not first.requires_grad and student.training
    with_previous = student.eval()(batch).features["neck"]
    batch.prev_images = None
    alone = student(batch).features["neck"]
    assert not torch.allclose(with_previous, alone)  # temporal self-attention reads the previous BEV


def test_the_configs_load_strictly_with_the_grids_of_their_teachers():
    synthetic = load_config(StudentExperimentConfig, ROOT / "configs" / "synthetic" / "student_bevformer.yaml")
    teacher = load_config(TeacherExperimentConfig, ROOT / "configs" / "synthetic" / "teacher_detr.yaml").model
    teacher_grid = teacher.head.grid
    assert synthetic.model.bev.grid().shape == teacher_grid.shape == (80, 80)  # 64 m / 0.8 m
    assert [(p.student, p.teacher, p.adapter, p.use_false_positive) for p in synthetic.distill.layers] == [
        ("neck", "bev_embed", "conv1x1", False)]
    assert synthetic.data.final_size == synthetic.model.image_size
    full = load_config(StudentExperimentConfig, ROOT / "configs" / "nuscenes" / "student_bevformer.yaml")
    assert full.model.bev.grid().shape == (200, 200)  # 102.4 m / 0.512 m
    assert full.model.head.grid.shape == (128, 128)  # the CenterPoint teacher's head grid, 102.4 m / 0.8 m
    assert full.model.backbone.depth == 50 and full.model.bevformer.encoder.num_levels == 4
    assert [(p.student, p.teacher, p.adapter) for p in full.distill.layers] == [
        ("neck", "bev_embed", "resample_conv1x1")]
    for cfg in (synthetic, full):
        distill = cfg.distill
        assert len(distill.layers) == 1 and distill.student_attention_ratio == 0.0 and not distill.false_positive
        assert cfg.inherit_teacher_head  # the decoder of the teacher's DETR head (tests/teacher/test_teacher_decoder.py)
    assert (full.distill.foreground_weight, full.distill.background_weight, full.distill.spatial_l1_weight) == (
        5e-3, 4e-3, 5e-4)
    # the small configs: the reference's weights rescaled to 64 channels and 0.8 m cells, then x 0.1 (the config)
    rescaled = (5e-3 * 256 / 64 * 0.8 / 0.512 * 0.1, 4e-3 * 256 / 64 * 0.1, 5e-4 * 40000 / 6400 * 0.1)
    weights = (synthetic.distill.foreground_weight, synthetic.distill.background_weight,
               synthetic.distill.spatial_l1_weight)
    assert weights == pytest.approx(rescaled, rel=0.01)


def test_config_errors_name_the_field():
    path = ROOT / "configs" / "synthetic" / "student_bevformer.yaml"
    # bevformer.bev is derived from model.bev, so an override moves both; a copied grid can drift apart
    moved = load_config(StudentExperimentConfig, path, ["model.bev.resolution=1.6"]).model
    assert moved.bevformer.bev.resolution == 1.6 and moved.bevformer.bev.grid().shape == (40, 40)
    data = load_config_data(path)
    data["model"]["bevformer"]["bev"] = dict(data["model"]["bev"], resolution=1.6)
    with pytest.raises(ConfigError, match="model.bevformer.bev .* differs from model.bev"):
        from_dict(StudentExperimentConfig, data)
    with pytest.raises(ConfigError, match="variant is 'bevdet'"):
        load_config(StudentExperimentConfig, path, ["model.variant=bevdet"])
    with pytest.raises(ConfigError, match="bevformer"):
        load_config(StudentExperimentConfig, path, ["model.bevformer.encoder.num_layer=2"])
    with pytest.raises(ConfigError, match="needs a model.bevformer section"):
        load_config(StudentExperimentConfig, None, ["model.variant=bevformer"])


def test_head_inheritance_is_skipped_with_a_reason(caplog):
    student = BEVFormerStudent(tiny_model_config())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        assert inherit_teacher_head(student, {"task_heads.0.weight": torch.zeros(1)}) == 0
    assert "skipped for the BEVFormer student" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_the_resampling_adapter_keeps_a_linear_ramp_on_the_teacher_cell_centres():
    """A map equal to its cell centres' x over [-51.2, 51.2) at 200 cells, resampled onto 128 cells with an identity
    1x1 conv, equals the 128-cell grid's centres: bilinear interpolation is exact for a linear function, and every
    teacher centre (first -50.8 m) lies between the first and last student centres (first -50.944 m), so none clamps."""
    adapter = ResampleConv1x1Adapter(1, 1, (128, 128))
    with torch.no_grad():
        adapter.conv.weight.fill_(1.0)
        adapter.conv.bias.zero_()
    student_x = -51.2 + (torch.arange(200) + 0.5) * 0.512
    teacher_x = -51.2 + (torch.arange(128) + 0.5) * 0.8
    resampled = adapter(student_x.expand(1, 1, 200, 200).contiguous())[0, 0]  # (128, 128)
    assert teacher_x[0] > student_x[0] and teacher_x[-1] < student_x[-1]
    torch.testing.assert_close(resampled, teacher_x.expand(128, -1), atol=1e-4, rtol=0)


def test_a_resampling_pair_computes_its_terms_on_the_teacher_grid():
    config = DistillConfig(layers=[LayerPairConfig("neck", "neck", "resample_conv1x1", False)],
                           student_attention_ratio=0.0, false_positive=False)
    loss = DistillBEVLoss(config, {"neck": 8}, {"neck": 4}, {"neck": (25, 25)}, {"neck": (16, 16)},
                          (-16.0, 16.0, -16.0, 16.0))
    assert not loss.needs_gt_heatmap
    boxes = [torch.tensor([[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])]
    terms = loss({"neck": torch.randn(1, 8, 25, 25)}, {"neck": torch.randn(1, 4, 16, 16)}, boxes)
    assert set(terms) == {"kd_neck_fg", "kd_neck_bg", "kd_neck_spatial"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    with pytest.raises(ConfigError, match="integer factor"):
        DistillBEVLoss(DistillConfig(layers=[LayerPairConfig("neck", "neck", "conv1x1", False)]), {"neck": 8},
                       {"neck": 4}, {"neck": (25, 25)}, {"neck": (16, 16)}, (-16.0, 16.0, -16.0, 16.0))
