"""Spatial cross-attention (SCA): every BEV query reads the camera features around its pillar's projections.

A BEV cell's pillar holds `num_z_anchors` reference points at the cell centre, from z_min + 0.5 m to z_max - 0.5 m
(BEVFormer's linspace(0.5, Z - 0.5) over the z range). The BEV grid is the student's, in the augmented LiDAR frame,
so a point q is taken back to the LiDAR frame by bev_aug^-1, into each camera by camera_to_lidar^-1, onto the
original image by the intrinsics and onto the augmented image by image_aug: the same chain view_transformer.py
walks the other way. Pixel centres sit at integer coordinates, so the image spans [-0.5, W - 0.5] and a pixel u
is at (u + 0.5) / W in grid_sample's [0, 1] (BEVFormer divides u by W, half a pixel off that convention).

A point hits a camera when its depth is > eps and it falls strictly inside the image; a query attends in a
camera when any of its anchors hits it, and its result is the mean over the cameras it attends in (queries that
hit no camera get zero), then one output projection.

Memory: only the queries that hit a camera are sampled in it (each camera's hitting queries are gathered to the
front, padded to the longest camera's count K), which at 928x1600 with a 200x200 BEV still leaves K ~ 10^4 queries
per camera; the bilinear samples of one layer, (B*N*heads, dim, K, levels*points) floats, are then several GB, kept
for the backward pass. `query_chunk` samples at most that many queries per camera at once and `recompute` keeps
only each chunk's inputs in training, recomputing its samples in the backward pass (benchmarks/bevformer_memory.py
measures both). Neither changes what a query computes: the output and the gradients on the query side are those of
the plain path bit for bit on the CPU; the image features' gradient is summed over the chunks in another order
(equal to float tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...geometry.bev import BEVRange
from ...heads.detr.deformable import DeformableAttention, SpatialShapes
from ..view_transformer import CameraGeometry

DEPTH_EPS = 1e-5  # metres; points at or behind the camera plane hit nothing


def pillar_points(bev: BEVRange, num_z_anchors: int, device: torch.device | None = None) -> torch.Tensor:
    """(A, Y*X, 3) metric xyz of every BEV cell's pillar anchors, cells row-major (query q = iy*X + ix)."""
    grid = bev.grid()
    num_y, num_x = grid.shape
    x = grid.x_min + (torch.arange(num_x, dtype=torch.float32, device=device) + 0.5) * grid.resolution
    y = grid.y_min + (torch.arange(num_y, dtype=torch.float32, device=device) + 0.5) * grid.resolution
    z = torch.linspace(bev.z_min + 0.5, bev.z_max - 0.5, num_z_anchors, dtype=torch.float32, device=device)
    cell_y, cell_x = torch.meshgrid(y, x, indexing="ij")  # (Y, X)
    xy = torch.stack([cell_x, cell_y], dim=-1).reshape(1, num_y * num_x, 2).expand(num_z_anchors, -1, -1)
    heights = z.view(num_z_anchors, 1, 1).expand(-1, num_y * num_x, 1)
    return torch.cat([xy, heights], dim=-1)  # (A, Y*X, 3)


def lidar_to_image(geometry: CameraGeometry) -> torch.Tensor:
    """(B, N, 4, 4) float64 lidar2img of the augmented frames: augmented LiDAR point (x, y, z, 1) ->
    (u*d, v*d, d, 1) with (u, v) augmented-image pixels and d the camera depth.

    image_aug @ intrinsics @ camera_to_lidar^-1 @ bev_aug^-1; the third row gives the depth because image_aug is
    affine (resize, crop, flip, rotation: last row (0, 0, 1)).
    """
    batch, cameras = geometry.intrinsics.shape[:2]
    dtype = torch.float64
    lidar_to_camera = torch.linalg.inv(geometry.camera_to_lidar.to(dtype))  # (B, N, 4, 4)
    bev_to_lidar = torch.linalg.inv(geometry.bev_aug.to(dtype))  # (B, 4, 4)
    image = torch.eye(4, dtype=dtype, device=geometry.intrinsics.device).repeat(batch, cameras, 1, 1)
    image[..., :3, :3] = geometry.image_aug.to(dtype) @ geometry.intrinsics.to(dtype)  # (B, N, 3, 3)
    return image @ lidar_to_camera @ bev_to_lidar[:, None]  # (B, N, 4, 4)


