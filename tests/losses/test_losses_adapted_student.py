"""The DistillBEV loss with a non-identity adapter: the error, the student attention and the spatial term all use the
adapted student S' = W S + b, never the raw student (an identity adapter cannot tell the two apart)."""

from __future__ import annotations

import dataclasses

import torch

from distillbev.pipeline.losses.attention import blend_spatial_attention, channel_attention, spatial_attention
from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig
from distillbev.pipeline.losses.distill import DistillBEVLoss

EXTENT = (0.0, 3.0, 0.0, 2.0)  # 2 x 3 cells of 1 m


def make_loss() -> tuple[DistillBEVLoss, torch.Tensor, torch.Tensor]:
    """3 student channels -> 2 teacher channels through W (2x3) and b; g is the identity."""
    pair = LayerPairConfig(student="neck", teacher="neck", adapter="conv1x1", use_false_positive=True)
    config = dataclasses.replace(DistillConfig(), layers=[pair])
    loss = DistillBEVLoss(config, {"neck": 3}, {"neck": 2}, {"neck": (2, 3)}, {"neck": (2, 3)}, EXTENT)
    weight = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    bias = torch.tensor([0.25, -0.5])
    with torch.no_grad():
        conv = loss.layers["neck"].adapter.conv
        conv.weight.zero_()
        conv.weight[:, :, 0, 0].copy_(weight)
        conv.bias.copy_(bias)
        spatial = loss.layers["neck"].spatial_conv.conv
        spatial.weight.zero_()
        spatial.weight[0, 0, 1, 1] = 1.0
        spatial.bias.zero_()
    return loss, weight, bias


def inputs():
    """Cell [0, 0] a teacher false positive, cell [1, 2] inside a 0.5 x 0.5 m box (s_fg = 2), N_bg = 4."""
    generator = torch.Generator().manual_seed(3)
    student = torch.rand(1, 3, 2, 3, generator=generator) * 2
    teacher = torch.rand(1, 2, 2, 3, generator=generator) * 2
    heatmap = torch.full((1, 10, 2, 3), 0.05)
    heatmap[:, 3, 0, 0] = 0.5
    gt_heatmap = torch.zeros(1, 2, 3)
    boxes = [torch.tensor([[2.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0]])]  # as in test_losses_distill.fp_inputs
    return student, teacher, boxes, heatmap, gt_heatmap


def expected_terms(adapted: torch.Tensor, teacher: torch.Tensor, attention_from: torch.Tensor) -> dict[str, float]:
    """The paper's per-layer terms written out for this 2x3 case (weights 6e-3, 4e-2, 6e-2, 2.5e-3)."""
    fg = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    fp = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    bg = 1 - fg - fp
    attention = blend_spatial_attention(spatial_attention(teacher, 0.5), spatial_attention(attention_from, 0.5), 1.0)
    squared = (adapted - teacher) ** 2  # (1, 2, 2, 3)
    per_cell = squared.sum(dim=1)
    channel = channel_attention(teacher, 0.5)  # (1, 2)
    fp_per_cell = (channel[:, :, None, None] * squared).sum(dim=1)
    return {
        "kd_neck_fg": float(6e-3 * (fg * 2.0 * attention * per_cell).sum()),
        "kd_neck_bg": float(4e-2 * (bg * 0.25 * attention * per_cell).sum()),
        "kd_neck_fp": float(6e-2 * (fp * 1.0 * attention * fp_per_cell).sum()),
        "kd_neck_spatial": float(2.5e-3 * (teacher.mean(dim=1) - adapted.mean(dim=1)).abs().sum()),
    }


def test_every_term_uses_the_adapted_student():
    loss, weight, bias = make_loss()
    student, teacher, boxes, heatmap, gt_heatmap = inputs()
    terms = {k: float(v.detach()) for k, v in loss({"neck": student}, {"neck": teacher}, boxes, heatmap,
                                                   gt_heatmap).items()}
    adapted = torch.einsum("ts,bsyx->btyx", weight, student) + bias[None, :, None, None]
    expected = expected_terms(adapted, teacher, attention_from=adapted)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert abs(terms[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, terms[key], value)
    # the same sums with the attention taken from the raw student differ: this case tells the two apart
    raw = expected_terms(adapted, teacher, attention_from=student)
    assert abs(raw["kd_neck_bg"] - expected["kd_neck_bg"]) > 1e-3 * expected["kd_neck_bg"]


def test_bf16_adapters_run_in_the_students_arithmetic_and_the_sums_in_float32():
    """precision "bf16": the adapter convolves in bfloat16 (as the student's own layers do under autocast), then
    S' is float32 for every difference and sum; W, b and the inputs here are exact in bf16, so S' is W S + b rounded
    once to bf16. With "fp32" a bf16 student feature is converted, not refused."""
    loss, weight, bias = make_loss()
    student, teacher, boxes, heatmap, gt_heatmap = inputs()
    student = student.to(torch.bfloat16)
    seen = []
    loss.layers["neck"].adapter.conv.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype,
                                                                                                 out.dtype)))
    loss.precision = "bf16"
    terms = loss({"neck": student.detach().requires_grad_()}, {"neck": teacher}, boxes, heatmap, gt_heatmap)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert all(value.dtype == torch.float32 for value in terms.values())
    adapted = (torch.einsum("ts,bsyx->btyx", weight, student.float()) + bias[None, :, None, None]).to(torch.bfloat16)
    expected = expected_terms(adapted.float(), teacher, attention_from=adapted.float())
    values = {key: float(value.detach()) for key, value in terms.items()}
    for key, value in expected.items():
        assert abs(values[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, values[key], value)
    sum(terms.values()).backward()
    grad = loss.layers["neck"].adapter.conv.weight.grad
    assert grad.dtype == torch.float32 and float(grad.abs().sum()) > 0  # the adapters' weights stay float32

    seen.clear()
    loss.precision = "fp32"
    terms = loss({"neck": student}, {"neck": teacher}, boxes, heatmap, gt_heatmap)
    assert seen == [(torch.float32, torch.float32)]
    float_terms = loss({"neck": student.float()}, {"neck": teacher}, boxes, heatmap, gt_heatmap)
    assert {k: float(v.detach()) for k, v in terms.items()} == {k: float(v.detach()) for k, v in float_terms.items()}
