"""The per-layer DistillBEV loss: normalisation by hand, zero loss, gradients, channel attention, ablations."""

from __future__ import annotations

import math

import pytest
import torch

from distillbev.pipeline.config import from_dict
from distillbev.pipeline.errors import ConfigError
from distillbev.pipeline.losses.attention import blend_spatial_attention, channel_attention, spatial_attention
from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig
from distillbev.pipeline.losses.distill import DistillBEVLoss

FP_EXTENT = (0.0, 3.0, 0.0, 2.0)  # 2 x 3 cells of 1 m


def hand_batch():
    """B=2, C=2, 2x2 maps over 2 m x 2 m. Teacher 0.5 everywhere, student = teacher + a known difference.

    Sample 0: one 1.5 x 1.5 m box on corner (1, 1) -> foreground cell [1, 1], s_fg = sqrt(1 / 2.25) = 2/3,
    N_bg = 3, s_bg = 1/3. Sample 1: no box, s_bg = 1/4.
    Channel sums of (S - T)^2: sample 0 [[1, 1], [0, 5]], sample 1 [[1, 1], [1, 10]].
    """
    difference = torch.tensor([
        [[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]]],
        [[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 3.0]]],
    ])  # (B, C, Y, X)
    teacher = torch.full((2, 2, 2, 2), 0.5)
    boxes = [torch.tensor([[1.0, 1.0, 0.0, 1.5, 1.5, 1.0, 0.0]]), torch.zeros(0, 7)]
    return teacher + difference, teacher, boxes


def test_loss_by_hand_sums_channels_and_cells_divides_by_batch(make_neck_loss):
    student, teacher, boxes = hand_batch()
    loss = make_neck_loss(attention=False, spatial_l1=False)
    terms = loss({"neck": student}, {"neck": teacher}, boxes)
    assert set(terms) == {"kd_neck_fg", "kd_neck_bg"}
    # fg: 6e-3 / 2 * (2/3 * 5) = 0.01; bg: 4e-2 / 2 * (1/3 * (1 + 1 + 0) + 1/4 * (1 + 1 + 1 + 10)).
    assert math.isclose(float(terms["kd_neck_fg"].detach()), 0.01, rel_tol=1e-6)
    assert math.isclose(float(terms["kd_neck_bg"].detach()), 0.02 * (2 / 3 + 13 / 4), rel_tol=1e-6)


