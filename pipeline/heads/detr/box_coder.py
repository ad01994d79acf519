"""BEVFormer's box parametrisation: boxes (..., 9) = (x, y, z, l, w, h, yaw, vx, vy) <-> codes (..., 10) =
(cx, cy, log l, log w, cz, log h, sin yaw, cos yaw, vx, vy).

Centres stay in metres (the head maps its sigmoid outputs onto the BEV range before the loss); sizes are logs.
The reference's normalize_bbox keeps the box tensor's order, (cx, cy, log dim0, log dim1, cz, ...): with this
project's (l, w, h) order the codes hold log l before log w.
"""

from __future__ import annotations

import torch

CODE_SIZE = 10


def encode_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 9) boxes -> (..., 10) codes. Zero sizes give -inf codes (the loss skips such rows)."""
    x, y, z = boxes[..., 0:1], boxes[..., 1:2], boxes[..., 2:3]
    sizes = boxes[..., 3:6].log()  # (..., 3) log l, log w, log h
    yaw = boxes[..., 6:7]
    return torch.cat([x, y, sizes[..., 0:2], z, sizes[..., 2:3], yaw.sin(), yaw.cos(), boxes[..., 7:9]], dim=-1)


def decode_boxes(codes: torch.Tensor) -> torch.Tensor:
    """(..., 10) codes -> (..., 9) boxes, yaw = atan2(sin, cos)."""
    yaw = torch.atan2(codes[..., 6:7], codes[..., 7:8])
    sizes = torch.cat([codes[..., 2:4], codes[..., 5:6]], dim=-1).exp()  # (..., 3) l, w, h
    return torch.cat([codes[..., 0:2], codes[..., 4:5], sizes, yaw, codes[..., 8:10]], dim=-1)
