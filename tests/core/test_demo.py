"""The main job end to end at a tiny size: every step runs, the summary has the documented form, reruns reuse."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from distillbev.cli import cli

pytestmark = pytest.mark.slow

TINY = ["--scenes", "2", "--samples-per-scene", "4", "--views", "2",
        "--teacher-set", "train.epochs=1", "--teacher-set", "train.batch_size=2",
        "--set", "train.epochs=1", "--set", "train.num_workers=0"]


def test_demo_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), *TINY], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    names = [step["name"] for step in summary["steps"]]
    assert names == ["make-synthetic", "train-teacher", "extract-teacher", "train-student (baseline)",
                     "train-student (distilled)"]
    for step in summary["steps"]:
        assert step["command"][0] == "distillbev" and step["seconds"] > 0
    assert set(summary["paths"]) == {"dataroot", "teacher_checkpoint", "cache", "students"}
    rows = summary["results"]
    assert [r["teacher"] for r in rows] == [None, None, "CenterPoint"]
    for row in rows:
        assert set(row) >= {"teacher", "student", "mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"}
        assert 0.0 <= row["mAP"] <= 1.0 and 0.0 <= row["NDS"] <= 1.0
    table = (out / "results.md").read_text()
    assert table.startswith("| Teacher | Mode | Student | Mode | mAP↑ | NDS↑")
    assert (out / "results.png").stat().st_size > 1000
    distilled_log = out / "students" / "bevdet_distilled" / "train_log.jsonl"
    first = json.loads(distilled_log.read_text().splitlines()[0])
    assert any(key.startswith("kd_neck_") for key in first)  # the distilled run really distils

    again = CliRunner().invoke(cli, ["demo", "--out", str(out), *TINY], catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("reused") == 5
