"""Temporal self-attention (TSA): the BEV queries attend, with deformable attention, to two BEV frames: the
previous frame's BEV aligned to the current frame, and the current BEV queries.

The previous BEV is resampled onto the current grid by the ego motion (the rigid previous -> current LiDAR
transform, under the shared BEV augmentation) with BEVDet4D's warp, so both frames use the same reference point,
the query's own cell centre. (BEVFormer rotates the previous BEV about the ego and shifts the previous frame's
reference points by the translation instead; the full warp does both at once.) Sampling offsets and attention
weights are predicted from the concatenation [previous frame's feature at the query, query] (2C channels); each
frame gets its own softmax over points, and the two frames' results are averaged. Without a previous frame the
current queries stand in for it (the first frame attends to itself).
"""

from __future__ import annotations

import torch
from torch import nn

from ...geometry.bev import BEVRange
from ...heads.detr.deformable import deformable_sample, init_sampling_offsets, sampling_locations
from ..temporal import align_previous_bev

NUM_FRAMES = 2  # [aligned previous, current]


def align_previous_queries(previous: torch.Tensor, prev_lidar_to_lidar: torch.Tensor, bev_aug: torch.Tensor,
                           bev: BEVRange) -> torch.Tensor:
    """The previous BEV (B, C, Y, X), built in the previous LiDAR frame, resampled onto the current grid and laid
    out as queries (B, Y*X, C); cells that fall outside the previous grid are zero.

    prev_lidar_to_lidar (B, 4, 4) previous LiDAR -> current LiDAR; bev_aug (B, 4, 4) LiDAR -> augmented LiDAR.
    """
    aligned = align_previous_bev(previous, prev_lidar_to_lidar, bev_aug, bev)  # (B, C, Y, X)
    return aligned.flatten(2).transpose(1, 2)  # (B, Y*X, C)


def bev_reference_points(num_y: int, num_x: int, batch: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, Y*X, 1, 2) every BEV cell's centre as (x, y) in [0, 1] of the BEV map (query q = iy*X + ix)."""
    x = (torch.arange(num_x, dtype=dtype, device=device) + 0.5) / num_x
    y = (torch.arange(num_y, dtype=dtype, device=device) + 0.5) / num_y
    cell_y, cell_x = torch.meshgrid(y, x, indexing="ij")  # (Y, X)
    points = torch.stack([cell_x, cell_y], dim=-1).reshape(1, num_y * num_x, 1, 2)
    return points.expand(batch, -1, -1, -1)


class TemporalSelfAttention(nn.Module):
    """Deformable attention of the BEV queries over [aligned previous BEV, current BEV].

    forward: query (B, Q, C) (the layer input), query_pos (B, Q, C), previous (B, Q, C) aligned previous BEV,
    current (B, Q, C) the current frame's value, reference_points (B, Q, 1, 2), bev_shape (Y, X) with Q = Y*X
    -> (B, Q, C), the projected attention output (the caller adds the residual).
    """

    def __init__(self, embed_dims: int, num_heads: int, num_points: int):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(NUM_FRAMES * embed_dims, NUM_FRAMES * num_heads * num_points * 2)
        self.attention_weights = nn.Linear(NUM_FRAMES * embed_dims, NUM_FRAMES * num_heads * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        # The offsets' layout is (heads, frames, points, 2): each frame starts with the same ray pattern.
        init_sampling_offsets(self.sampling_offsets, num_heads, NUM_FRAMES, num_points)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, previous: torch.Tensor, current: torch.Tensor,
                reference_points: torch.Tensor, bev_shape: tuple[int, int]) -> torch.Tensor:
        batch, num_queries, channels = query.shape
        if num_queries != bev_shape[0] * bev_shape[1]:
            raise ValueError(f"{num_queries} BEV queries do not fill the {bev_shape} BEV map")
        heads, points = self.num_heads, self.num_points
        steering = torch.cat([previous, query + query_pos], dim=-1)  # (B, Q, 2C)
        values = self.value_proj(torch.stack([previous, current], dim=1))  # (B, 2, Q, C)
        values = values.reshape(batch * NUM_FRAMES, num_queries, heads, channels // heads)  # (B*2, Q, heads, dim)
        offsets = self.sampling_offsets(steering).view(batch, num_queries, heads, NUM_FRAMES, 1, points, 2)
        weights = self.attention_weights(steering).view(batch, num_queries, heads, NUM_FRAMES, points).softmax(-1)
        # Frames become batch entries: (B, Q, heads, 2, ...) -> (B*2, Q, heads, ...), frame index fastest in B*2.
        offsets = offsets.permute(0, 3, 1, 2, 4, 5, 6).reshape(batch * NUM_FRAMES, num_queries, heads, 1, points, 2)
        weights = weights.permute(0, 3, 1, 2, 4).reshape(batch * NUM_FRAMES, num_queries, heads, 1, points)
        references = reference_points.repeat_interleave(NUM_FRAMES, dim=0)  # (B*2, Q, 1, 2)
        locations = sampling_locations(references, offsets, [bev_shape])  # (B*2, Q, heads, 1, points, 2)
        output = deformable_sample(values, [bev_shape], locations, weights)  # (B*2, Q, C)
        output = output.view(batch, NUM_FRAMES, num_queries, channels).mean(dim=1)  # (B, Q, C)
        return self.output_proj(output)
