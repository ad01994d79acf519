"""Training arithmetic: bf16 autocast and channels_last, for the teacher step and the student outputs."""

from __future__ import annotations

import pytest
import torch

from distillbev.pipeline.precision import autocast, set_memory_format
from distillbev.pipeline.student.model import StudentOutputs


def test_autocast_runs_convolutions_in_the_asked_dtype():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with autocast("cpu", "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected 'fp32' or 'bf16'"):
        autocast("cpu", "fp16")


def test_channels_last_changes_the_layout_not_the_values():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    expected = conv(x)
    fast = set_memory_format(conv, True)
    assert fast.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast(x), expected, atol=1e-6)
    assert set_memory_format(torch.nn.Conv2d(3, 4, 3), False).weight.is_contiguous()


def test_student_outputs_float_casts_every_floating_tensor_and_keeps_integers():
    outputs = StudentOutputs(features={"neck": torch.ones(1, 2, 3, 3, dtype=torch.bfloat16)},
                             head=[{"heatmap": torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16),
                                    "index": torch.arange(3)}],
                             depth=torch.full((1, 4, 2, 2), 0.25, dtype=torch.bfloat16))
    cast = outputs.float()
    assert cast.features["neck"].dtype == torch.float32 and float(cast.features["neck"].sum()) == 18.0
    assert cast.head[0]["heatmap"].dtype == torch.float32
    assert cast.head[0]["index"].dtype == torch.int64
    assert cast.depth.dtype == torch.float32 and float(cast.depth.sum()) == 4.0
    assert outputs.features["neck"].dtype == torch.bfloat16  # the original is untouched


def test_teacher_step_in_bf16_keeps_float32_weights_and_a_loss_near_fp32(tmp_path):
    """Same weights, same batch: the bf16 step's loss is within 2% of the fp32 one, and its weights, gradients
    and the saved checkpoint stay float32 in the usual (contiguous) layout."""
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher.checkpoint import save_teacher_checkpoint
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher
    from distillbev.pipeline.teacher.train import build_optimizer, train_step

    cfg = load_config(TeacherExperimentConfig, None, [
        "model.point_cloud_range=[-12.8,-12.8,-5.0,12.8,12.8,3.0]", "model.pillar_size=[0.4,0.4]",
        "model.pillar_channels=8", "model.backbone_channels=[8,16,16]", "model.backbone_layer_nums=[1,1,1]",
        "model.neck_channels=[8,8,8]", "model.neck_upsample_strides=[1.0,2.0,4.0]",
        "model.head.grid={x_min: -12.8, x_max: 12.8, y_min: -12.8, y_max: 12.8, resolution: 0.8}",
        "model.head.shared_channels=8", "model.head.head_channels=8"])
    generator = torch.Generator().manual_seed(0)
    points = [torch.cat([torch.rand(3000, 3, generator=generator) * torch.tensor([24.0, 24.0, 3.0])
                         - torch.tensor([12.0, 12.0, 2.0]), torch.rand(3000, 1, generator=generator),
                         torch.zeros(3000, 1)], dim=1)]
    boxes = [torch.tensor([[2.0, 3.0, -1.0, 4.0, 1.8, 1.6, 0.3, 0.0, 0.0]])]
    labels = [torch.tensor([0])]
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = set_memory_format(CenterPointTeacher(cfg.model), precision == "bf16")
        optimizer = build_optimizer(model, cfg.train)
        losses[precision] = train_step(model, points, boxes, labels, optimizer, precision=precision)["loss"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    path = save_teacher_checkpoint(model, tmp_path / "teacher.pth", cfg.model)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert all(v.is_contiguous() for v in state.values())
    assert any(v.dim() == 4 for v in state.values())  # the conv weights were channels_last in the model
