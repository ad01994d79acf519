"""Training arithmetic: bf16 autocast and channels_last, for the teacher step and the student outputs; `precision:
auto` resolved from the device's native bf16 (faked here: the tests never depend on this machine's CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

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


# --- `precision: auto`: resolved once per run from the device's native bf16 -----------------------------------------

class _Sentinel(Exception):
    """Raised by a patched loader to stop a training run right after it resolved and recorded its precision."""


@pytest.fixture
def cpu_bf16(monkeypatch):
    """fake(onednn, *instructions): a CPU whose oneDNN reports bf16 support `onednn` and which has `instructions`
    (e.g. "avx512_bf16") among its capabilities; the real CPU is never asked."""
    def fake(onednn: bool, *instructions: str) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
        capabilities = {"architecture": "x86_64", "avx2": True, **{name: True for name in instructions}}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    return fake


@pytest.mark.parametrize("instruction", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_bf16, instruction):
    from distillbev.pipeline.precision import resolve_precision

    cpu_bf16(True, instruction)
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == "bf16"
    assert reason.startswith("precision auto -> bf16") and instruction in reason


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_bf16):
    """An AVX2-only CPU (oneDNN: no bf16), and an AVX512 CPU without the bf16 instructions (oneDNN emulates)."""
    from distillbev.pipeline.precision import resolve_precision

    cpu_bf16(False)
    precision, reason = resolve_precision("auto", torch.device("cpu"))
    assert precision == "fp32" and "no native bf16" in reason
    cpu_bf16(True, "avx512_f", "avx512_bw")
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == "fp32" and "emulate" in reason


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cuda_device_follows_its_native_bf16(monkeypatch, native):
    """A faked CUDA device: asked without emulation (a pre-Ampere GPU emulates bf16 slowly)."""
    from distillbev.pipeline.precision import resolve_precision

    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: not native)  # the CPU is not asked
    assert resolve_precision("auto", "cuda:0")[0] == ("bf16" if native else "fp32")
    assert asked == [False]


@pytest.mark.parametrize("native", [True, False])
def test_explicit_fp32_and_bf16_are_kept_on_any_cpu(cpu_bf16, native):
    from distillbev.pipeline.precision import resolve_precision

    cpu_bf16(native, "avx512_bf16")
    assert resolve_precision("fp32", "cpu")[0] == "fp32"
    assert resolve_precision("bf16", "cpu")[0] == "bf16"
    with pytest.raises(ValueError, match="expected 'auto', 'fp32' or 'bf16'"):
        resolve_precision("fp16", "cpu")


def test_explicit_bf16_without_native_bf16_warns_with_the_measured_cost(cpu_bf16, caplog):
    from distillbev.pipeline.precision import training_precision

    cpu_bf16(False)
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.precision"):
        assert training_precision("bf16", "cpu", "train-teacher") == "bf16"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "train-teacher" in record.message and "5.1x slower" in record.message
    assert "set precision: fp32 or auto" in record.message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.precision"):
        assert training_precision("fp32", "cpu") == "fp32"
        assert training_precision("auto", "cpu") == "fp32"
        assert training_precision("auto", "cpu", announce=False) == "fp32"  # e.g. a rank other than 0
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert "precision auto -> fp32" in caplog.records[1].message


def test_explicit_bf16_with_native_bf16_is_logged_without_a_warning(cpu_bf16, caplog):
    from distillbev.pipeline.precision import training_precision

    cpu_bf16(True, "avx512_bf16")
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.precision"):
        assert training_precision("bf16", "cpu") == "bf16"
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_configs_default_to_auto_and_the_shipped_ones_choose_it_or_fp32():
    """auto is the dataclass default (the adapters stay fp32); the synthetic and street teachers and BEVDet students
    say auto, the BEVDepth and BEVFormer students and the real-data recipes fp32."""
    from distillbev.pipeline.config import ConfigError, load_config
    from distillbev.pipeline.distill.config import StudentExperimentConfig, StudentTrainConfig
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherTrainConfig

    assert TeacherTrainConfig().precision == "auto" and StudentTrainConfig().precision == "auto"
    assert StudentTrainConfig().adapter_precision == "fp32"
    assert load_config(StudentExperimentConfig, None, ["train.adapter_precision=auto"]).train.adapter_precision == "auto"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(TeacherExperimentConfig, None, ["train.precision=fp16"])
    root = Path(__file__).resolve().parents[2] / "configs"
    for world in ("synthetic", "street"):
        for name in ("teacher", "teacher_mvp", "teacher_detr"):
            assert load_config(TeacherExperimentConfig, root / world / f"{name}.yaml").train.precision == "auto"
        for name, expected in (("bevdet", "auto"), ("bevdet4d", "auto"), ("bevdepth", "fp32"), ("bevdepth4d", "fp32"),
                               ("bevformer", "fp32")):
            cfg = load_config(StudentExperimentConfig, root / world / f"student_{name}.yaml")
            assert cfg.train.precision == expected, (world, name)
    for path in sorted((root / "nuscenes").glob("*.yaml")):
        kind = TeacherExperimentConfig if path.name.startswith("teacher") else StudentExperimentConfig
        assert load_config(kind, path).train.precision == "fp32", path.name


def test_distillation_setup_resolves_auto_for_the_students_device(cpu_bf16):
    from distillbev.pipeline.distill.train import DistillationSetup

    cpu_bf16(False)
    setup = DistillationSetup(student=torch.nn.Conv2d(1, 1, 1), distill_loss=None, teacher=None, layers=[],
                              precision="auto")
    assert setup.precision == "fp32"
    cpu_bf16(True, "avx512_bf16")
    assert DistillationSetup(student=torch.nn.Conv2d(1, 1, 1), distill_loss=None, teacher=None, layers=[],
                             precision="auto").precision == "bf16"


def test_teacher_run_logs_and_records_the_resolved_precision(tmp_path, monkeypatch, cpu_bf16, caplog):
    """config.yaml records what ran (fp32 on a CPU without native bf16), not `auto`."""
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher import train
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.train import run_teacher_training

    cpu_bf16(False)
    monkeypatch.setattr(train, "NuScenesDetectionDataset", lambda *args, **kwargs: (_ for _ in ()).throw(_Sentinel))
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.precision"), pytest.raises(_Sentinel):
        run_teacher_training(TeacherExperimentConfig(), tmp_path / "run")
    assert load_config(TeacherExperimentConfig, tmp_path / "run" / "config.yaml").train.precision == "fp32"
    assert [r.message for r in caplog.records] == [
        "train-teacher: precision auto -> fp32: the CPU has no native bf16 (oneDNN reports no bf16 support: no "
        "AVX512-BF16 or AMX)"]


def test_student_run_records_the_resolved_precision_of_the_student_and_the_adapters(tmp_path, monkeypatch,
                                                                                     cpu_bf16, caplog):
    import dataclasses

    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.distill import run
    from distillbev.pipeline.distill.config import StudentExperimentConfig

    cpu_bf16(True, "amx_bf16")
    monkeypatch.setattr(run, "build_student", lambda *args, **kwargs: (_ for _ in ()).throw(_Sentinel))
    cfg = StudentExperimentConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, adapter_precision="auto"))
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.precision"), pytest.raises(_Sentinel):
        run.train_student(cfg, tmp_path / "run")
    written = load_config(StudentExperimentConfig, tmp_path / "run" / "config.yaml")
    assert (written.train.precision, written.train.adapter_precision) == ("bf16", "bf16")
    assert [r.message.split(":")[0] for r in caplog.records] == ["train-student",
                                                                 "train-student (DistillBEV adapters)"]


def test_pretraining_resolves_and_logs_its_precision(tmp_path, monkeypatch, cpu_bf16, caplog):
    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.student import pretrain_run

    cpu_bf16(False)
    monkeypatch.setattr(pretrain_run, "NuScenesDetectionDataset",
                        lambda *args, **kwargs: (_ for _ in ()).throw(_Sentinel))
    with caplog.at_level(logging.INFO, logger="distillbev.pipeline.precision"), pytest.raises(_Sentinel):
        pretrain_run.pretrain_backbone(StudentExperimentConfig(), tmp_path / "pretrain")
    assert [r.message.split(":")[0] for r in caplog.records] == ["pretrain-backbone"]
    assert "precision auto -> fp32" in caplog.records[0].message
