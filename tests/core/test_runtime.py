"""The allocator settings every command starts with (pipeline/runtime.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from distillbev.pipeline.runtime import tune_allocator

# 20 rounds of a training step's pattern: 8 live blocks of 8 MB, written, then all freed; print the minor page faults
# of the loop. By default glibc hands such blocks back to the kernel (by munmap, or by trimming the top of its heap
# while its adaptive thresholds settle), and a round that gets them back faults 16384 pages in again: measured
# 81,831 faults (five such rounds) against 4,107 tuned, where the heap keeps them after the first round.
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from distillbev.pipeline.runtime import tune_allocator
    assert tune_allocator()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    blocks = [np.ones(2**20) for _ in range(8)]  # 8 x 8 MB of float64, written
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            env=dict(os.environ, DISTILLBEV_MALLOC_TUNING="1"))
    return int(result.stdout.strip())


@glibc
def test_tuned_allocator_reuses_freed_blocks_instead_of_faulting_them_in_again():
    untuned, tuned = page_faults("default"), page_faults("tuned")
    assert untuned >= 4 * 16384  # several rounds fault their 64 MB in again
    assert tuned < untuned / 10


@glibc
def test_tuning_is_applied_unless_switched_off(monkeypatch):
    monkeypatch.setenv("DISTILLBEV_MALLOC_TUNING", "0")
    assert tune_allocator() is False
    monkeypatch.setenv("DISTILLBEV_MALLOC_TUNING", "1")
    assert tune_allocator() is True
