"""Process-wide settings every `distillbev` command starts with.

glibc's malloc serves every allocation above its mmap threshold (128 KB, adapting up to 32 MB) with a fresh mmap and
returns it to the kernel on free. A training step allocates and frees hundreds of activation tensors of a few MB, so
each step page-faults its activations in anew: in the main job's teacher, 3.7 million minor page faults and 9 s of
system time per 20 steps. `tune_allocator` keeps freed memory in the process instead (mmap threshold 32 MB, trim
threshold 4 GB, top pad 256 MB): the teacher step went from 0.95 s to 0.66 s on this project's machine kind
(docs/benchmarks.md, "What bf16, channels_last and the allocator tuning buy"). Resident memory then stays near its
peak instead of shrinking between steps. `DISTILLBEV_MALLOC_TUNING=0` turns it off; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 4 * 2**30 - 1, M_TOP_PAD: 256 * 2**20}


def tune_allocator() -> bool:
    """Apply SETTINGS through glibc's mallopt; True when applied (Linux with glibc, not switched off)."""
    if os.environ.get("DISTILLBEV_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return all(libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) == 1
               for parameter, value in SETTINGS.items())