@dataclass
class CameraReferencePoints:
    """Where the pillars land in the images.

    locations (B, N, Q, A, 2): (x, y) in [0, 1] of the augmented image (x = (u + 0.5) / W, y = (v + 0.5) / H);
    hits (B, N, Q, A): the anchor lies in front of camera n and inside its image.
    """

    locations: torch.Tensor
    hits: torch.Tensor


def project_pillars(points: torch.Tensor, geometry: CameraGeometry,
                    image_size: tuple[int, int]) -> CameraReferencePoints:
    """points (A, Q, 3) from `pillar_points` (augmented LiDAR frame) -> CameraReferencePoints."""
    height, width = image_size
    matrices = lidar_to_image(geometry)  # (B, N, 4, 4)
    projected = (torch.einsum("bnij,aqj->bnqai", matrices[..., :3, :3], points.to(matrices.dtype))
                 + matrices[:, :, None, None, :3, 3])  # (B, N, Q, A, 3): (u*d, v*d, d)
    depth = projected[..., 2]  # (B, N, Q, A)
    # Clamping keeps points behind the camera finite; the depth test masks them out.
    pixels = projected[..., :2] / depth[..., None].clamp(min=DEPTH_EPS)  # (B, N, Q, A, 2)
    size = torch.tensor([width, height], dtype=matrices.dtype, device=points.device)
    locations = (pixels + 0.5) / size  # (B, N, Q, A, 2)
    hits = (depth > DEPTH_EPS) & (locations > 0.0).all(dim=-1) & (locations < 1.0).all(dim=-1)  # (B, N, Q, A)
    return CameraReferencePoints(locations=locations.to(points.dtype), hits=hits)


class SpatialCrossAttention(nn.Module):
    """BEV queries x multi-camera, multi-level image features; per camera only the queries that hit it attend.

    forward: query (B, Q, C) with the positional embedding added; value (B, N, L, C) image features of every level
    flattened row-major and concatenated (L = sum_l Hl*Wl); reference (CameraReferencePoints) -> (B, Q, C), the
    camera-averaged, projected attention output (the caller adds the residual).
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, query_chunk: int = 0,
                 recompute: bool = False):
        """query_chunk: queries sampled per camera at once (0: all); recompute: recompute the samples in the
        backward pass instead of keeping them (see the module docstring)."""
        super().__init__()
        if query_chunk < 0:
            raise ValueError(f"query_chunk is {query_chunk} (encoder.spatial_query_chunk); give a positive number of "
                             f"queries, or 0 to sample every query at once")
        self.query_chunk = query_chunk
        self.recompute = recompute
        self.attention = DeformableAttention(embed_dims, num_heads, num_levels, num_points, output_projection=False)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, reference: CameraReferencePoints,
                spatial_shapes: SpatialShapes) -> torch.Tensor:
        batch, num_queries, channels = query.shape
        _, cameras, length, _ = value.shape
        num_anchors = reference.locations.shape[3]
        attends = reference.hits.any(dim=-1)  # (B, N, Q)
        counts = attends.sum(dim=-1)  # (B, N)
        slots = query.new_zeros(batch * num_queries, channels)  # (B*Q, C)
        longest = int(counts.max().item()) if counts.numel() else 0
        if longest > 0:
            # Gather each camera's attending queries to the front (stable, so in query order), padded to `longest`.
            order = torch.argsort((~attends).to(torch.int8), dim=-1, stable=True)[..., :longest]  # (B, N, K)
            valid = torch.arange(longest, device=query.device) < counts[..., None]  # (B, N, K)
            gathered = query[:, None].expand(batch, cameras, num_queries, channels).gather(
                2, order[..., None].expand(-1, -1, -1, channels))  # (B, N, K, C)
            locations = reference.locations.gather(
                2, order[..., None, None].expand(-1, -1, -1, num_anchors, 2))  # (B, N, K, A, 2)
            attended = self.attention(gathered.reshape(batch * cameras, longest, channels),
                                      value.reshape(batch * cameras, length, channels),
                                      locations.reshape(batch * cameras, longest, num_anchors, 2),
                                      spatial_shapes, query_chunk=self.query_chunk,
                                      recompute=self.recompute)  # (B*N, K, C)
            attended = attended.view(batch, cameras, longest, channels) * valid[..., None]
            target = order + torch.arange(batch, device=query.device).view(batch, 1, 1) * num_queries  # (B, N, K)
            slots = slots.index_add(0, target.reshape(-1), attended.reshape(-1, channels))
        slots = slots.view(batch, num_queries, channels) / attends.sum(dim=1).clamp(min=1)[..., None]  # (B, Q, C)
        return self.output_proj(slots)
