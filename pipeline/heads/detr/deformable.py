"""Multi-scale deformable attention (Deformable DETR) on `torch.nn.functional.grid_sample`.

Every query, per head, samples `num_points` locations on each of `num_levels` value maps around its reference
point(s) and sums the bilinear samples with softmax weights (softmax over levels x points). Locations are
normalised per level to [0, 1] with 0 and 1 on the outer edges of the map's first and last cells (grid_sample's
align_corners=False), so one location addresses the same place on every level whatever its resolution. Samples
outside the map read zeros.

The bilinear samples are the memory: (B*heads, dim, Q, levels*points) floats, kept for the backward pass. With many
queries (BEVFormer's spatial cross-attention: about 10^4 queries per camera, 6 cameras, 4 levels x 8 points at 256
channels, several GB per layer) `chunked_sample_levels` samples the queries in chunks and can recompute each chunk's
samples in the backward pass instead of keeping them. The projections still run on all queries at once, so every
query's forward value and the gradients reaching the query are those of the plain path bit for bit on the CPU; only
the value's gradient (and through it the value projection's) is summed over the chunks in another order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

SpatialShapes = list[tuple[int, int]]  # (Hl, Wl) of every value level, in the order the value is concatenated


def level_maps(value: torch.Tensor, spatial_shapes: SpatialShapes) -> list[torch.Tensor]:
    """value (B, sum_l Hl*Wl, heads, dim), the levels flattened row-major and concatenated -> one
    (B*heads, dim, Hl, Wl) map per level, the layout grid_sample reads (a copy of the value)."""
    batch, length, num_heads, head_dims = value.shape
    expected = sum(height * width for height, width in spatial_shapes)
    if length != expected:
        raise ValueError(f"value has {length} entries, the spatial shapes {spatial_shapes} need {expected}")
    per_level = value.split([height * width for height, width in spatial_shapes], dim=1)
    maps = []
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = per_level[level].flatten(2).transpose(1, 2)  # (B, heads*dim, Hl*Wl)
        maps.append(level_value.reshape(batch * num_heads, head_dims, height, width))  # (B*heads, dim, Hl, Wl)
    return maps


def sample_levels(maps: list[torch.Tensor], sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> torch.Tensor:
    """The attention on `level_maps`' maps (B*heads, dim, Hl, Wl).

    sampling_locations (B, Q, heads, levels, points, 2) as (x, y) in [0, 1] of each level;
    attention_weights (B, Q, heads, levels, points), already normalised. Returns (B, Q, heads*dim).
    """
    batch, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    if len(maps) != num_levels:
        raise ValueError(f"{len(maps)} spatial shapes for {num_levels} sampling levels")
    head_dims = maps[0].shape[1]
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1]
    samples = []
    for level, level_value in enumerate(maps):
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*heads, Q, points, 2)
        samples.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (B*heads, dim, Q, points)
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B*heads, dim, Q, levels*points)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries,
                                                        num_levels * num_points)  # (B*heads, 1, Q, levels*points)
    output = (stacked * weights).sum(-1)  # (B*heads, dim, Q)
    return output.view(batch, num_heads * head_dims, num_queries).transpose(1, 2).contiguous()  # (B, Q, heads*dim)


def deformable_sample(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                      attention_weights: torch.Tensor) -> torch.Tensor:
    """The attention itself, without projections.

    value (B, sum_l Hl*Wl, heads, dim): the levels' maps flattened row-major and concatenated;
    sampling_locations (B, Q, heads, levels, points, 2) as (x, y) in [0, 1] of each level;
    attention_weights (B, Q, heads, levels, points), already normalised.
    Returns (B, Q, heads*dim).
    """
    num_levels = sampling_locations.shape[3]
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} sampling levels")
    return sample_levels(level_maps(value, spatial_shapes), sampling_locations, attention_weights)


def chunked_sample_levels(maps: list[torch.Tensor], sampling_locations: torch.Tensor,
                          attention_weights: torch.Tensor, query_chunk: int = 0,
                          recompute: bool = False) -> torch.Tensor:
    """`sample_levels` over at most `query_chunk` queries at a time (0: all at once), same shapes. With `recompute`
    (and gradients being recorded) each chunk keeps only its inputs and recomputes its samples in the backward
    pass, so a chunk's samples are the only ones alive at any time."""
    if query_chunk < 0:
        raise ValueError(f"query_chunk is {query_chunk}; give a positive number of queries, or 0 for all at once")
    num_queries = sampling_locations.shape[1]
    chunk = query_chunk if query_chunk > 0 else max(num_queries, 1)
    recompute = recompute and torch.is_grad_enabled()
    pieces = []
    for start in range(0, num_queries, chunk) or [0]:
        locations = sampling_locations[:, start:start + chunk]
        weights = attention_weights[:, start:start + chunk]
        if recompute:
            # Nothing random inside, so the RNG state need not be replayed.
            pieces.append(checkpoint(sample_levels, maps, locations, weights, use_reentrant=False,
                                     preserve_rng_state=False))
        else:
            pieces.append(sample_levels(maps, locations, weights))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # (B, Q, heads*dim)


