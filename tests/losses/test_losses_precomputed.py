"""The loss's student-independent inputs computed per sample (as the DataLoader workers do) give the in-step loss.

Two layer pairs with non-identity adapters (an upsample_3layer pair at half the neck's resolution and a conv1x1 neck
pair with the FP region), a batch of three samples with rotated, overlapping boxes (one sample without boxes), and
random teacher / GT heatmaps that make the FP region non-empty. `precompute_targets` runs on each sample alone and the
results are concatenated, as `collate_with_targets` does; the loss terms must equal the in-step ones to 1e-6 and the
gradients must agree. The fused squared error's hand-written backward is checked against autograd.
"""

from __future__ import annotations

import pytest
import torch

from distillbev.pipeline.losses.config import DistillConfig, LayerPairConfig
from distillbev.pipeline.losses.distill import (DistillBEVLoss, PrecomputedTargets, channel_summed_squared_error,
                                                precompute_targets, squared_error_per_cell)
from distillbev.pipeline.losses.regions import (build_region_masks, cell_corner_points, first_containing_box,
                                                points_in_boxes_bev)

EXTENT = (-6.0, 6.0, -4.0, 4.0)  # neck grid 8 x 12 at 1 m, backbone2 grid 4 x 6 at 2 m


def rotated_overlapping_boxes() -> list[torch.Tensor]:
    """B = 3: two samples with rotated boxes that overlap each other, one sample without boxes. (K, 9) each."""
    def box(x, y, length, width, yaw):
        return [x, y, 0.0, length, width, 1.5, yaw, 0.0, 0.0]

    return [torch.tensor([box(-2.3, 0.4, 5.0, 2.2, 0.6), box(-1.1, 1.2, 4.0, 3.0, -0.9),
                          box(3.1, -1.7, 2.6, 1.4, 2.4)]),
            torch.tensor([box(0.2, -0.3, 6.5, 2.5, 1.2), box(1.0, 0.8, 3.5, 3.5, 0.3)]),
            torch.zeros(0, 9)]


def make_loss(**switches) -> DistillBEVLoss:
    pairs = [LayerPairConfig("backbone2", "backbone2", "upsample_3layer", False),
             LayerPairConfig("neck", "neck", "conv1x1", True)]
    torch.manual_seed(3)
    return DistillBEVLoss(DistillConfig(layers=pairs, **switches), {"backbone2": 6, "neck": 5},
                          {"backbone2": 4, "neck": 7}, {"backbone2": (2, 3), "neck": (8, 12)},
                          {"backbone2": (4, 6), "neck": (8, 12)}, EXTENT)


def make_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(11)
    student = {"backbone2": torch.randn(batch, 6, 2, 3, generator=generator),
               "neck": torch.randn(batch, 5, 8, 12, generator=generator)}
    teacher = {"backbone2": torch.rand(batch, 4, 4, 6, generator=generator) * 2,
               "neck": torch.rand(batch, 7, 8, 12, generator=generator) * 2}
    teacher_heatmap = torch.rand(batch, 10, 8, 12, generator=generator) * 0.13
    gt_heatmap = torch.rand(batch, 8, 12, generator=generator) * 0.15
    return student, teacher, teacher_heatmap, gt_heatmap


def per_sample(spec, boxes, gt_heatmap, teacher=None, teacher_heatmap=None) -> PrecomputedTargets:
    """What the workers hand over: each sample's inputs alone, concatenated in batch order."""
    return PrecomputedTargets.cat([
        precompute_targets(spec, boxes[b], gt_heatmap[b],
                           teacher_features=None if teacher is None else {k: v[b] for k, v in teacher.items()},
                           teacher_heatmap=None if teacher_heatmap is None else teacher_heatmap[b])
        for b in range(len(boxes))])


