"""Training arithmetic: the autocast dtype of a forward pass and the memory format of the convolutions.

`precision: bf16` runs the model's forward under `torch.autocast` in bfloat16 (convolutions and matmuls in bf16,
reductions and the losses in float32); the DistillBEV adapters have their own setting (`train.adapter_precision`,
float32 by default). The weights, gradients and optimiser state stay float32, so no loss scaling is needed (bf16 has
float32's exponent range). `channels_last` stores 4-d activations NHWC, the layout oneDNN (CPU)
and cuDNN (tensor cores) convolve fastest.

`precision: auto` (the default) is resolved once per run by `resolve_precision`: bf16 where the device computes it
natively (a CPU with AVX512-BF16 or AMX, or ARM's BF16 extension, that oneDNN uses; a CUDA device with native bf16,
Ampere or newer), fp32 elsewhere. The run records the resolved value (RUN/config.yaml, latest.pth, run_info.json).

Measured on this project's machine kind (2 x AMD EPYC with AVX512-BF16, torch 2.13 CPU), one step of the main job's
configs at 2 threads: the teacher 0.96 s (fp32) -> 0.61 s (bf16, channels_last), the BEVDet student 0.35 s -> 0.20 s
(docs/benchmarks.md, "What bf16, channels_last and the allocator tuning buy"). On a CPU without native bf16 the same
setting is much slower than fp32 (`BF16_WITHOUT_NATIVE_COST`), so `auto` picks fp32 there and an explicit `bf16` is
warned about. Evaluation and extraction always run in float32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]  # the arithmetic a training forward runs in
PrecisionSetting = Literal["auto", "fp32", "bf16"]  # what a config asks for (`auto`: resolved per device)

BF16_WITHOUT_NATIVE_COST = (
    "measured on an AVX2-only AMD EPYC, bf16 made a convolution block's forward and backward 5.1x slower than fp32 "
    "(7.0 s against 1.4 s) and the world-1 teacher step took 10.3 s instead of about 1.1 s")

log = logging.getLogger(__name__)


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` computes bfloat16 natively, a sentence saying why).

    CPU: oneDNN must support bf16 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) and the CPU must have the bf16
    instructions (AVX512-BF16 or AMX-BF16 on x86, BF16 / SVE-BF16 on ARM; `torch.cpu.get_capabilities()`): oneDNN
    also reports bf16 on AVX512 CPUs without them, where it emulates the arithmetic. CUDA:
    `torch.cuda.is_bf16_supported(including_emulation=False)`. Other device types: no check, so not native.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, "the CUDA device computes bf16 natively"
        return False, "the CUDA device has no native bf16 (it needs compute capability 8.0, Ampere, or newer)"
    if device.type != "cpu":
        return False, f"no native-bf16 check for {device.type!r} devices"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "the CPU has no native bf16 (oneDNN reports no bf16 support: no AVX512-BF16 or AMX)"
    capabilities = torch.cpu.get_capabilities()
    found = [name for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16") if capabilities.get(name)]
    if not found:
        return False, ("the CPU has no bf16 instructions (no AVX512-BF16, AMX-BF16 or ARM BF16): oneDNN would "
                       "emulate bf16")
    return True, f"the CPU computes bf16 natively ({', '.join(found)})"


def resolve_precision(requested: PrecisionSetting, device: torch.device | str) -> tuple[Precision, str]:
    """(the arithmetic a run trains in, the reason): `auto` -> bf16 where `device` has native bf16
    (`native_bf16`), else fp32; `fp32` and `bf16` as asked."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {requested!r}: expected 'auto', 'fp32' or 'bf16'")
    native, why = native_bf16(device)
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"precision auto -> {'bf16' if native else 'fp32'}: {why}"
    return requested, f"precision {requested} as configured ({why})"


def training_precision(requested: PrecisionSetting, device: torch.device | str, what: str = "training",
                       announce: bool = True) -> Precision:
    """`resolve_precision`, logged once (when `announce`, e.g. on rank 0 only): INFO with the reason, or a WARNING
    with the measured cost when bf16 is asked for explicitly on a device without native bf16."""
    resolved, reason = resolve_precision(requested, device)
    if announce:
        if requested == "bf16" and not native_bf16(device)[0]:
            log.warning("%s: %s; %s: set precision: fp32 or auto", what, reason, BF16_WITHOUT_NATIVE_COST)
        else:
            log.info("%s: %s", what, reason)
    return resolved


def autocast(device: torch.device | str, precision: Precision):
    """The context a training forward runs in: bf16 autocast on `device`'s type, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: expected 'fp32' or 'bf16' (resolve 'auto' with resolve_precision "
                     f"first)")


def set_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """The model with its 4-d parameters in channels_last layout when asked (activations follow the weights)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