def sampling_locations(reference_points: torch.Tensor, offsets: torch.Tensor,
                       spatial_shapes: SpatialShapes) -> torch.Tensor:
    """Reference points plus offsets measured in cells of each level.

    reference_points (B, Q, A, 2) in [0, 1]: A anchors per query (a pillar's z anchors in SCA, A = 1 elsewhere),
    shared by every level; offsets (B, Q, heads, levels, points, 2) in cells, with the points dealt out to the
    anchors as (points / A, A) (anchor index fastest, as the reference's MSDeformableAttention3D).
    Returns (B, Q, heads, levels, points, 2).
    """
    batch, num_queries, num_anchors, _ = reference_points.shape
    _, _, num_heads, num_levels, num_points, _ = offsets.shape
    if num_points % num_anchors:
        raise ValueError(f"{num_points} sampling points cannot be shared out evenly over {num_anchors} anchors")
    # (x, y) cells -> normalised: divide by (Wl, Hl).
    normaliser = torch.tensor([[width, height] for height, width in spatial_shapes], dtype=offsets.dtype,
                              device=offsets.device)  # (levels, 2)
    offsets = offsets / normaliser[None, None, None, :, None, :]
    offsets = offsets.view(batch, num_queries, num_heads, num_levels, num_points // num_anchors, num_anchors, 2)
    locations = reference_points[:, :, None, None, None, :, :] + offsets  # (B, Q, heads, levels, P/A, A, 2)
    return locations.reshape(batch, num_queries, num_heads, num_levels, num_points, 2)


def init_sampling_offsets(linear: nn.Linear, num_heads: int, num_groups: int, num_points: int) -> None:
    """Deformable DETR's start: zero weights, and biases that put head h's points on a ray at angle 2*pi*h/heads,
    point p at distance p + 1 (in the max-norm), the same for every group (level, or frame x level)."""
    nn.init.zeros_(linear.weight)
    angles = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (heads, 2)
    directions = directions / directions.abs().max(dim=-1, keepdim=True).values
    steps = torch.arange(1, num_points + 1, dtype=torch.float32)  # (points,)
    bias = directions[:, None, None, :] * steps[None, None, :, None]  # (heads, 1, points, 2)
    bias = bias.expand(num_heads, num_groups, num_points, 2)
    with torch.no_grad():
        linear.bias.copy_(bias.reshape(-1))


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention with its projections (value, sampling offsets, attention weights, and an
    optional output projection; SCA projects once after averaging over the cameras instead).

    forward: query (B, Q, C) (positional embedding already added), value (B, L, C) with L = sum_l Hl*Wl,
    reference_points (B, Q, A, 2) in [0, 1] -> (B, Q, C).
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int,
                 output_projection: bool = True):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims) if output_projection else None
        init_sampling_offsets(self.sampling_offsets, num_heads, num_levels, num_points)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: SpatialShapes, query_chunk: int = 0, recompute: bool = False) -> torch.Tensor:
        """query_chunk and recompute bound the sampling's memory (`chunked_sample_levels`); the defaults sample
        every query at once and keep the samples for the backward pass."""
        batch, num_queries, _ = query.shape
        expected = sum(height * width for height, width in spatial_shapes)
        if value.shape[1] != expected:
            raise ValueError(f"value has {value.shape[1]} entries, the spatial shapes {spatial_shapes} need {expected}")
        value = self.value_proj(value).view(batch, expected, self.num_heads, -1)  # (B, L, heads, dim)
        offsets = self.sampling_offsets(query).view(batch, num_queries, self.num_heads, self.num_levels,
                                                    self.num_points, 2)  # (B, Q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.num_heads,
                                                     self.num_levels * self.num_points).softmax(-1)
        weights = weights.view(batch, num_queries, self.num_heads, self.num_levels,
                               self.num_points)  # (B, Q, heads, levels, points)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        output = chunked_sample_levels(level_maps(value, spatial_shapes), locations, weights, query_chunk,
                                       recompute)  # (B, Q, C)
        return output if self.output_proj is None else self.output_proj(output)
