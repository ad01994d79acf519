"""Per-channel affine int8 quantisation of one sample-view's feature map.

For channel c with minimum lo and maximum hi over (Y, X): scale = (hi - lo) / 255 and
q = round((x - lo) / scale) - 128 in [-128, 127], so x ~= q * scale + offset with offset = lo + 128 * scale.
The error is at most scale / 2 (plus float32 rounding). A constant channel gets scale 1 and is exact.
"""

from __future__ import annotations

import numpy as np


def quantize_per_channel(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """features (C, Y, X) float -> (q (C, Y, X) int8, scale (C,) float32, offset (C,) float32)."""
    x = np.asarray(features, dtype=np.float32)
    flat = x.reshape(x.shape[0], -1)  # (C, Y*X)
    low = flat.min(axis=1)
    high = flat.max(axis=1)
    scale = ((high - low) / np.float32(255.0)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    steps = np.rint((x - low[:, None, None]) / scale[:, None, None])  # (C, Y, X) in [0, 255]
    q = (np.clip(steps, 0, 255) - 128).astype(np.int8)
    offset = (low + np.float32(128.0) * scale).astype(np.float32)
    return q, scale, offset


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """q (C, Y, X) int8, scale/offset (C,) -> (C, Y, X) float32."""
    return (q.astype(np.float32) * scale.astype(np.float32)[:, None, None]
            + offset.astype(np.float32)[:, None, None])
