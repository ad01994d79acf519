"""Training arithmetic: the autocast dtype of a forward pass and the memory format of the convolutions.

`precision: bf16` runs the model's forward under `torch.autocast` in bfloat16 (convolutions and matmuls in bf16,
reductions and the losses in float32); the DistillBEV adapters have their own setting (`train.adapter_precision`,
float32 by default). The weights, gradients and optimiser state stay float32, so no loss scaling is needed (bf16 has
float32's exponent range). `channels_last` stores 4-d activations NHWC, the layout oneDNN (CPU)
and cuDNN (tensor cores) convolve fastest.

Measured on this project's machine kind (2 x AMD EPYC with AVX512-BF16, torch 2.13 CPU), one step of the main job's
configs at 2 threads: the teacher 0.96 s (fp32) -> 0.61 s (bf16, channels_last), the BEVDet student 0.35 s -> 0.20 s
(docs/benchmarks.md, "The main job's time"). On a CPU without native bf16 the same setting is slower than fp32;
keep `fp32` there. Evaluation and extraction always run in float32.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]


def autocast(device: torch.device | str, precision: Precision):
    """The context a training forward runs in: bf16 autocast on `device`'s type, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: expected 'fp32' or 'bf16'")


def set_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """The model with its 4-d parameters in channels_last layout when asked (activations follow the weights)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
