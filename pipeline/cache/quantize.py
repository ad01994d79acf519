"""Per-channel affine int8 quantisation of one sample-view's feature map, with an optional error budget.

For channel c with minimum lo and maximum hi over (Y, X) the step is

    scale_c = max((hi - lo) / 255, error * rms * sqrt(12))        rms: root mean square of the whole (C, Y, X) map

and q = round((x - lo) / scale_c) - 128 in [-128, 127], so x ~= q * scale_c + offset_c with
offset_c = lo + 128 * scale_c. Every value is within scale_c / 2 of its original (plus float32 rounding); the
channel minimum (0 after a ReLU) is exact. A constant channel gets scale 1 and is exact.

error = 0 gives the plain range/255 steps (schema 2's int8 before the codec study). error > 0 is the cache's
rate control: a uniform rounding error of step s has RMS s / sqrt(12), so channels whose range/255 step is finer
than the budget are coarsened to a step whose rounding error has RMS `error * rms`. Since the cosine between a map
and its copy is about 1 - (RMS error / RMS)^2 / 2, error 0.03 bounds 1 - cosine near 4.5e-4 (less in practice: the
ReLU zeros stay exact). Coarser steps use fewer of the 256 levels, which zstd then stores in fewer bytes;
`benchmarks/codecs.py` measures the trade.

`QuantizedFeatures` carries the stored form (int8 values with their per-channel scale and offset) from a DataLoader
worker to the training device, where `dequantize` makes the float32 map: a quarter of the bytes through shared
memory and over the host-to-device copy, and the same float32 values as `dequantize_per_channel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SQRT12 = float(np.sqrt(12.0))


def error_step(features: np.ndarray, error: float) -> float:
    """The step whose uniform rounding error has RMS `error` x the RMS of `features` (0 when error is 0)."""
    if error <= 0:
        return 0.0
    flat = np.asarray(features, dtype=np.float32).reshape(features.shape[0], -1)
    # per-channel sums of squares without a full-size temporary, accumulated over channels in float64
    total = float(np.einsum("ij,ij->i", flat, flat).sum(dtype=np.float64))
    return error * float(np.sqrt(total / max(flat.size, 1))) * SQRT12


def quantize_per_channel(features: np.ndarray, error: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """features (C, Y, X) float -> (q (C, Y, X) int8, scale (C,) float32, offset (C,) float32).

    error: RMS error budget as a fraction of the map's RMS (0: steps of range / 255 only).
    """
    x = np.asarray(features, dtype=np.float32)
    flat = x.reshape(x.shape[0], -1)  # (C, Y*X)
    low = flat.min(axis=1)
    high = flat.max(axis=1)
    scale = np.maximum((high - low) / np.float32(255.0), np.float32(error_step(x, error))).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    steps = np.subtract(x, low[:, None, None])  # (C, Y, X), then in place: in [0, 255] after the clip
    np.divide(steps, scale[:, None, None], out=steps)
    np.rint(steps, out=steps)
    np.clip(steps, 0, 255, out=steps)
    steps -= 128
    q = steps.astype(np.int8)
    offset = (low + np.float32(128.0) * scale).astype(np.float32)
    return q, scale, offset


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """q (C, Y, X) int8, scale/offset (C,) -> (C, Y, X) float32 (one new array, scaled and shifted in place)."""
    out = q.astype(np.float32)
    out *= scale.astype(np.float32)[:, None, None]
    out += offset.astype(np.float32)[:, None, None]
    return out


@dataclass
class QuantizedFeatures:
    """Feature maps in their stored int8 form: x = values * scale + offset, per channel.

    values: (..., C, Y, X) int8; scale, offset: (..., C) float32. The leading axes are none for one sample-view and
    (B,) for a batch.
    """

    values: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def from_numpy(cls, values: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> "QuantizedFeatures":
        """One sample-view's decoded chunks: values (C, Y, X) int8, scale and offset (C,)."""
        return cls(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int8)),
                   torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
                   torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32)))

    def dequantize(self) -> torch.Tensor:
        """(..., C, Y, X) float32 on the values' device. Multiply, then add, each rounded to float32, as
        `dequantize_per_channel` does: the same values on any device (no fused multiply-add)."""
        out = self.values.to(torch.float32)
        out.mul_(self.scale.to(torch.float32)[..., None, None])
        out.add_(self.offset.to(torch.float32)[..., None, None])
        return out

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "QuantizedFeatures":
        return QuantizedFeatures(self.values.to(device, non_blocking=non_blocking),
                                 self.scale.to(device, non_blocking=non_blocking),
                                 self.offset.to(device, non_blocking=non_blocking))

    @staticmethod
    def stack(items: list["QuantizedFeatures"]) -> "QuantizedFeatures":
        """One batch (B, C, Y, X) / (B, C) of sample-views (C, Y, X) / (C,)."""
        return QuantizedFeatures(torch.stack([item.values for item in items]),
                                 torch.stack([item.scale for item in items]),
                                 torch.stack([item.offset for item in items]))

    @property
    def shape(self) -> torch.Size:
        """The shape of the float map it stands for (the values' shape)."""
        return self.values.shape


def dequantized(features: torch.Tensor | QuantizedFeatures) -> torch.Tensor:
    """A float map as is, a quantised one dequantised (float32)."""
    return features.dequantize() if isinstance(features, QuantizedFeatures) else features
