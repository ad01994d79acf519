"""`approximate` targets: warp the identity view's cached BEV maps into a new BEV augmentation.

The teacher run on an augmented cloud is not the same as the augmented teacher map (pillarisation, receptive
fields and learned orientation preferences differ), so this is an approximation; `benchmarks/train.py` and the
tests measure its gap against the teacher run on the augmented cloud.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry.bev import BEVAugmentation


def warp_bev(maps: torch.Tensor, augmentation: BEVAugmentation,
             extent: tuple[float, float, float, float], mode: str = "bilinear") -> torch.Tensor:
    """Resample identity-view maps (..., Y, X) into the frame of `augmentation`.

    `extent` = (x_min, x_max, y_min, y_max) of the maps. Each output cell centre p' is mapped back to
    p = M^-1 p' (M the augmentation matrix) and the input is sampled there; cells that fall outside are zero.
    Pure flips (no rotation, unit scale) are exact index reversals.
    """
    if augmentation.rotation == 0.0 and augmentation.scale == 1.0:
        out = maps
        if augmentation.flip_x:  # y -> -y reverses the row order (symmetric extent)
            out = out.flip(-2)
        if augmentation.flip_y:  # x -> -x reverses the column order
            out = out.flip(-1)
        if extent[0] != -extent[1] or extent[2] != -extent[3]:
            raise ValueError(f"flip by index reversal needs an extent symmetric about the origin, got {extent}")
        return out
    x_min, x_max, y_min, y_max = extent
    *lead, num_y, num_x = maps.shape
    flat = maps.reshape(1, -1, num_y, num_x)  # (1, C', Y, X): every map shares one sampling grid
    dtype, device = torch.float32, maps.device
    inverse = torch.linalg.inv(torch.as_tensor(augmentation.matrix()[:2, :2], dtype=torch.float64)).to(dtype)
    res_x = (x_max - x_min) / num_x
    res_y = (y_max - y_min) / num_y
    xs = x_min + (torch.arange(num_x, device=device, dtype=dtype) + 0.5) * res_x
    ys = y_min + (torch.arange(num_y, device=device, dtype=dtype) + 0.5) * res_y
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (Y, X) metric centres of the output cells
    out_xy = torch.stack([grid_x, grid_y], dim=-1)  # (Y, X, 2)
    src_xy = out_xy @ inverse.to(device).T  # (Y, X, 2) where each output cell comes from
    # normalised coordinates for grid_sample (align_corners=False: -1 / +1 are the outer cell edges)
    norm_x = (src_xy[..., 0] - x_min) / (x_max - x_min) * 2 - 1
    norm_y = (src_xy[..., 1] - y_min) / (y_max - y_min) * 2 - 1
    grid = torch.stack([norm_x, norm_y], dim=-1).unsqueeze(0)  # (1, Y, X, 2)
    sampled = F.grid_sample(flat.to(dtype), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return sampled.reshape(*lead, num_y, num_x).to(maps.dtype)