def fp_inputs(batch: int = 1, channels: int = 2, seed: int = 0):
    """FP layer case on a 2x3 grid: cell [0, 0] FP, cell [1, 2] foreground (box 0.5 x 0.5 m: s_fg = 2), N_bg = 4."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.rand(batch, channels, 2, 3, generator=generator) * 2
    student = torch.rand(batch, channels, 2, 3, generator=generator) * 2
    teacher_heatmap = torch.full((batch, 10, 2, 3), 0.05)
    teacher_heatmap[:, 3, 0, 0] = 0.5
    gt_heatmap = torch.zeros(batch, 2, 3)
    boxes = [torch.tensor([[2.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0]]) for _ in range(batch)]
    return student, teacher, boxes, teacher_heatmap, gt_heatmap


def run(loss, student, teacher, boxes, teacher_heatmap, gt_heatmap, **kwargs):
    return loss({"neck": student}, {"neck": teacher}, boxes, teacher_heatmap, gt_heatmap, **kwargs)


def attention_of(student, teacher):
    return blend_spatial_attention(spatial_attention(teacher, 0.5), spatial_attention(student, 0.5), 1.0)


def masks_fp_case():
    fg = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    fp = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    return fg, fp, 1 - fg - fp


def test_fp_term_alone_carries_channel_attention(make_neck_loss):
    student, teacher, boxes, teacher_heatmap, gt_heatmap = fp_inputs()
    terms = run(make_neck_loss(use_false_positive=True, shape=(2, 3), extent=FP_EXTENT), student, teacher, boxes,
                teacher_heatmap, gt_heatmap)
    assert set(terms) == {"kd_neck_fg", "kd_neck_bg", "kd_neck_fp", "kd_neck_spatial"}
    squared = (student - teacher) ** 2  # (1, C, Y, X)
    attention = attention_of(student, teacher)
    channels = channel_attention(teacher, 0.5)  # (1, C)
    fg, fp, bg = masks_fp_case()
    expected_fg = 6e-3 * (fg * 2.0 * attention * squared.sum(1)).sum()
    expected_bg = 4e-2 * (bg * 0.25 * attention * squared.sum(1)).sum()
    expected_fp = 6e-2 * (fp * 1.0 * attention * (squared * channels[:, :, None, None]).sum(1)).sum()
    without_channels = 6e-2 * (fp * attention * squared.sum(1)).sum()
    assert torch.allclose(terms["kd_neck_fg"], expected_fg)
    assert torch.allclose(terms["kd_neck_bg"], expected_bg)
    assert torch.allclose(terms["kd_neck_fp"], expected_fp)
    assert not torch.allclose(terms["kd_neck_fp"], without_channels)  # the channel weighting is really there


def test_doubling_the_batch_with_identical_samples_leaves_loss_unchanged(make_neck_loss):
    loss = make_neck_loss(use_false_positive=True, shape=(2, 3), extent=FP_EXTENT)
    single = run(loss, *fp_inputs(batch=1))
    student, teacher, boxes, teacher_heatmap, gt_heatmap = fp_inputs(batch=1)
    doubled = run(loss, student.repeat(2, 1, 1, 1), teacher.repeat(2, 1, 1, 1), boxes * 2,
                  teacher_heatmap.repeat(2, 1, 1, 1), gt_heatmap.repeat(2, 1, 1))
    assert set(single) == set(doubled)
    for key in single:
        assert torch.allclose(single[key], doubled[key]), key


def test_sum_grows_with_channels(make_neck_loss):
    student, teacher, boxes, teacher_heatmap, gt_heatmap = fp_inputs(channels=2)
    base = run(make_neck_loss(channels=2, use_false_positive=True, shape=(2, 3), extent=FP_EXTENT),
               student, teacher, boxes, teacher_heatmap, gt_heatmap)
    wide = run(make_neck_loss(channels=4, use_false_positive=True, shape=(2, 3), extent=FP_EXTENT),
               student.repeat(1, 2, 1, 1), teacher.repeat(1, 2, 1, 1), boxes, teacher_heatmap, gt_heatmap)
    for term in ("fg", "bg", "fp"):  # duplicated channels: same attention, twice the channel sum
        assert torch.allclose(wide[f"kd_neck_{term}"], 2 * base[f"kd_neck_{term}"]), term
    assert torch.allclose(wide["kd_neck_spatial"], base["kd_neck_spatial"])  # channel means are unchanged


def test_zero_loss_when_adapted_student_equals_teacher(make_neck_loss):
    _, teacher, boxes, teacher_heatmap, gt_heatmap = fp_inputs()
    terms = run(make_neck_loss(use_false_positive=True, shape=(2, 3), extent=FP_EXTENT), teacher.clone(), teacher,
                boxes, teacher_heatmap, gt_heatmap)
    assert len(terms) == 4
    for key, value in terms.items():
        assert float(value.detach()) == 0.0, key


def test_gradients_reach_student_and_adapters_not_teacher():
    config = DistillConfig(layers=[
        LayerPairConfig(student="backbone1", teacher="backbone1", adapter="upsample_3layer"),
        LayerPairConfig(student="neck", teacher="neck", adapter="conv1x1", use_false_positive=True)])
    loss = DistillBEVLoss(config, {"backbone1": 4, "neck": 3}, {"backbone1": 2, "neck": 5},
                          {"backbone1": (2, 3), "neck": (4, 6)}, {"backbone1": (4, 6), "neck": (4, 6)},
                          (0.0, 6.0, 0.0, 4.0))
    students = {"backbone1": torch.randn(2, 4, 2, 3, requires_grad=True),
                "neck": torch.randn(2, 3, 4, 6, requires_grad=True)}
    teachers = {"backbone1": torch.rand(2, 2, 4, 6, requires_grad=True),
                "neck": torch.rand(2, 5, 4, 6, requires_grad=True)}
    heatmap = torch.rand(2, 10, 4, 6)
    boxes = [torch.tensor([[2.0, 2.0, 0.0, 2.5, 1.5, 1.0, 0.3]]), torch.zeros(0, 7)]
    terms = loss(students, teachers, boxes, heatmap, torch.zeros(2, 4, 6))
    assert {"kd_backbone1_fg", "kd_backbone1_spatial", "kd_neck_fp", "kd_neck_spatial"} <= set(terms)
    sum(terms.values()).backward()
    for name, feature in students.items():
        assert feature.grad is not None and bool(feature.grad.abs().sum() > 0), name
    for name, feature in teachers.items():
        assert feature.grad is None, name
    for name, parameter in loss.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_attention_is_a_constant_in_the_gradient(make_neck_loss):
    student, teacher, boxes = hand_batch()
    student = student.clone().requires_grad_(True)
    loss = make_neck_loss(spatial_l1=False)
    terms = loss({"neck": student}, {"neck": teacher}, boxes)
    sum(terms.values()).backward()
    attention = attention_of(student.detach(), teacher)  # (B, Y, X)
    fg = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    scale = torch.tensor([[[1 / 3, 1 / 3], [1 / 3, 2 / 3]], [[0.25, 0.25], [0.25, 0.25]]])
    weights = (6e-3 * fg + 4e-2 * (1 - fg)) * scale * attention
    expected = 2 * weights[:, None] * (student.detach() - teacher) / 2  # d/dS of (1/B) sum w (S - T)^2
    assert torch.allclose(student.grad, expected, atol=1e-7)


def test_precomputed_teacher_attention_is_used(make_neck_loss):
    student, teacher, boxes = hand_batch()
    loss = make_neck_loss()
    computed = loss({"neck": student}, {"neck": teacher}, boxes)
    given = loss({"neck": student}, {"neck": teacher}, boxes,
                 teacher_attention={"neck": spatial_attention(teacher, 0.5)})
    flat = loss({"neck": student}, {"neck": teacher}, boxes, teacher_attention={"neck": torch.full((2, 2, 2), 5.0)})
    assert torch.allclose(computed["kd_neck_bg"], given["kd_neck_bg"])
    assert not torch.allclose(computed["kd_neck_bg"], flat["kd_neck_bg"])
    with pytest.raises(ValueError, match="precomputed teacher attention"):
        loss({"neck": student}, {"neck": teacher}, boxes, teacher_attention={"neck": torch.ones(2, 3, 3)})


class TestAblationSwitches:
    """Each switch changes exactly its own component (FP layer case; g is the identity in every instance)."""

    def setup_method(self):
        self.inputs = fp_inputs(seed=3)
        student, teacher = self.inputs[0], self.inputs[1]
        self.squared_sum = ((student - teacher) ** 2).sum(1)  # (1, Y, X)
        self.attention = attention_of(student, teacher)

    def terms(self, make_neck_loss, **switches):
        loss = make_neck_loss(use_false_positive=True, shape=(2, 3), extent=FP_EXTENT, **switches)
        return run(loss, *self.inputs)

    def test_attention_off_gives_unit_attention(self, make_neck_loss):
        base, off = self.terms(make_neck_loss), self.terms(make_neck_loss, attention=False)
        fg, fp, bg = masks_fp_case()
        assert torch.allclose(off["kd_neck_fg"], 6e-3 * (fg * 2.0 * self.squared_sum).sum())
        assert torch.allclose(off["kd_neck_bg"], 4e-2 * (bg * 0.25 * self.squared_sum).sum())
        assert torch.allclose(off["kd_neck_fp"], 6e-2 * (fp * self.squared_sum).sum())  # Ac = 1 too
        assert torch.allclose(off["kd_neck_spatial"], base["kd_neck_spatial"])
        assert not torch.allclose(off["kd_neck_bg"], base["kd_neck_bg"])

    def test_adaptive_scaling_off_scales_foreground_like_background(self, make_neck_loss):
        base, off = self.terms(make_neck_loss), self.terms(make_neck_loss, adaptive_scaling=False)
        assert torch.allclose(off["kd_neck_fg"], base["kd_neck_fg"] * (0.25 / 2.0))  # s_bg = 1/4 instead of s_fg = 2
        for key in ("kd_neck_bg", "kd_neck_fp", "kd_neck_spatial"):
            assert torch.allclose(off[key], base[key]), key

    def test_false_positive_off_returns_fp_cells_to_background(self, make_neck_loss):
        base, off = self.terms(make_neck_loss), self.terms(make_neck_loss, false_positive=False)
        assert "kd_neck_fp" not in off
        fg, fp, bg = masks_fp_case()
        assert torch.allclose(off["kd_neck_bg"], 4e-2 * ((bg + fp) * 0.2 * self.attention * self.squared_sum).sum())
        for key in ("kd_neck_fg", "kd_neck_spatial"):
            assert torch.allclose(off[key], base[key]), key

    def test_region_decomposition_off_is_plain_uniform_imitation(self, make_neck_loss):
        base, off = self.terms(make_neck_loss), self.terms(make_neck_loss, region_decomposition=False)
        assert set(off) == {"kd_neck_plain", "kd_neck_spatial"}
        expected = DistillConfig().plain_weight / 6 * (self.attention * self.squared_sum).sum()
        assert torch.allclose(off["kd_neck_plain"], expected)
        assert torch.allclose(off["kd_neck_spatial"], base["kd_neck_spatial"])

    def test_spatial_l1_off_drops_only_that_term(self, make_neck_loss):
        base = self.terms(make_neck_loss)
        loss = make_neck_loss(use_false_positive=True, shape=(2, 3), extent=FP_EXTENT, spatial_l1=False)
        off = run(loss, *self.inputs)
        assert set(off) == set(base) - {"kd_neck_spatial"}
        assert float(base["kd_neck_spatial"].detach()) > 0
        assert all(torch.allclose(off[key], base[key]) for key in off)
        assert loss.layers["neck"].spatial_conv is None


def test_spatial_l1_term_by_hand(make_neck_loss):
    # g = identity: (1/B) * sum |mean_c T - mean_c S|; sample channel means differ by [[.5, .5], [0, 1.5]] and
    # [[.5, .5], [.5, 2]] -> (2.5 + 3.5) / 2 = 3, times 2.5e-3.
    student, teacher, boxes = hand_batch()
    terms = make_neck_loss()({"neck": student}, {"neck": teacher}, boxes)
    assert math.isclose(float(terms["kd_neck_spatial"].detach()), 2.5e-3 * 3.0, rel_tol=1e-6)


def test_fp_layer_without_heatmaps_is_an_error(make_neck_loss):
    student, teacher, boxes, _, _ = fp_inputs()
    loss = make_neck_loss(use_false_positive=True, shape=(2, 3), extent=FP_EXTENT)
    with pytest.raises(ValueError, match="teacher_heatmap"):
        loss({"neck": student}, {"neck": teacher}, boxes)


def test_adapted_size_mismatch_has_a_clear_message(make_neck_loss):
    loss = make_neck_loss(shape=(2, 2))
    with pytest.raises(ValueError, match="adapted student feature"):
        loss({"neck": torch.rand(1, 2, 3, 3)}, {"neck": torch.rand(1, 2, 2, 2)}, [torch.zeros(0, 7)])


def test_default_config_is_the_paper_recipe_and_builds_at_full_size():
    config = DistillConfig()
    assert [(p.student, p.teacher, p.adapter, p.use_false_positive) for p in config.layers] == [
        ("backbone1", "backbone1", "upsample_3layer", False), ("backbone2", "backbone2", "upsample_3layer", False),
        ("neck", "neck", "conv1x1", True)]
    assert (config.foreground_weight, config.background_weight, config.false_positive_weight,
            config.spatial_l1_weight, config.temperature) == (6e-3, 4e-2, 6e-2, 2.5e-3, 0.5)
    loss = DistillBEVLoss(config, {"backbone1": 256, "backbone2": 512, "neck": 256},
                          {"backbone1": 128, "backbone2": 256, "neck": 384},
                          {"backbone1": (32, 32), "backbone2": (16, 16), "neck": (128, 128)},
                          {"backbone1": (128, 128), "backbone2": (64, 64), "neck": (128, 128)},
                          (-51.2, 51.2, -51.2, 51.2))
    assert loss.layers["backbone1"].adapter.upsample.scale_factor == 4
    assert loss.layers["backbone2"].adapter.layers[-3].out_channels == 256
    assert isinstance(loss.layers["neck"].adapter.upsample, torch.nn.Identity)


def test_config_loads_strictly_from_a_mapping():
    config = from_dict(DistillConfig, {"layers": [{"student": "neck", "teacher": "neck", "adapter": "conv1x1",
                                                   "use_false_positive": True}], "attention": False})
    assert config.layers[0].use_false_positive and not config.attention
    with pytest.raises(ConfigError):
        from_dict(DistillConfig, {"layers": [{"student": "neck", "teacher": "neck", "adapter": "mlp"}]})
    with pytest.raises(ConfigError, match="distinct"):
        pair = {"student": "neck", "teacher": "neck", "adapter": "conv1x1"}
        from_dict(DistillConfig, {"layers": [pair, pair]})


@pytest.mark.slow
def test_full_size_forward_backward():
    torch.manual_seed(0)
    loss = DistillBEVLoss(DistillConfig(), {"backbone1": 256, "backbone2": 512, "neck": 256},
                          {"backbone1": 128, "backbone2": 256, "neck": 384},
                          {"backbone1": (32, 32), "backbone2": (16, 16), "neck": (128, 128)},
                          {"backbone1": (128, 128), "backbone2": (64, 64), "neck": (128, 128)},
                          (-51.2, 51.2, -51.2, 51.2))
    students = {"backbone1": torch.randn(1, 256, 32, 32), "backbone2": torch.randn(1, 512, 16, 16),
                "neck": torch.randn(1, 256, 128, 128).relu()}
    teachers = {"backbone1": torch.rand(1, 128, 128, 128), "backbone2": torch.rand(1, 256, 64, 64),
                "neck": torch.rand(1, 384, 128, 128)}
    boxes = [torch.tensor([[10.0, 5.0, 0.0, 4.5, 1.9, 1.6, 0.3], [-20.0, -3.0, 0.0, 0.6, 0.6, 1.7, 0.0]])]
    terms = loss(students, teachers, boxes, torch.rand(1, 10, 128, 128) * 0.3, torch.rand(1, 128, 128) * 0.2)
    assert len(terms) == 10 and all(bool(torch.isfinite(v)) for v in terms.values())
    sum(terms.values()).backward()
    assert loss.layers["backbone1"].adapter.layers[0].weight.grad is not None
