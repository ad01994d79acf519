"""Every computing stage on a CUDA device, through its command and `--device`: train-teacher, evaluate-teacher,
extract-teacher, pretrain-backbone, and train-student with each kind of targets (none, an int8 cache, the live
teacher) on the tiny world (conftest.py), once per device spelling (`cuda`, `cuda:N`).

What the device must not change is checked against the CPU: the extracted maps against the teacher run on the CPU
(within the int8 budget), evaluate-teacher's detections against a CPU evaluation, and the first training step's loss
terms of a student fed from the int8 cache against the same step on the CPU (the int8 handover: what crosses the
DataLoader's worker boundary and where it is dequantised must not change the loss). Those comparisons turn TF32 off
(cuDNN convolutions use it by default), so the device computes in float32 like the CPU; a command that turned TF32
on by itself would move the loss terms by about 1e-3, the comparison's tolerance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cuda_helpers import cuda_devices, device_memory_check

from distillbev.cli import cli

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

FLOAT_TOLERANCE = 1e-3  # relative, a loss term of the same step on the device and on the CPU in float32
INT8_TOLERANCE = 0.05  # relative RMS error of a cached map: the int8 budget (0.03 of the map's RMS) plus margin


def invoke(*argv: str):
    result = CliRunner().invoke(cli, [str(arg) for arg in argv], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def float32_on_device():
    """No TF32 in cuDNN convolutions or matmuls while a test compares the device's numbers with the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module", params=cuda_devices())
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def teacher_run(tiny_world, device, tmp_path_factory) -> Path:
    """`train-teacher --device DEVICE`: one epoch of the tiny teacher (3 steps), then its evaluation."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    with device_memory_check(device):
        invoke("train-teacher", "--config", tiny_world.teacher_yaml, "--dataroot", tiny_world.dataroot, "--out", run,
               "--device", device)
    return run


@pytest.fixture(scope="module")
def int8_cache(tiny_world, device, teacher_run, tmp_path_factory) -> Path:
    """`extract-teacher --device DEVICE`: a 2-view int8 cache (the default dtype) of the trained tiny teacher."""
    cache = tmp_path_factory.mktemp("cache") / "cache.zarr"
    with device_memory_check(device):
        invoke("extract-teacher", "--config", teacher_run / "config.yaml", "--dataroot", tiny_world.dataroot,
               "--checkpoint", teacher_run / "latest.pth", "--cache", cache, "--split", "synth_train", "--views", "2",
               "--seed", "3", "--device", device)
    return cache


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_teacher_trains_on_the_device_and_writes_a_cpu_loadable_checkpoint(teacher_run):
    steps = [record for record in log_records(teacher_run / "train_log.jsonl") if record.get("kind") == "step"]
    assert len(steps) == 3  # 3 train key frames at batch 1
    assert all(math.isfinite(record["loss"]) for record in steps)
    state = torch.load(teacher_run / "latest.pth", map_location="cpu", weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in state["state_dict"].values())
    summary = json.loads((teacher_run / "eval" / "metrics_summary.json").read_text())
    assert 0.0 <= summary["mean_ap"] <= 1.0 and 0.0 <= summary["nd_score"] <= 1.0


def top_scores(results_path: Path, count: int = 5) -> dict[str, list[float]]:
    results = json.loads(results_path.read_text())["results"]
    return {token: sorted((box["detection_score"] for box in boxes), reverse=True)[:count]
            for token, boxes in results.items()}


def test_evaluate_teacher_on_the_device_detects_what_the_cpu_detects(tiny_world, device, teacher_run, tmp_path,
                                                                     float32_on_device):
    """The same checkpoint evaluated on the device and on the CPU: each sample's five best scores agree."""
    common = ["evaluate-teacher", "--config", teacher_run / "config.yaml", "--checkpoint", teacher_run / "latest.pth",
              "--dataroot", tiny_world.dataroot, "--version", tiny_world.version, "--split", tiny_world.val_split,
              "--set", "model.head.score_threshold=0.0"]
    with device_memory_check(device):
        invoke(*common, "--out", tmp_path / "device", "--device", device)
    invoke(*common, "--out", tmp_path / "cpu", "--device", "cpu")
    on_device, on_cpu = top_scores(tmp_path / "device" / "results.json"), top_scores(tmp_path / "cpu" / "results.json")
    assert on_device.keys() == on_cpu.keys() and len(on_cpu) == 3
    for token, scores in on_cpu.items():
        assert len(scores) == 5, "the comparison needs decoded boxes"
        np.testing.assert_allclose(on_device[token], scores, atol=1e-3, err_msg=token)
    record = json.loads((tmp_path / "device" / "evaluation.json").read_text())
    assert record["split"] == tiny_world.val_split and 0.0 <= record["metrics"]["mAP"] <= 1.0


