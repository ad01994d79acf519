"""`run_teacher_training` end to end on a tiny synthetic dataroot: checkpoints, log, evaluation, resume."""

from __future__ import annotations

import json

import pytest
import torch
from teacher_helpers import synthetic_teacher_data
from test_teacher_train import micro_config

from distillbev.pipeline.teacher.checkpoint import load_teacher_checkpoint
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherTrainConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    return synthetic_teacher_data(tmp_path_factory.mktemp("synthetic") / "data", num_scenes=2)


@pytest.mark.slow
def test_run_trains_checkpoints_evaluates_and_resumes(tmp_path, synthetic_data):
    from distillbev.pipeline.teacher.train import run_teacher_training

    data = synthetic_data
    config = TeacherExperimentConfig(data=data, model=micro_config(),
                                     train=TeacherTrainConfig(epochs=1, batch_size=2, lr=1e-3, log_every=1))
    run = tmp_path / "run"
    summary = run_teacher_training(config, run)
    assert summary["steps"] == 1
    assert (run / "checkpoints" / "epoch_1.pth").is_file() and (run / "latest.pth").is_file()
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["step", "epoch"]
    metrics = json.loads((run / "eval" / "metrics_summary.json").read_text())
    assert "mean_ap" in metrics and "nd_score" in metrics
    results = json.loads((run / "eval" / "results.json").read_text())
    assert len(results["results"]) == 2  # every val sample token is present

    model = CenterPointTeacher(config.model)
    assert load_teacher_checkpoint(model, run / "latest.pth").num_loaded == len(model.state_dict())

    resumed = TeacherExperimentConfig(data=data, model=micro_config(),
                                      train=TeacherTrainConfig(epochs=2, batch_size=2, lr=1e-3, evaluate=False))
    summary = run_teacher_training(resumed, run, resume=True)
    assert summary["steps"] == 2 and (run / "checkpoints" / "epoch_2.pth").is_file()
    epochs = [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [1, 2]
    assert torch.load(run / "latest.pth", weights_only=False)["training"]["epoch"] == 2
