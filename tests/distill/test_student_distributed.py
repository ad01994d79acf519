"""`train-student` under torchrun (2 CPU ranks, gloo): the ranks' shards, DDP training equal to one process at the
same effective batch, rank-0 outputs only, resume under another world size, and the --sync-bn refusal on CPU.

World: the figures tests' tiny world (tests/figures/figures_world.py): 3 train and 3 val key frames, a random tiny
teacher and its 2-view cache. With batch 1, the DistributedSampler pads the 3 train positions to 4, so each of two
ranks takes ceil(3 / 2) = 2 steps per epoch (effective batch 2); one process at batch 1 takes 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from module_loader import load_tests_module
from test_distill_replay_schedule_head import FakeDataset

from distillbev.pipeline.config import dump_config
from distillbev.pipeline.distill.cbgs import cbgs_indices
from distillbev.pipeline.distill.targets import DistillationDataset
from distillbev.pipeline.distill.train import steps_per_epoch, train_sampler
from distillbev.pipeline.distributed import World

pytestmark = pytest.mark.slow

# Runs `distillbev train-student` (argv[2:]) in this process, optionally with the test hooks named in argv[1]:
# bn_eval: every BatchNorm (the student's and the adapters') normalises with its running statistics, which then stay
#   at their initial 0 / 1 (an affine layer), so a rank's batch of 1 and a joint batch of 2 are normalised alike;
# two_rank_order: one process iterates the positions two ranks take, interleaved step by step (rank 0, rank 1, ...);
# dump=DIR: each rank saves its trainable parameters before and after training to DIR/{initial,final}_rank<R>.pt.
RUNNER = '''
import json, os, sys
from pathlib import Path

import torch

hooks = json.loads(sys.argv[1])
if hooks.get("bn_eval"):
    from torch.nn.modules.batchnorm import _BatchNorm

    _BatchNorm.forward = lambda self, x: torch.nn.functional.batch_norm(
        x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
from distillbev.pipeline.distill import run
from distillbev.pipeline.distributed import World

if hooks.get("two_rank_order"):
    rank_sampler = run.train_sampler

    class TwoRankOrder:
        def __init__(self, train_set, seed):
            self.shards = [rank_sampler(train_set, World(rank, 2), seed) for rank in range(2)]

        def set_epoch(self, epoch):
            for shard in self.shards:
                shard.set_epoch(epoch)

        def __len__(self):
            return sum(len(shard) for shard in self.shards)

        def __iter__(self):
            return iter([position for pair in zip(*self.shards) for position in pair])

    run.train_sampler = lambda train_set, world, seed: TwoRankOrder(train_set, seed)
if hooks.get("dump"):
    run_epochs = run.run_epochs

    def dumping_run_epochs(cfg, setup, *args, **kwargs):
        def save(name):
            modules = {"student": setup.student, "distill": setup.distill_loss}
            state = {f"{key}.{n}": p.detach().clone() for key, m in modules.items() if m is not None
                     for n, p in m.named_parameters()}
            torch.save(state, Path(hooks["dump"]) / f"{name}_rank{os.environ.get('RANK', '0')}.pt")

        save("initial")
        iteration = run_epochs(cfg, setup, *args, **kwargs)
        save("final")
        return iteration

    run.run_epochs = dumping_run_epochs
from distillbev.cli import main

main(sys.argv[2:])
'''


def figures_world_module():
    """tests/figures/figures_world.py (the tiny world's builder and its student config)."""
    return load_tests_module("figures/figures_world.py", name="figures_world")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student_ddp")
    world = figures_world_module().build_world(folder)
    runner = folder / "runner.py"
    runner.write_text(RUNNER)
    return world, runner


def write_config(world, path: Path, epochs: int, eval_every: int, snapshots: bool) -> Path:
    """The figures tests' tiny distilled BEVDet at batch 1 (lr 1e-3, warmup 2 iterations)."""
    dump_config(figures_world_module().student_config(world, True, epochs=epochs, eval_every=eval_every,
                                                      snapshots=snapshots), path)
    return path


def run_cli(args: list[str], ranks: int, cwd: Path, runner: Path | None = None, hooks: dict | None = None,
            no_python: bool = False) -> subprocess.CompletedProcess:
    """`distillbev` args under torchrun (ranks > 1) or as one process; through RUNNER when hooks are given."""
    if runner is not None:
        program = [str(runner), json.dumps(hooks or {})]
        single = [sys.executable, *program]
    elif no_python:
        program = ["--no-python", str(Path(sys.executable).parent / "distillbev")]
        single = program[1:]
    else:
        program = ["-m", "distillbev.cli"]
        single = [sys.executable, *program]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                *program] if ranks > 1 else single
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- (b) the shards
def shards(train_set: DistillationDataset, epoch: int, ranks: int = 2) -> list[list[int]]:
    samplers = [train_sampler(train_set, World(rank=rank, world_size=ranks), seed=7) for rank in range(ranks)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def test_the_ranks_split_every_epoch_into_disjoint_shards_that_cover_the_split():
    four = DistillationDataset(FakeDataset(list("abcd")), mode="none", seed=7)
    assert train_sampler(four, World(), seed=7) is None  # one process shuffles as it always has
    for epoch in (0, 1, 2):
        zero, one = shards(four, epoch)
        # the interleaved shards are the permutation drawn from seed + epoch
        order = torch.randperm(4, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert [p for pair in zip(zero, one) for p in pair] == order
        assert len(zero) == len(one) == 2 and not set(zero) & set(one) and sorted(zero + one) == [0, 1, 2, 3]
    # reshuffled each epoch: seeds 7 and 8 happen to draw the same permutation of 4, seed 9 another one
    assert shards(four, 0) == [[3, 0], [2, 1]] and shards(four, 2) == [[2, 1], [0, 3]]
    # 5 positions on 2 ranks: padded to 6 with the permutation's first position, so ceil(5 / 2) = 3 each and 3 steps
    # per epoch at batch 1 (2 full batches of... 3 // 2 = 1 at batch 2)
    five = DistillationDataset(FakeDataset(list("abcde")), mode="none", seed=7)
    zero, one = shards(five, 0)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(7)).tolist()
    assert (zero, one) == (order[0::2], order[1::2] + order[:1])
    assert sorted(set(zero + one)) == [0, 1, 2, 3, 4] and len(zero) == len(one) == 3
    # steps per epoch in full batches (drop_last): 3 // 1 and 3 // 2 on a rank, 5 // 1 and 5 // 2 on one process
    sampler = train_sampler(five, World(rank=1, world_size=2), seed=7)
    for batch, on_a_rank, on_one_process in ((1, 3, 5), (2, 1, 2)):
        config = SimpleNamespace(train=SimpleNamespace(batch_size=batch))
        assert steps_per_epoch(config, five, sampler) == on_a_rank
        assert steps_per_epoch(config, five) == on_one_process


def test_with_cbgs_the_ranks_split_the_resampled_list():
    # 6 car-only samples and 1 bus sample: CBGS lists 3 car draws and the bus sample 3 times (test_distill_cbgs.py)
    indices = cbgs_indices([np.array([0])] * 6 + [np.array([1])], 2, np.random.default_rng(1))
    assert len(indices) == 6 and indices[3:] == [6, 6, 6]
    train_set = DistillationDataset(FakeDataset(list("abcdefg")), mode="none", seed=7, indices=indices)
    for epoch in (0, 3):
        zero, one = shards(train_set, epoch)
        # positions of the CBGS list: 3 per rank, disjoint, covering all 6, so the bus sample is drawn 3 times in all
        assert len(zero) == len(one) == 3 and sorted(zero + one) == list(range(6))
        assert sorted(train_set.indices[p] for p in zero + one) == sorted(indices)
    zero, one = shards(DistillationDataset(FakeDataset(list("abcdefg")), mode="none", seed=7, indices=indices[:5]), 0)
    assert len(zero) == len(one) == 3 and sorted(set(zero + one)) == list(range(5))  # padded like DistributedSampler


# ------------------------------------------------------------------- (a) DDP equals one process at the same batch
def test_two_ranks_at_batch_one_equal_one_process_at_batch_two(world, tmp_path):
    """One epoch of the tiny distilled BEVDet: 2 ranks x batch 1 against 1 process x batch 2 in the same order.

    DDP averages the ranks' gradients, so it equals the joint batch exactly when the loss of a batch is the mean of its
    samples' losses. The DistillBEV terms are ((1/B) sum over the batch). Two things are not, and are switched off in
    both runs: BatchNorm in train mode normalises over the batch (a rank's 1 sample against the joint 2), so every
    BatchNorm, the adapters' too, normalises with its running statistics (the RUNNER's bn_eval hook); and the
    CenterHead loss divides by the batch's count of heatmap peaks and objects, so its two weights are 0 (the head
    still gets weight decay, which is per parameter). Measured when left on: the head loss alone made the mean of two
    samples' gradients differ from their joint batch's by 47 % of its norm, and train-mode BatchNorm alone moved the
    logged gradient norm by 4 %.
    The single process iterates the two ranks' positions interleaved (two_rank_order): the padded permutation of the
    3 train positions, in 2 batches of 2.

    What remains is the order of float sums (a gradient all-reduced from two halves against one summed over a batch
    of two) through 2 AdamW steps. Measured: the parameters differ by 1.2e-7 at most, 1.6e-6 of the norm of the
    training's update (0.30 over all parameters); the bounds are 1e-6 and 1e-5 of it. AdamW divides by sqrt(v), so
    an element whose gradient is float noise around 0 could take a full step either way; the bounds would show it.
    """
    folder, runner = world
    config = write_config(folder, tmp_path / "student.yaml", epochs=1, eval_every=0, snapshots=False)
    common = ["train-student", "--config", str(config), "--cache", str(folder.cache_path),
              "--set", "model.head.heatmap_loss_weight=0", "--set", "model.head.box_loss_weight=0"]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = check(run_cli([*common, "--out", str(tmp_path / "run_ddp")], 2, tmp_path, runner,
                        {"bn_eval": True, "dump": str(tmp_path / "ddp")}))
    assert "training on 2 rank(s): batch 1 per rank, effective batch 2, 2 steps per epoch" in ddp.stderr
    one = check(run_cli([*common, "--out", str(tmp_path / "run_one"), "--set", "train.batch_size=2"], 1, tmp_path,
                        runner, {"bn_eval": True, "two_rank_order": True, "dump": str(tmp_path / "one")}))
    assert "training on 1 rank(s): batch 2 per rank, effective batch 2, 2 steps per epoch" in one.stderr
    assert [r["iteration"] for r in log_records(tmp_path / "run_ddp")] == [1, 2]
    assert [r["iteration"] for r in log_records(tmp_path / "run_one")] == [1, 2]

    initial = torch.load(tmp_path / "one" / "initial_rank0.pt")
    single = torch.load(tmp_path / "one" / "final_rank0.pt")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"final_rank{r}.pt") for r in (0, 1))
    assert set(rank0) == set(single) and any(name.startswith("distill.") for name in rank0)  # adapters included
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # the replicas never diverge
        assert torch.equal(torch.load(tmp_path / "ddp" / "initial_rank1.pt")[name], initial[name]), name
    moved = sum(float((single[name] - initial[name]).norm()) ** 2 for name in single) ** 0.5
    difference = sum(float((rank0[name] - single[name]).norm()) ** 2 for name in single) ** 0.5
    largest = max(float((rank0[name] - single[name]).abs().max()) for name in single)
    assert moved > 0.1 and difference < 1e-5 * moved and largest < 1e-6, (moved, difference, largest)
    # the gradient norm rank 0 logs is that of the averaged gradient: the joint batch's
    assert [r["grad_norm"] for r in log_records(tmp_path / "run_ddp")] == pytest.approx(
        [r["grad_norm"] for r in log_records(tmp_path / "run_one")], rel=1e-4)
    # the rank-0 checkpoint is the model rank 0 trained
    checkpoint = torch.load(tmp_path / "run_ddp" / "latest.pth", weights_only=False)
    for name, value in checkpoint["state_dict"].items():
        if f"student.{name}" in rank0:
            assert torch.equal(value, rank0[f"student.{name}"]), name
    assert (checkpoint["world_size"], checkpoint["steps_per_epoch"], checkpoint["iteration"]) == (2, 2, 2)


