"""Per-epoch evaluation in the student training loop: eval_history.jsonl holds the evaluated epochs once each, a
resumed run continues it without repeats, and evaluating during training changes nothing the student learns."""

from __future__ import annotations

import json

import pytest
import torch

from distillbev.pipeline.distill.progress import (AttentionSnapshot, read_history, reset_progress, save_snapshot,
                                                  snapshot_path, snapshot_paths)
from distillbev.pipeline.eval import summary_metrics

from figures_world import one_thread, student_config


@pytest.mark.slow
def test_history_holds_every_second_epoch_and_the_last(trained_runs):
    for run in trained_runs.values():
        history = read_history(run / "eval_history.jsonl")
        # epochs 1..3 with eval_every 2: after epoch 2 into eval/epoch_002, after the last into eval/ (not twice)
        assert [(r["epoch"], r["iteration"], r["eval_dir"]) for r in history] == [(2, 6, "eval/epoch_002"),
                                                                                  (3, 9, "eval")]
        for record in history:
            summary = json.loads((run / record["eval_dir"] / "metrics_summary.json").read_text())
            assert {k: v for k, v in record.items() if k not in ("epoch", "iteration", "eval_dir")} \
                == summary_metrics(summary)
        assert sorted(p.name for p in (run / "eval").glob("epoch_*")) == ["epoch_002"]
        assert (run / "eval" / "results_nusc.json").exists()


@pytest.mark.slow
def test_resumed_run_continues_the_history_without_repeats(world, tmp_path):
    from distillbev.pipeline.distill.run import train_student

    run = tmp_path / "run"
    with one_thread():  # resuming the finished run below must reproduce its evaluation bit for bit
        train_student(student_config(world, distilled=False, epochs=2, eval_every=1), run)
        first = read_history(run / "eval_history.jsonl")
        # the same run continued to 4 epochs: epochs 3 and 4 are added, the first two lines keep their metrics;
        # eval/ now holds epoch 4's evaluation, so epoch 2's line no longer names a folder
        train_student(student_config(world, distilled=False, epochs=4, eval_every=1), run, resume=True)
        resumed = read_history(run / "eval_history.jsonl")
        # resuming the finished run evaluates the same weights again: the last line is replaced, not repeated
        train_student(student_config(world, distilled=False, epochs=4, eval_every=1), run, resume=True)
        again = read_history(run / "eval_history.jsonl")
    assert [(r["epoch"], r["eval_dir"]) for r in first] == [(1, "eval/epoch_001"), (2, "eval")]
    assert [(r["epoch"], r["eval_dir"]) for r in resumed] == [(1, "eval/epoch_001"), (2, None),
                                                              (3, "eval/epoch_003"), (4, "eval")]
    assert resumed[0] == first[0] and resumed[1] == {**first[1], "eval_dir": None}
    assert again == resumed
    assert [p.name for p in snapshot_paths(run)] == ["epoch_001.npz", "epoch_002.npz", "epoch_004.npz"]


@pytest.mark.slow
def test_evaluating_and_snapshotting_during_training_changes_nothing_learnt(world, tmp_path):
    from distillbev.pipeline.distill.run import train_student

    states = {}
    with one_thread():  # bit for bit
        for name, eval_every, snapshots in (("plain", 0, False), ("observed", 1, True)):
            cfg = student_config(world, distilled=True, epochs=2, eval_every=eval_every, snapshots=snapshots)
            train_student(cfg, tmp_path / name, cache_path=world.cache_path)
            states[name] = torch.load(tmp_path / name / "latest.pth", map_location="cpu", weights_only=False)
    assert [r["epoch"] for r in read_history(tmp_path / "plain" / "eval_history.jsonl")] == [2]
    assert [r["epoch"] for r in read_history(tmp_path / "observed" / "eval_history.jsonl")] == [1, 2]
    for key in ("state_dict", "distill_state_dict"):  # weights and BatchNorm statistics alike
        plain, observed = states["plain"][key], states["observed"][key]
        assert plain.keys() == observed.keys()
        for name in plain:
            assert torch.equal(plain[name], observed[name]), f"{key}.{name}"
    assert torch.equal(states["plain"]["torch_rng"], states["observed"]["torch_rng"])


def test_reset_progress_keeps_what_the_checkpoint_has_seen(tmp_path):
    import numpy as np

    lines = [{"epoch": e, "iteration": 3 * e, "eval_dir": f"eval/epoch_{e:03d}", "mAP": 0.1 * e} for e in (1, 2, 3)]
    (tmp_path / "eval_history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for epoch in (1, 3):
        save_snapshot(snapshot_path(tmp_path, epoch), AttentionSnapshot(
            epoch, 3 * epoch, ["a"], np.ones((1, 2, 2), np.float32), "raw", "neck", "neck", 0.5, 0))
    reset_progress(tmp_path, 2)  # resuming from a checkpoint written after epoch 2
    assert read_history(tmp_path / "eval_history.jsonl") == lines[:2]
    assert [p.name for p in snapshot_paths(tmp_path)] == ["epoch_001.npz"]
    reset_progress(tmp_path, 0)  # a fresh run
    assert not (tmp_path / "eval_history.jsonl").exists() and snapshot_paths(tmp_path) == []


def test_eval_every_must_not_be_negative():
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.errors import ConfigError

    assert load_config(StudentExperimentConfig, overrides=["train.eval_every=3"]).train.eval_every == 3
    with pytest.raises(ConfigError, match="eval_every: expected 0 .* found -1"):
        load_config(StudentExperimentConfig, overrides=["train.eval_every=-1"])
    with pytest.raises(ConfigError, match="attention_samples: expected at least 1, found 0"):
        load_config(StudentExperimentConfig, overrides=["train.attention_samples=0"])
