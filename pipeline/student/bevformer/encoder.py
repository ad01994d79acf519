"""BEVFormer's encoder: learned BEV queries (one per Y x X cell) with a learned positional embedding, refined by
L layers of TSA -> norm -> SCA -> norm -> FFN -> norm into the BEV feature (B, C, Y, X) the head and the
distillation read.

Image features of every level get a learned per-camera and per-level embedding before SCA samples them. The
reference's CAN-bus MLP (ego speed, acceleration and pose added to the queries) has no input here: the batch
carries no CAN bus, the ego motion enters only through the previous BEV's alignment.
"""

from __future__ import annotations

import torch
from torch import nn

from ...heads.detr.decoder import FeedForward
from ...heads.detr.deformable import SpatialShapes
from ..view_transformer import CameraGeometry
from .config import BEVFormerConfig
from .spatial_cross_attention import CameraReferencePoints, SpatialCrossAttention, pillar_points, project_pillars
from .temporal_self_attention import TemporalSelfAttention, align_previous_queries, bev_reference_points


class BEVFormerEncoderLayer(nn.Module):
    """TSA -> norm -> SCA -> norm -> FFN -> norm, each attention with dropout and a residual (post-norm)."""

    def __init__(self, config: BEVFormerConfig):
        super().__init__()
        encoder, channels = config.encoder, config.embed_dims
        self.temporal_attention = TemporalSelfAttention(channels, encoder.num_heads, encoder.temporal_points)
        self.spatial_attention = SpatialCrossAttention(channels, encoder.num_heads, encoder.num_levels,
                                                       encoder.spatial_points, encoder.spatial_query_chunk,
                                                       encoder.spatial_recompute)
        self.feed_forward = FeedForward(channels, encoder.feedforward_channels, encoder.dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(channels) for _ in range(3)])
        self.dropout = nn.Dropout(encoder.dropout)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, previous: torch.Tensor | None,
                current: torch.Tensor | None, bev_reference: torch.Tensor, bev_shape: tuple[int, int],
                image_values: torch.Tensor, camera_reference: CameraReferencePoints,
                spatial_shapes: SpatialShapes) -> torch.Tensor:
        """query, query_pos (B, Y*X, C); previous / current (B, Y*X, C) TSA's two frames, or None for the layer
        input twice; bev_reference (B, Y*X, 1, 2); image_values (B, N, L, C) -> (B, Y*X, C)."""
        if previous is None or current is None:
            previous = current = query
        temporal = self.temporal_attention(query, query_pos, previous, current, bev_reference, bev_shape)
        query = self.norms[0](query + self.dropout(temporal))
        spatial = self.spatial_attention(query + query_pos, image_values, camera_reference, spatial_shapes)
        query = self.norms[1](query + self.dropout(spatial))
        return self.norms[2](self.feed_forward(query))


