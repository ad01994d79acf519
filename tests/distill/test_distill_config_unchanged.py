"""Stage two never writes into the config it was given: what it derives (the resolved precisions, the live teacher's
sweeps, the --dataroot of the command line) goes into new config objects.

The fixtures are those of test_distill_online_teacher.py: a tiny teacher trained with 1 sweep and a tiny student
config that loads none.
"""

from __future__ import annotations

import copy

import pytest
from click.testing import CliRunner
from test_distill_online_teacher import dataroot, files, student_config  # noqa: F401 (fixtures)

from distillbev.pipeline import config as config_module
from distillbev.pipeline import eval as eval_module
from distillbev.pipeline.config import to_dict
from distillbev.pipeline.distill import run as run_module
from distillbev.pipeline.distill.run import train_student
from distillbev.stages.train_student import command as train_student_command


@pytest.mark.slow
def test_train_student_leaves_the_callers_config_as_it_was(files, dataroot, tmp_path):  # noqa: F811
    cfg = student_config(files["dataroot"])
    cfg.train.precision = "auto"  # resolved to bf16 or fp32 for the run
    before = copy.deepcopy(to_dict(cfg))
    out = tmp_path / "run"
    train_student(cfg, out, teacher_checkpoint=files["latest"], max_steps=1)  # the teacher's latest.pth: 1 sweep
    assert to_dict(cfg) == before
    assert (cfg.data.num_sweeps, cfg.data.sweep_candidates, cfg.train.precision) == (0, 0, "auto")
    ran = config_module.load_config(type(cfg), out / "config.yaml")  # what the run records: precision resolved
    assert ran.train.precision in ("bf16", "fp32") and ran.data.num_sweeps == 0


def test_the_command_line_dataroot_goes_into_a_new_config(files, tmp_path, monkeypatch):  # noqa: F811
    loaded, given = [], []
    load = config_module.load_config

    def recording_load(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(config_module, "load_config", recording_load)
    monkeypatch.setattr(run_module, "train_student", lambda cfg, out, **options: given.append(cfg) or {})
    monkeypatch.setattr(eval_module, "format_metrics_table", lambda summary: "")
    result = CliRunner().invoke(train_student_command, [
        "--config", str(files["student_yaml"]), "--dataroot", str(tmp_path / "elsewhere"), "--baseline",
        "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert [cfg.data.dataroot for cfg in given] == [str(tmp_path / "elsewhere")]
    assert loaded[0].data.dataroot == str(files["dataroot"])  # the YAML's, as loaded
    assert given[0] is not loaded[0]