def test_extract_teacher_on_the_device_stores_the_maps_the_cpu_teacher_computes(tiny_world, teacher_run, int8_cache,
                                                                                float32_on_device):
    """Both views of a sample, read back from the int8 store, against the same teacher run on the CPU."""
    from distillbev.pipeline.cache.reader import TeacherCache
    from distillbev.pipeline.config import load_config, to_dict
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.distill.run import live_teacher
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig

    cache = TeacherCache.open(int8_cache)
    assert cache.manifest["storage"]["dtype"] == "int8" and cache.num_views == 2
    config = load_config(TeacherExperimentConfig, teacher_run / "config.yaml")
    teacher = live_teacher(to_dict(config.model), teacher_run / "latest.pth", torch.device("cpu"))
    dataset = NuScenesDetectionDataset(config.data, "synth_train", mode="test")
    index = cache.index_of(dataset.sample_tokens[0])
    for view in range(2):
        cached = cache.read(index, view)
        sample = dataset.get(0, bev_aug=cache.bev_aug(index, view), with_images=False)
        with torch.no_grad():
            outputs = teacher([sample.points])
        for name, stored in cached.features.items():
            expected = outputs.features[name][0]
            error = float((stored.float() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())
            assert error < INT8_TOLERANCE, f"view {view} {name}: relative RMS error {error:.4f}"
        heatmap = outputs.heatmap[0].sigmoid().clamp(1e-4, 1 - 1e-4)
        assert float((cached.heatmap.float() - heatmap).abs().max()) < 2e-3  # stored in float16


def test_pretrain_backbone_trains_on_the_device(tiny_world, device, tmp_path):
    out = tmp_path / "backbone"
    with device_memory_check(device):
        result = invoke("pretrain-backbone", "--config", tiny_world.student_yaml, "--dataroot", tiny_world.dataroot,
                        "--out", out, "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=1",
                        "--set", "pretrain.num_workers=0", "--set", "pretrain.warmup_iters=1", "--device", device)
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 3  # 3 train key frames at batch 1
    assert all(math.isfinite(value) for value in summary["val"].values())
    state = torch.load(out / "backbone.pth", map_location="cpu", weights_only=True)
    assert state["conv1.weight"].device.type == "cpu" and torch.isfinite(state["conv1.weight"]).all()


@pytest.mark.parametrize("targets", ["baseline", "cache", "online"])
def test_train_student_trains_on_the_device(tiny_world, device, teacher_run, int8_cache, tmp_path, targets):
    """One epoch (3 steps) with each kind of targets, then the student's evaluation."""
    extra = {"baseline": ["--baseline"],
             "cache": ["--cache", int8_cache, "--teacher-checkpoint", teacher_run / "latest.pth"],
             "online": ["--targets", "online", "--teacher-checkpoint", teacher_run / "latest.pth"]}[targets]
    run = tmp_path / "student"
    with device_memory_check(device):
        invoke("train-student", "--config", tiny_world.student_yaml, "--dataroot", tiny_world.dataroot, "--out", run,
               "--device", device, *extra)
    records = log_records(run / "train_log.jsonl")
    assert len(records) == 3
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        assert any(key.startswith("kd_") for key in record) == (targets != "baseline")
    summary = json.loads((run / "eval" / "metrics_summary.json").read_text())
    assert 0.0 <= summary["mean_ap"] <= 1.0


def test_int8_cache_gives_the_same_first_step_loss_on_the_device_as_on_the_cpu(tiny_world, device, teacher_run,
                                                                               int8_cache, tmp_path,
                                                                               float32_on_device):
    """The int8 handover: the same first step (same seed, weights, view and targets), the batch handed over by one
    DataLoader worker, gives every loss term to float tolerance whichever device dequantises and computes."""
    terms = {}
    for name, on in (("device", device), ("cpu", "cpu")):
        run = tmp_path / name
        invoke("train-student", "--config", tiny_world.student_yaml, "--dataroot", tiny_world.dataroot, "--out", run,
               "--cache", int8_cache, "--teacher-checkpoint", teacher_run / "latest.pth", "--max-steps", "1",
               "--device", on)
        terms[name] = log_records(run / "train_log.jsonl")[0]
    # every logged term (the detection terms, the KD terms, their sum) and the gradient norm
    names = sorted(key for key, value in terms["cpu"].items()
                   if isinstance(value, float) and key not in ("epoch", "iteration", "lr", "data_seconds"))
    assert "loss" in names and "grad_norm" in names and len([key for key in names if key.startswith("kd_")]) >= 4
    for key in names:
        expected, found = terms["cpu"][key], terms["device"][key]
        assert abs(found - expected) <= FLOAT_TOLERANCE * max(abs(expected), 1e-6), (
            f"{key}: {found!r} on {device}, {expected!r} on the CPU")
