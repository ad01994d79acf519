"""The teacher's optional DETR decoder (pipeline/teacher/decoder.py): bev_embed by hand, the outputs and feature
tables of a teacher with a decoder, its loss in a training step, its checkpoint round trip, and the head state a
BEVFormer student inherits (pipeline/distill/inherit.py)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from teacher_helpers import REPO, random_points, tiny_model_config

from distillbev.pipeline.config import to_dict
from distillbev.pipeline.distill.inherit import inherit_teacher_head
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.geometry.bev import BEVGrid, BEVRange
from distillbev.pipeline.heads.center_head import CenterHeadConfig
from distillbev.pipeline.heads.detr.config import BEVFormerHeadConfig
from distillbev.pipeline.student.bevformer.config import BEVFormerConfig, BEVFormerEncoderConfig
from distillbev.pipeline.student.bevformer.model import BEVFormerStudent
from distillbev.pipeline.student.config import ImageBackboneConfig, StudentModelConfig
from distillbev.pipeline.teacher.checkpoint import load_teacher_checkpoint, save_teacher_checkpoint
from distillbev.pipeline.teacher.config import TeacherDecoderConfig, TeacherTrainConfig
from distillbev.pipeline.teacher.decoder import BEVEmbedding
from distillbev.pipeline.teacher.model import BEV_EMBED, CenterPointTeacher
from distillbev.pipeline.teacher.train import build_optimizer, train_step

HEAD = BEVFormerHeadConfig(num_queries=8, num_layers=2, num_heads=2, num_points=2, feedforward_channels=16,
                           max_detections=5)


def decoder_teacher(embed_dims: int = 8) -> CenterPointTeacher:
    """The tiny teacher (+-12.8 m, 32x32 head grid, SECONDFPN 48 channels) with a decoder of `embed_dims`."""
    torch.manual_seed(0)
    return CenterPointTeacher(tiny_model_config(decoder=TeacherDecoderConfig(embed_dims=embed_dims, head=HEAD)))


def bevformer_student(embed_dims: int = 8, z_range: tuple[float, float] = (-5.0, 3.0)) -> BEVFormerStudent:
    """A BEVFormer student over the tiny teacher's head grid (+-12.8 m at 0.8 m) with the decoder's head shapes."""
    bev = BEVRange(-12.8, 12.8, -12.8, 12.8, 0.8, *z_range)
    transformer = BEVFormerConfig(
        embed_dims=embed_dims, bev=bev,
        encoder=BEVFormerEncoderConfig(num_layers=1, num_heads=2, num_levels=1, spatial_points=2, temporal_points=2,
                                       num_z_anchors=2, feedforward_channels=16), head=HEAD)
    config = StudentModelConfig(variant="bevformer", image_size=(64, 128),
                                backbone=ImageBackboneConfig(depth=18, width_multiplier=0.25), bev=bev,
                                head=CenterHeadConfig(grid=BEVGrid(-12.8, 12.8, -12.8, 12.8, 0.8)),
                                bevformer=transformer)
    torch.manual_seed(1)
    return BEVFormerStudent(config)


def test_bev_embed_is_a_1x1_conv_then_a_layer_norm_over_channels():
    """Two channels in, two out, identity conv with bias (1, -1): a cell (a, b) becomes (a + 1, b - 1), whose
    LayerNorm (mean m, population variance v, eps 1e-5) is ((a+1-m), (b-1-m)) / sqrt(v + eps)."""
    embed = BEVEmbedding(neck_channels=2, embed_dims=2)
    with torch.no_grad():
        embed.projection.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        embed.projection.bias.copy_(torch.tensor([1.0, -1.0]))
    neck = torch.tensor([[3.0, 0.0], [1.0, 2.0]]).view(1, 2, 1, 2)  # cells (3, 1) and (0, 2)
    out = embed(neck)  # (1, 2, 1, 2)
    # cell 0: (4, 0): mean 2, var 4 -> (1, -1) * 2 / sqrt(4 + 1e-5); cell 1: (1, 1): mean 1, var 0 -> (0, 0)
    scale = 2.0 / (4.0 + 1e-5) ** 0.5
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([scale, -scale]), atol=1e-6)
    assert torch.allclose(out[0, :, 0, 1], torch.zeros(2), atol=1e-6)


def test_a_teacher_with_a_decoder_adds_bev_embed_and_the_detr_outputs():
    teacher = decoder_teacher().eval()
    cfg = teacher.config
    points = [random_points(3000, cfg.point_cloud_range, seed=s) for s in (0, 1)]
    with torch.no_grad():
        outputs = teacher(points)
    assert outputs.features[BEV_EMBED].shape == (2, 8, 32, 32)  # (B, embed_dims, head grid 25.6 m / 0.8 m)
    assert teacher.feature_channels[BEV_EMBED] == 8 and teacher.feature_shapes[BEV_EMBED] == (32, 32)
    assert outputs.decoder.class_logits.shape == (2, 2, 8, 10)  # (decoder layers, B, queries, classes)
    assert outputs.decoder.box_codes.shape == (2, 2, 8, 10)
    # LayerNorm per cell: mean 0 and variance v / (v + eps), v the cell's variance after the 1x1 conv
    per_cell = outputs.features[BEV_EMBED].permute(0, 2, 3, 1)  # (B, Y, X, E)
    with torch.no_grad():
        projected = teacher.pts_bev_embed.projection(outputs.features["neck"]).permute(0, 2, 3, 1)
    variance = projected.var(-1, unbiased=False)
    assert per_cell.mean(-1).abs().max() < 1e-5
    assert torch.allclose(per_cell.var(-1, unbiased=False), variance / (variance + 1e-5), atol=1e-4)
    plain = CenterPointTeacher(dataclasses.replace(cfg, decoder=None))
    assert BEV_EMBED not in plain.feature_channels and plain(points).decoder is None


def test_the_training_step_adds_the_decoder_loss_and_trains_bev_embed():
    teacher = decoder_teacher()
    cfg = teacher.config
    boxes = [torch.tensor([[2.0, 3.0, -1.0, 4.0, 1.8, 1.5, 0.3, 0.0, 0.0]]),
             torch.tensor([[-5.0, 1.0, -1.0, 0.6, 0.6, 1.7, 0.0, 0.5, 0.0]])]
    labels = [torch.tensor([0]), torch.tensor([8])]
    points = [random_points(3000, cfg.point_cloud_range, seed=s) for s in (0, 1)]
    before = teacher.pts_bev_embed.projection.weight.detach().clone()
    record = train_step(teacher, points, boxes, labels, build_optimizer(teacher, TeacherTrainConfig()))
    assert record["loss_decoder"] > 0
    assert record["loss"] == pytest.approx(record["loss_heatmap"] + record["loss_box"] + record["loss_decoder"],
                                           rel=1e-5)
    assert not torch.equal(before, teacher.pts_bev_embed.projection.weight)


def test_the_checkpoint_round_trips_the_decoder(tmp_path):
    teacher = decoder_teacher()
    path = save_teacher_checkpoint(teacher, tmp_path / "teacher.pth", config=teacher.config)
    assert to_dict(teacher.config)["decoder"]["embed_dims"] == 8
    other = CenterPointTeacher(teacher.config)
    load_teacher_checkpoint(other, path, strict=True)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    assert any(key.startswith("pts_detr_head.decoder.") for key in teacher.state_dict())


def test_a_bevformer_student_inherits_the_decoder_and_branches_but_not_the_queries():
    teacher = decoder_teacher()
    student = bevformer_student()
    queries = student.head.query_embedding.weight.detach().clone()
    references = student.head.reference_points.weight.detach().clone()
    state = teacher.head_state()
    assert any(key.startswith("task_heads.") for key in state)  # the CenterHead's keys stay as they were
    count = inherit_teacher_head(student, state, to_dict(teacher.config))
    theirs = teacher.pts_detr_head.state_dict()
    inherited = [key for key in theirs if key.startswith(("class_branches.", "box_branches.", "decoder."))]
    assert count == len(inherited) > 0
    for key in inherited:
        assert torch.equal(student.head.state_dict()[key], theirs[key]), key
    assert torch.equal(student.head.query_embedding.weight, queries)  # the reference's inherit_query is off
    assert torch.equal(student.head.reference_points.weight, references)


def test_inheriting_a_decoder_of_another_width_or_range_is_refused():
    teacher = decoder_teacher(embed_dims=8)
    with pytest.raises(ConfigError, match=r"decoder, class and box branches: .*teacher \(.*8.*\) vs student"):
        inherit_teacher_head(bevformer_student(embed_dims=16), teacher.head_state(), to_dict(teacher.config))
    with pytest.raises(ConfigError, match=r"box branches decode centres over .*-5\.0, 3\.0.*spans .*-3\.0, 3\.0"):
        inherit_teacher_head(bevformer_student(z_range=(-3.0, 3.0)), teacher.head_state(), to_dict(teacher.config))


def test_a_teacher_without_a_decoder_gives_the_bevformer_student_nothing(caplog):
    teacher = CenterPointTeacher(tiny_model_config())
    student = bevformer_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        assert inherit_teacher_head(student, teacher.head_state(), to_dict(teacher.config)) == 0
    assert "has no DETR decoder" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_decoder_heads_must_divide_embed_dims():
    with pytest.raises(ValueError, match="decoder.embed_dims 6 is not divisible by decoder.head.num_heads 4"):
        TeacherDecoderConfig(embed_dims=6, head=dataclasses.replace(HEAD, num_heads=4))


@pytest.mark.parametrize("world, teacher_name", [("synthetic", "teacher_detr"), ("street", "teacher_detr"),
                                                 ("nuscenes", "teacher_pillar02_detr")])
def test_each_decoder_teacher_config_pairs_with_its_bevformer_student(world, teacher_name):
    """The student inherits the decoder of configs/<world>/<teacher>.yaml and imitates its bev_embed: the widths,
    head shapes and decoded box range must agree, or the inheritance refuses the run."""
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.decoder import decoder_head_spec

    configs = REPO / "configs" / world
    teacher = load_config(TeacherExperimentConfig, configs / f"{teacher_name}.yaml").model
    student = load_config(StudentExperimentConfig, configs / "student_bevformer.yaml")
    transformer = student.model.bevformer
    assert teacher.decoder.embed_dims == transformer.embed_dims
    assert teacher.decoder.head == transformer.head
    decoded = decoder_head_spec(teacher).bev
    for name in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max"):
        assert getattr(decoded, name) == getattr(transformer.bev, name), name
    assert student.inherit_teacher_head
    assert [(pair.student, pair.teacher) for pair in student.distill.layers] == [("neck", "bev_embed")]
    if world != "nuscenes":  # the small configs: the real inheritance, strictly
        torch.manual_seed(0)
        assert inherit_teacher_head(BEVFormerStudent(student.model), CenterPointTeacher(teacher).head_state(),
                                    to_dict(teacher)) > 0