class BEVFormerEncoder(nn.Module):
    """Multi-camera, multi-level image features (+ the previous BEV) -> the BEV feature (B, C, Y, X)."""

    def __init__(self, config: BEVFormerConfig, num_cameras: int):
        super().__init__()
        self.config = config
        channels = config.embed_dims
        self.bev_shape = config.bev.grid().shape  # (Y, X)
        num_y, num_x = self.bev_shape
        self.bev_queries = nn.Embedding(num_y * num_x, channels)
        # LearnedPositionalEncoding: half the channels from the column (x), half from the row (y).
        self.column_embedding = nn.Embedding(num_x, channels // 2)
        self.row_embedding = nn.Embedding(num_y, channels // 2)
        self.camera_embeddings = nn.Parameter(torch.empty(num_cameras, channels))
        self.level_embeddings = nn.Parameter(torch.empty(config.encoder.num_levels, channels))
        nn.init.normal_(self.camera_embeddings)
        nn.init.normal_(self.level_embeddings)
        nn.init.uniform_(self.column_embedding.weight)
        nn.init.uniform_(self.row_embedding.weight)
        self.layers = nn.ModuleList([BEVFormerEncoderLayer(config) for _ in range(config.encoder.num_layers)])

    def positional_embedding(self) -> torch.Tensor:
        """(Y*X, C): [column embedding, row embedding] of every cell, row-major."""
        num_y, num_x = self.bev_shape
        columns = self.column_embedding.weight[None].expand(num_y, num_x, -1)  # (Y, X, C/2)
        rows = self.row_embedding.weight[:, None].expand(num_y, num_x, -1)  # (Y, X, C/2)
        return torch.cat([columns, rows], dim=-1).reshape(num_y * num_x, -1)  # (Y*X, C)

    def flatten_image_features(self, image_features: list[torch.Tensor]) -> tuple[torch.Tensor, SpatialShapes]:
        """L levels of (B, N, C, Hl, Wl) -> value (B, N, sum_l Hl*Wl, C) with camera and level embeddings added,
        and the levels' (Hl, Wl)."""
        if len(image_features) != self.config.encoder.num_levels:
            raise ValueError(f"{len(image_features)} image feature levels given, the encoder is configured for "
                             f"encoder.num_levels = {self.config.encoder.num_levels}")
        values, shapes = [], []
        for level, features in enumerate(image_features):
            batch, cameras, channels, height, width = features.shape
            if channels != self.config.embed_dims or cameras != self.camera_embeddings.shape[0]:
                raise ValueError(f"image features of level {level} are {tuple(features.shape)}; the encoder expects "
                                 f"(B, {self.camera_embeddings.shape[0]}, {self.config.embed_dims}, H, W)")
            flat = features.flatten(3).transpose(2, 3)  # (B, N, Hl*Wl, C)
            values.append(flat + self.camera_embeddings[:, None] + self.level_embeddings[level])
            shapes.append((height, width))
        return torch.cat(values, dim=2), shapes  # (B, N, L, C)

    def forward(self, image_features: list[torch.Tensor], geometry: CameraGeometry, image_size: tuple[int, int],
                previous_bev: torch.Tensor | None = None,
                prev_lidar_to_lidar: torch.Tensor | None = None) -> torch.Tensor:
        """image_features: L levels of (B, N, C, Hl, Wl) from the augmented images of size image_size (H, W);
        previous_bev (B, C, Y, X), this encoder's output for the previous frame (in its own LiDAR frame, under
        the same BEV augmentation), with prev_lidar_to_lidar (B, 4, 4), or both None. Returns (B, C, Y, X)."""
        if (previous_bev is None) != (prev_lidar_to_lidar is None):
            raise ValueError("previous_bev and prev_lidar_to_lidar must be given together (or both left None)")
        image_values, spatial_shapes = self.flatten_image_features(image_features)  # (B, N, L, C)
        batch, device = image_values.shape[0], image_values.device
        num_y, num_x = self.bev_shape
        query = self.bev_queries.weight[None].expand(batch, -1, -1)  # (B, Y*X, C)
        query_pos = self.positional_embedding()[None].expand(batch, -1, -1)  # (B, Y*X, C)
        bev_reference = bev_reference_points(num_y, num_x, batch, device, query.dtype)  # (B, Y*X, 1, 2)
        points = pillar_points(self.config.bev, self.config.encoder.num_z_anchors, device)  # (A, Y*X, 3)
        camera_reference = project_pillars(points, geometry, image_size)
        previous = current = None
        if previous_bev is not None:
            # As the reference: the current frame's TSA value is the initial BEV queries in every layer.
            previous = align_previous_queries(previous_bev, prev_lidar_to_lidar, geometry.bev_aug, self.config.bev)
            current = query
        for layer in self.layers:
            query = layer(query, query_pos, previous, current, bev_reference, self.bev_shape, image_values,
                          camera_reference, spatial_shapes)
        return query.transpose(1, 2).reshape(batch, -1, num_y, num_x)  # (B, C, Y, X)