def loss_and_gradients(loss, student, teacher, boxes, teacher_heatmap, gt_heatmap, precomputed=None):
    student = {k: v.clone().requires_grad_(True) for k, v in student.items()}
    loss.zero_grad(set_to_none=True)
    terms = loss(student, teacher, boxes, teacher_heatmap, None if precomputed is not None else gt_heatmap,
                 precomputed=precomputed)
    sum(terms.values()).backward()
    grads = {f"student.{k}": v.grad.clone() for k, v in student.items()}
    grads |= {name: p.grad.clone() for name, p in loss.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def test_the_case_has_overlaps_and_every_region():
    boxes = rotated_overlapping_boxes()
    inside = [first_containing_box(b, (8, 12), EXTENT) for b in boxes]
    # the two samples with boxes each have cells inside more than one box (the first box wins there)
    points = cell_corner_points((8, 12), EXTENT).reshape(-1, 2)
    for sample in boxes[:2]:
        assert int((points_in_boxes_bev(points, sample).sum(dim=1) > 1).sum()) > 0
    assert int((inside[2] >= 0).sum()) == 0
    _, teacher, teacher_heatmap, gt_heatmap = make_inputs()
    masks = build_region_masks(boxes, (8, 12), EXTENT, device="cpu", teacher_heatmap=teacher_heatmap,
                               gt_heatmap_max=gt_heatmap)
    assert all(int(masks.false_positive[b].sum()) > 0 for b in range(3))
    assert all(int(masks.foreground[b].sum()) > 0 for b in range(2))


@pytest.mark.parametrize("switches", [{}, {"adaptive_scaling": False}, {"attention": False},
                                      {"student_attention_ratio": 0.0}, {"region_decomposition": False}])
@pytest.mark.parametrize("worker_has_teacher", [True, False], ids=["cached-targets", "live-teacher"])
def test_precomputed_inputs_give_the_in_step_loss(switches, worker_has_teacher):
    """Cached targets: everything precomputed; live teacher: only the GT-only parts (box index, GT heatmap, the masks
    of the layer without FP). Terms within 1e-6 relative, gradients of the student and the adapters alike."""
    loss = make_loss(**switches)
    boxes = rotated_overlapping_boxes()
    student, teacher, teacher_heatmap, gt_heatmap = make_inputs()
    in_step, in_step_grads = loss_and_gradients(loss, student, teacher, boxes, teacher_heatmap, gt_heatmap)
    precomputed = per_sample(loss.target_spec(), boxes, gt_heatmap, *((teacher, teacher_heatmap)
                                                                      if worker_has_teacher else ()))
    neck_has_fp = loss.uses_false_positive(loss.pairs[1])
    # without the teacher's heatmap the worker cannot build the FP layer's masks: the step builds them
    assert (precomputed.layers["neck"].regions is None) == (neck_has_fp and not worker_has_teacher)
    assert precomputed.layers["backbone2"].regions is not None
    given, given_grads = loss_and_gradients(loss, student, teacher, boxes, teacher_heatmap, gt_heatmap, precomputed)
    assert set(given) == set(in_step)
    if loss.config.region_decomposition:
        assert {"kd_neck_fp", "kd_neck_fg", "kd_backbone2_bg"} <= set(in_step)
    for name, value in in_step.items():
        assert float(value) != 0.0 or name.endswith("_fg")
        assert abs(float(given[name]) - float(value)) <= 1e-6 * abs(float(value)), name
    assert set(given_grads) == set(in_step_grads)
    for name, grad in in_step_grads.items():
        torch.testing.assert_close(given_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_precomputed_masks_of_the_wrong_grid_are_refused():
    loss = make_loss()
    boxes = rotated_overlapping_boxes()
    student, teacher, teacher_heatmap, gt_heatmap = make_inputs()
    precomputed = per_sample(loss.target_spec(), boxes[:2], gt_heatmap[:2], {k: v[:2] for k, v in teacher.items()},
                             teacher_heatmap[:2])
    with pytest.raises(ValueError, match="precomputed region masks"):
        loss(student, teacher, boxes, teacher_heatmap, gt_heatmap, precomputed=precomputed)


def test_teacher_attention_per_sample_equals_the_batched_one():
    """The worker computes the teacher's spatial attention on one sample (B = 1); the step on the batch."""
    from distillbev.pipeline.losses.attention import spatial_attention

    _, teacher, _, _ = make_inputs()
    for features in teacher.values():
        batched = spatial_attention(features, 0.5)
        alone = torch.cat([spatial_attention(features[b:b + 1], 0.5) for b in range(features.shape[0])])
        torch.testing.assert_close(alone, batched, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_mean", [False, True])
def test_the_fused_channel_sums_match_autograd(weighted, with_mean):
    """Forward values equal `squared_error_per_cell` and `S'.mean(dim=1)` exactly; the one-pass backward passes
    gradcheck."""
    generator = torch.Generator().manual_seed(5)
    adapted = torch.randn(2, 4, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 5, generator=generator, dtype=torch.float64)
    weights = torch.rand(2, 4, generator=generator, dtype=torch.float64) if weighted else None
    per_cell, weighted_cell, mean = channel_summed_squared_error(adapted, teacher, weights, with_mean)
    assert torch.equal(per_cell, squared_error_per_cell(adapted, teacher))
    assert (weighted_cell is None) != weighted and (mean is None) != with_mean
    if weighted:
        assert torch.equal(weighted_cell, squared_error_per_cell(adapted, teacher, weights))
    if with_mean:
        assert torch.equal(mean, adapted.mean(dim=1))

    def outputs(a):
        return tuple(t for t in channel_summed_squared_error(a, teacher, weights, with_mean) if t is not None)

    torch.autograd.gradcheck(outputs, (adapted,))
