"""`distillbev evaluate-teacher` through the CLI: a tiny teacher trained by `run_teacher_training`, evaluated again
from its checkpoint, prints the table its training-time evaluation wrote, to the digit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from teacher_helpers import synthetic_teacher_data
from test_teacher_train import micro_config

from distillbev.cli import cli
from distillbev.pipeline.eval import format_metrics_table
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherTrainConfig


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step micro teacher on a 3-scene synthetic dataroot (2 val samples) with its training-time evaluation.

    A low score threshold keeps boxes in results.json, so the comparison is over real detections."""
    from distillbev.pipeline.teacher.train import run_teacher_training

    root = tmp_path_factory.mktemp("evaluate_teacher")
    data = synthetic_teacher_data(root / "data", num_scenes=3)
    model = micro_config()
    model = dataclasses.replace(model, head=dataclasses.replace(model.head, score_threshold=0.02))
    config = TeacherExperimentConfig(data=data, model=model,
                                     train=TeacherTrainConfig(epochs=1, batch_size=1, lr=3e-3, log_every=100))
    run_teacher_training(config, root / "run")
    return root / "run", data


def evaluate(run, data, out, checkpoint, *extra):
    return CliRunner().invoke(cli, ["evaluate-teacher", "--config", str(run / "config.yaml"), "--checkpoint",
                                    str(checkpoint), "--dataroot", data.dataroot, "--version", data.version,
                                    "--split", data.val_split, "--out", str(out), *extra])


@pytest.mark.slow
def test_prints_the_training_time_table_to_the_digit(trained_run, tmp_path):
    run, data = trained_run
    trained = json.loads((run / "eval" / "metrics_summary.json").read_text())
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    assert sum(len(boxes) for boxes in results.values()) > 0, "the comparison needs decoded boxes"

    result = evaluate(run, data, tmp_path / "ours", run / "checkpoints" / "epoch_1.pth")
    assert result.exit_code == 0, result.output
    assert format_metrics_table(trained) in result.output
    assert json.loads((tmp_path / "ours" / "results.json").read_text())["results"] == results
    record = json.loads((tmp_path / "ours" / "evaluation.json").read_text())
    assert record["checkpoint_source"] == "distillbev" and record["split"] == data.val_split
    assert record["metrics"]["mAP"] == trained["mean_ap"] and record["metrics"]["NDS"] == trained["nd_score"]

    # the same weights as an mmdet3d-era file (meta with mmdet3d_version, DDP prefix): the same table
    state = torch.load(run / "checkpoints" / "epoch_1.pth", weights_only=True)["state_dict"]
    mmdet3d_file = tmp_path / "mmdet3d.pth"
    torch.save({"meta": {"mmdet3d_version": "1.0.0rc4"},
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, mmdet3d_file)
    result = evaluate(run, data, tmp_path / "mmdet3d", mmdet3d_file, "--by-distance", "0,5")
    assert result.exit_code == 0, result.output
    assert format_metrics_table(trained) in result.output
    assert "| 0-5 m |" in result.output and "| >= 5 m |" in result.output
    assert (tmp_path / "mmdet3d" / "metrics_by_distance.json").is_file()
    record = json.loads((tmp_path / "mmdet3d" / "evaluation.json").read_text())
    assert record["checkpoint_source"] == "mmdet3d" and record["mmdet3d_version"] == "1.0.0rc4"


@pytest.mark.slow
def test_refuses_a_pre_1_0_mmdet3d_file_before_reading_the_data(trained_run, tmp_path):
    run, data = trained_run
    state = torch.load(run / "checkpoints" / "epoch_1.pth", weights_only=True)["state_dict"]
    old = tmp_path / "old.pth"
    torch.save({"meta": {"mmdet3d_version": "0.17.3"}, "state_dict": state}, old)
    result = evaluate(run, data, tmp_path / "out", old)
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception) and "written by mmdet3d 0.17.3" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_bad_options_are_usage_errors(tmp_path):
    runner = CliRunner()
    base = ["evaluate-teacher", "--config", "c.yaml", "--checkpoint", "x.pth", "--dataroot", str(tmp_path),
            "--version", "v1.0-mini", "--split", "mini_val"]
    result = runner.invoke(cli, [*base, "--by-distance", "20,10"])
    assert result.exit_code == 2 and "increasing" in result.output
    result = runner.invoke(cli, [*base, "--device", "tpu"])
    assert result.exit_code != 0 and "cpu, cuda or cuda:N" in str(result.exception)


def test_config_differences_name_every_changed_leaf():
    from distillbev.stages.evaluate_teacher import config_differences

    stored = {"pillar_size": [0.2, 0.2], "head": {"score_threshold": 0.1, "nms_type": "circle"}, "decoder": None}
    current = {"pillar_size": [0.2, 0.2], "head": {"score_threshold": 0.05, "nms_type": "circle"},
               "decoder": None, "extra": 1}
    assert config_differences(stored, current) == ["model.extra: null -> 1",
                                                   "model.head.score_threshold: 0.1 -> 0.05"]
    assert config_differences(stored, stored) == []
