"""`train-teacher` under torchrun (2 CPU ranks, gloo): DDP training, rank-0 outputs, gathered evaluation, resume
under another world size, and the --sync-bn refusal on CPU.

Dataroot: 3 synthetic scenes of 2 key frames, 1 for val, so 4 train samples: with batch 1, two ranks take 2 steps
per epoch each (effective batch 2) and one process takes 4.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from teacher_helpers import synthetic_teacher_data
from test_teacher_train import micro_config

from distillbev.pipeline.config import dump_config
from distillbev.pipeline.teacher.config import TeacherExperimentConfig, TeacherTrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "data"
    data = synthetic_teacher_data(root, num_scenes=3)
    config = TeacherExperimentConfig(data=data, model=micro_config(),
                                     train=TeacherTrainConfig(epochs=1, batch_size=1, lr=1e-3, log_every=1))
    path = root.parent / "teacher.yaml"
    dump_config(config, path)
    return root, path, config


def run_cli(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                "-m", "distillbev.cli"] if ranks > 1 else [sys.executable, "-m", "distillbev.cli"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_two_ranks_train_evaluate_and_resume_on_one(experiment, tmp_path):
    from distillbev.pipeline.data.collate import collate_samples
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.teacher.checkpoint import load_teacher_checkpoint
    from distillbev.pipeline.teacher.model import CenterPointTeacher
    from distillbev.pipeline.teacher.train import evaluate_teacher

    root, config_path, config = experiment
    run = tmp_path / "run"
    args = ["train-teacher", "--config", str(config_path), "--dataroot", str(root), "--out", str(run)]
    result = run_cli(args, ranks=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2  # rank 0 alone reports; 4 samples / 2 ranks
    assert "training on 2 rank(s): batch 1 per rank, effective batch 2, 2 steps per epoch" in result.stderr
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("step", 1), ("step", 2), ("epoch", 2)]
    training = torch.load(run / "latest.pth", weights_only=False)["training"]
    assert (training["world_size"], training["steps_per_epoch"], training["step"]) == (2, 2, 2)

    # the gathered evaluation equals one process evaluating the same checkpoint
    model = CenterPointTeacher(config.model)
    load_teacher_checkpoint(model, run / "latest.pth")
    data = dataclasses.replace(config.data, dataroot=str(root))
    val_set = NuScenesDetectionDataset(data, data.val_split, "test")
    evaluate_teacher(model, val_set, collate_samples, torch.device("cpu"), tmp_path / "single", 1)
    gathered = json.loads((run / "eval" / "results.json").read_text())["results"]
    single = json.loads((tmp_path / "single" / "results.json").read_text())["results"]
    assert list(gathered) == list(single) == val_set.sample_tokens
    for token in single:
        assert len(gathered[token]) == len(single[token])
        for a, b in zip(gathered[token], single[token]):
            assert a["detection_name"] == b["detection_name"]
            np.testing.assert_allclose(a["translation"], b["translation"], atol=1e-4)
            assert a["detection_score"] == pytest.approx(b["detection_score"], abs=1e-5)

    # resumed by one process for a second epoch: 4 steps, the schedule continues at 1 epoch x 4 steps
    resumed = run_cli([*args, "--resume", "--set", "train.epochs=2"], ranks=1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming with 4 steps per epoch (the run had 2, world size 2): the schedule continues at step 4" \
        in resumed.stderr
    epochs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert [(r["epoch"], r["step"], r["steps"]) for r in epochs] == [(1, 2, 2), (2, 8, 4)]
    training = torch.load(run / "latest.pth", weights_only=False)["training"]
    assert (training["world_size"], training["steps_per_epoch"], training["step"]) == (1, 4, 8)


def test_sync_bn_is_refused_on_cpu(experiment, tmp_path):
    root, config_path, _ = experiment
    result = run_cli(["train-teacher", "--config", str(config_path), "--dataroot", str(root), "--out",
                      str(tmp_path / "run"), "--sync-bn"], ranks=2)
    assert result.returncode != 0
    assert "error: --sync-bn: SyncBatchNorm has no CPU implementation" in result.stderr
    assert not (tmp_path / "run" / "latest.pth").exists()
