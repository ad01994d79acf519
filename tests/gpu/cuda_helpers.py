"""What the CUDA tests share (imported as `cuda_helpers`; tests/ has no packages): the skip of a test marked
`cuda` where no CUDA device is visible (applied by conftest.py), the device spellings the tests run with, and a
check that a command really computed on the device.

DISTILLBEV_CUDA_TESTS_ON_CPU=1 runs the tests' bodies on the CPU instead, a check of the tests themselves on a
machine without a GPU; the checks that only mean something on a GPU (the memory counters, nccl, the compute
capability) skip or do nothing there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
import torch

CPU_OVERRIDE = "DISTILLBEV_CUDA_TESTS_ON_CPU"


def bodies_on_cpu() -> bool:
    """Whether the CUDA tests' bodies run on the CPU (DISTILLBEV_CUDA_TESTS_ON_CPU=1)."""
    return os.environ.get(CPU_OVERRIDE) == "1"


NO_CUDA_REASON = (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda}); these tests run on a GPU machine: bash scripts/gpu_check.sh "
                  f"({CPU_OVERRIDE}=1 runs their bodies on the CPU)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available() and not bodies_on_cpu(), reason=NO_CUDA_REASON)


def cuda_devices() -> list[str]:
    """The `--device` spellings the tests run with: `cuda` and `cuda:N` of the last device (`cpu` alone with
    DISTILLBEV_CUDA_TESTS_ON_CPU=1)."""
    if bodies_on_cpu():
        return ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cuda", f"cuda:{max(count - 1, 0)}"]


def on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def device_index(device: str) -> int:
    """The CUDA device index a spelling names (`cuda`: the current device)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


@contextlib.contextmanager
def device_memory_check(device: str):
    """Assert that what runs inside allocated memory on `device` (a command ran its tensors there, not on the CPU);
    nothing is checked on the CPU."""
    if not on_cuda(device):
        yield
        return
    index = device_index(device)
    torch.cuda.synchronize(index)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(index)
    yield
    peak = torch.cuda.max_memory_allocated(index)
    assert peak > 0, f"nothing was allocated on {device}: the command computed elsewhere"


def tiny_student_config(tiny_module, dataroot: Path):
    """The tiny BEVDet at batch 1 (3 steps per epoch), one epoch, one DataLoader worker (the batch crosses a worker
    boundary as in training), KD weights scaled x0.01 like the synthetic configs."""
    cfg = tiny_module.tiny_student_config(dataroot)
    cfg.train = dataclasses.replace(cfg.train, epochs=1, batch_size=1, num_workers=1, warmup_iters=2, lr=1e-3)
    for name in ("foreground_weight", "background_weight", "false_positive_weight", "spatial_l1_weight"):
        setattr(cfg.distill, name, getattr(cfg.distill, name) * 0.01)
    return cfg
