"""`--device cpu|cuda|cuda:N` on every command that computes, checked the same way (`distributed.check_device`), and
the device a torchrun rank takes. CUDA is simulated where a test needs it (torch.cuda's availability and device
count monkeypatched); nothing here runs on a GPU (tests/gpu does)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from distillbev.cli import cli
from distillbev.pipeline.distributed import check_device, init_from_env
from distillbev.pipeline.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two CUDA devices (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_cpu_is_always_a_device():
    assert check_device("cpu") == "cpu"


@pytest.mark.parametrize("spelling", ["tpu", "gpu", "cuda:x", ""])
def test_other_spellings_are_refused_with_the_three_that_work(spelling):
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        check_device(spelling)


@no_cuda
@pytest.mark.parametrize("spelling", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_cuda_device_says_to_use_the_cpu(spelling):
    with pytest.raises(ConfigError, match="CUDA is not available.*--device cpu"):
        check_device(spelling)


def test_a_device_index_beyond_the_machine_names_the_ones_it_has(two_gpus):
    assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\) \(cuda:0 \.\.\. cuda:1\)"):
        check_device("cuda:2")


def test_one_process_keeps_the_device_it_was_given(two_gpus, no_torchrun):
    world, device = init_from_env("cuda:1")
    assert device == "cuda:1" and not world.distributed


def as_torchrun_rank(monkeypatch, rank: int, world_size: int, local_rank: int) -> None:
    """The environment torchrun gives one rank."""
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(name, str(value))


def test_a_torchrun_rank_refuses_an_explicit_index(two_gpus, monkeypatch):
    as_torchrun_rank(monkeypatch, rank=1, world_size=2, local_rank=1)
    with pytest.raises(ConfigError, match="every rank uses cuda:LOCAL_RANK; pass --device cuda"):
        init_from_env("cuda:0")


def test_a_torchrun_rank_beyond_the_nodes_gpus_is_refused(two_gpus, monkeypatch):
    as_torchrun_rank(monkeypatch, rank=2, world_size=3, local_rank=2)
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but this node has 2 CUDA device.*--nproc-per-node 2"):
        init_from_env("cuda")


# each computing command with the least it needs to reach its device check (files that need not exist: the check
# comes first, or after a config that loads without a dataroot)
COMMANDS = {
    "pretrain-backbone": ["--config", "configs/synthetic/student_bevdet.yaml", "--dataroot", "data", "--out", "out"],
    "train-teacher": ["--config", "configs/synthetic/teacher.yaml", "--dataroot", "data", "--out", "out"],
    "extract-teacher": ["--config", "configs/synthetic/teacher.yaml", "--dataroot", "data", "--checkpoint", "t.pth",
                        "--cache", "cache.zarr", "--split", "synth_train"],
    "train-student": ["--config", "configs/synthetic/student_bevdet.yaml", "--out", "out", "--baseline"],
    "evaluate-teacher": ["--config", "configs/synthetic/teacher.yaml", "--checkpoint", "t.pth", "--dataroot", "data",
                         "--version", "v1.0-synthetic", "--split", "synth_val"],
    "demo": ["--out", "out"],
    "ablate": ["--out", "out"],
}


@no_cuda
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_computing_command_takes_cuda_n(command, tmp_path, monkeypatch, no_torchrun):
    """`--device cuda:0` is a device spelling every command accepts: refused here only because there is no CUDA,
    before anything is written."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    argv = [str(repo / arg) if arg.startswith("configs/") else arg for arg in COMMANDS[command]]
    result = CliRunner().invoke(cli, [command, *argv, "--device", "cuda:0"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "--device cuda:0: CUDA is not available" in str(result.exception)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache.zarr").exists()


def test_extract_teacher_workers_with_cuda_point_to_torchrun(two_gpus, no_torchrun, tmp_path):
    result = CliRunner().invoke(cli, ["extract-teacher", "--config", "teacher.yaml", "--dataroot", str(tmp_path),
                                      "--checkpoint", "t.pth", "--cache", str(tmp_path / "cache.zarr"), "--split",
                                      "synth_train", "--device", "cuda", "--workers", "4"])
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert "torchrun --standalone --nproc-per-node 2" in message and "--device cuda" in message
    assert "cuda:LOCAL_RANK" in message and "this node has 2 CUDA device(s)" in message
