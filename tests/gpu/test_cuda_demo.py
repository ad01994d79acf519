"""The commands that run other commands, on a CUDA device: `demo` (make-synthetic, train-teacher, extract-teacher and
both students, in this process) and `ablate` on the demo's folder, at tests/core/test_demo.py's tiny size, with the
last device's explicit index (`cuda:N`), which they pass on to every step."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from cuda_helpers import cuda_devices, device_memory_check

from distillbev.cli import cli

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

TINY = ["--world", "1", "--scenes", "2", "--samples-per-scene", "4", "--views", "2", "--jobs", "1",
        "--teacher-set", "train.epochs=1", "--teacher-set", "train.batch_size=2",
        "--set", "train.epochs=1", "--set", "train.num_workers=1"]


@pytest.fixture(scope="module")
def device() -> str:
    return cuda_devices()[-1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("cuda_demo")
    with device_memory_check(device):
        result = CliRunner().invoke(cli, ["demo", "--out", str(out), *TINY, "--device", device],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_demo_runs_every_step_on_the_device(demo_dir, device):
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    steps = summary["steps"]
    assert [step["name"] for step in steps] == ["make-synthetic", "train-teacher", "extract-teacher",
                                                "train-student (baseline)", "train-student (distilled)"]
    for step in steps[1:]:  # every computing step was given the device
        command = step["command"]
        assert command[command.index("--device") + 1] == device, step["name"]
    for row in summary["results"]:
        assert 0.0 <= row["mAP"] <= 1.0 and 0.0 <= row["NDS"] <= 1.0
    log = (demo_dir / "students" / "bevdet_distilled" / "train_log.jsonl").read_text().splitlines()
    assert any(key.startswith("kd_neck_") for key in json.loads(log[0]))


def test_ablate_trains_a_row_on_the_device(demo_dir, device):
    with device_memory_check(device):
        result = CliRunner().invoke(cli, ["ablate", "--out", str(demo_dir), "--world", "1", "--views", "2",
                                          "--rows", "plain imitation", "--set", "train.epochs=1",
                                          "--set", "train.num_workers=1", "--device", device],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((demo_dir / "ablations.json").read_text())
    assert [row["row"] for row in report["components"]] == ["plain imitation"]
    runs = list((demo_dir / "ablations").glob("*/eval/metrics_summary.json"))
    assert len(runs) == 1
    run = runs[0].parent.parent
    distill = yaml.safe_load((run / "config.yaml").read_text())["distill"]
    assert distill["region_decomposition"] is False and distill["adaptive_scaling"] is False  # the plain row's
    first = json.loads((run / "train_log.jsonl").read_text().splitlines()[0])
    assert any(key.startswith("kd_") for key in first)