# ------------------------------------------------------------- (c) rank 0 alone writes, (d) resume on one process
def test_rank_zero_writes_one_run_and_one_process_resumes_it(world, tmp_path):
    """Two epochs on 2 ranks with an evaluation after each and attention snapshots, then one process trains a third.

    warmup_iters 8 makes the schedule visible: the step logged as iteration k ran at lr 1e-3 * (0.001 + 0.999 *
    (k - 1) / 8). The 2-rank run logs iterations 1-4 (2 per epoch); the resumed process takes 3 steps per epoch,
    so it continues at 2 epochs x 3 = iteration 6 and logs 7, 8, 9 (the last one past the warmup).
    """
    folder, runner = world
    config = write_config(folder, tmp_path / "student.yaml", epochs=2, eval_every=1, snapshots=True)
    run = tmp_path / "run"
    args = ["train-student", "--config", str(config), "--cache", str(folder.cache_path), "--out", str(run),
            "--set", "train.warmup_iters=8"]
    (tmp_path / "dump").mkdir()
    result = check(run_cli(args, 2, tmp_path, runner, {"dump": str(tmp_path / "dump")}))
    assert result.stdout.count("mAP:") == 1  # rank 0 alone reports the metrics table
    files = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()
                   and path.parent != tmp_path / "dump")
    expected = ["attention/epoch_001.npz", "attention/epoch_002.npz", "cache_identity.json",
                "checkpoints/epoch_1.pth", "checkpoints/epoch_2.pth", "config.yaml",
                "eval/epoch_001/metrics_details.json", "eval/epoch_001/metrics_summary.json",
                "eval/epoch_001/results_nusc.json", "eval/metrics_details.json", "eval/metrics_summary.json",
                "eval/results_nusc.json", "eval_history.jsonl", "latest.pth", "run_info.json", "train_log.jsonl"]
    assert files == ["run/" + name for name in expected] + ["student.yaml"]
    records = log_records(run)
    assert [(r["epoch"], r["iteration"]) for r in records] == [(0, 1), (0, 2), (1, 3), (1, 4)]  # rank 0's steps
    warmup = [1e-3 * (0.001 + 0.999 * k / 8) for k in range(9)]
    assert [r["lr"] for r in records] == pytest.approx(warmup[:4])
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["iteration"], h["eval_dir"]) for h in history] == [(1, 2, "eval/epoch_001"), (2, 4, "eval")]
    # the gathered evaluation holds every val sample once, in dataset order
    # the gathered evaluation (val samples 0, 2 on rank 0 and 1 on rank 1, after rank 0's BatchNorm statistics were
    # broadcast) equals one process evaluating the checkpoint
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.distill.run import evaluate_student
    from distillbev.pipeline.student.model import CameraStudent

    cfg = load_config(StudentExperimentConfig, config)
    student = CameraStudent(cfg.model)
    student.load_state_dict(torch.load(run / "latest.pth", weights_only=False)["state_dict"])
    evaluate_student(cfg, student, tmp_path, torch.device("cpu"), tmp_path / "single", verbose=False)
    gathered = json.loads((run / "eval" / "results_nusc.json").read_text())["results"]
    single = json.loads((tmp_path / "single" / "results_nusc.json").read_text())["results"]
    assert list(gathered) == list(single) and len(single) == 3
    assert sum(len(boxes) for boxes in single.values()) > 0
    for token, boxes in single.items():
        # the barely trained student's scores tie to 1e-6, so near-equal boxes may come in another order: match each
        remaining = list(gathered[token])
        assert len(remaining) == len(boxes)
        for box in boxes:
            match = next((a for a in remaining if a["detection_name"] == box["detection_name"]
                          and np.abs(np.subtract(a["translation"], box["translation"])).max() < 1e-4), None)
            assert match is not None, (token, box)
            assert match["detection_score"] == pytest.approx(box["detection_score"], abs=1e-5)
            remaining.remove(match)
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"final_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # train-mode BN and the full loss too

    resumed = check(run_cli([*args, "--resume", "--set", "train.epochs=3"], 1, tmp_path))
    assert "resuming with 3 steps per epoch (the run had 2, world size 2): the schedule continues at iteration 6" \
        in resumed.stderr
    records = log_records(run)
    assert [(r["epoch"], r["iteration"]) for r in records[4:]] == [(2, 7), (2, 8), (2, 9)]
    assert [r["lr"] for r in records[4:]] == pytest.approx([warmup[6], warmup[7], 1e-3])
    checkpoint = torch.load(run / "latest.pth", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["iteration"], checkpoint["steps_per_epoch"], checkpoint["world_size"]) \
        == (3, 9, 3, 1)
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["iteration"]) for h in history] == [(1, 2), (2, 4), (3, 9)]


def test_sync_bn_is_refused_on_cpu_before_anything_is_written(world, tmp_path):
    folder, _ = world
    config = write_config(folder, tmp_path / "student.yaml", epochs=1, eval_every=0, snapshots=False)
    result = run_cli(["train-student", "--config", str(config), "--cache", str(folder.cache_path), "--out",
                      str(tmp_path / "run"), "--sync-bn"], 2, tmp_path, no_python=True)
    assert result.returncode != 0
    assert "error: --sync-bn: SyncBatchNorm has no CPU implementation" in result.stderr
    assert not (tmp_path / "run").exists()
