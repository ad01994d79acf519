"""DETR-style decoder over the BEV: object queries go through self-attention -> norm -> deformable
cross-attention on the BEV -> norm -> FFN -> norm, and after every layer the layer's box branch refines the
queries' reference points (with_box_refine).

Reference points are (x, y, z) in [0, 1] of the BEV range (sigmoid space); the cross-attention samples the BEV at
their (x, y). A layer's box branch predicts a centre in inverse-sigmoid space relative to the reference points it
was given; the refined points are detached before the next layer, as in Deformable DETR.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DETRHeadSpec
from .deformable import DeformableAttention

SIGMOID_EPS = 1e-5


def inverse_sigmoid(x: torch.Tensor, eps: float = SIGMOID_EPS) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped into [0, 1] and both terms kept >= eps."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_reference_points(box_codes: torch.Tensor, reference_points: torch.Tensor) -> torch.Tensor:
    """box_codes (B, K, 10) raw branch output (centre codes relative to the references in inverse-sigmoid space),
    reference_points (B, K, 3) in [0, 1] -> the refined reference points (B, K, 3) in [0, 1]."""
    offsets = torch.cat([box_codes[..., 0:2], box_codes[..., 4:5]], dim=-1)  # (B, K, 3): cx, cy, cz
    return (offsets + inverse_sigmoid(reference_points)).sigmoid()


class FeedForward(nn.Module):
    """x + Linear -> ReLU -> Dropout -> Linear -> Dropout (mmcv's FFN with its identity connection): (..., C)."""

    def __init__(self, embed_dims: int, hidden_channels: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(embed_dims, hidden_channels), nn.ReLU(inplace=True),
                                    nn.Dropout(dropout), nn.Linear(hidden_channels, embed_dims), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class DecoderLayer(nn.Module):
    """Self-attention -> norm -> BEV deformable cross-attention -> norm -> FFN -> norm (post-norm, residuals)."""

    def __init__(self, config: DETRHeadSpec):
        super().__init__()
        head, channels = config.head, config.embed_dims
        self.self_attention = nn.MultiheadAttention(channels, head.num_heads, dropout=head.dropout, batch_first=True)
        self.cross_attention = DeformableAttention(channels, head.num_heads, num_levels=1, num_points=head.num_points)
        self.feed_forward = FeedForward(channels, head.feedforward_channels, head.dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(channels) for _ in range(3)])
        self.dropout = nn.Dropout(head.dropout)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, bev: torch.Tensor, bev_shape: tuple[int, int],
                reference_points: torch.Tensor) -> torch.Tensor:
        """query, query_pos (B, K, C); bev (B, Y*X, C); reference_points (B, K, 3) in [0, 1] -> (B, K, C)."""
        positioned = query + query_pos
        attended, _ = self.self_attention(positioned, positioned, query, need_weights=False)
        query = self.norms[0](query + self.dropout(attended))
        cross = self.cross_attention(query + query_pos, bev, reference_points[..., None, :2], [bev_shape])
        query = self.norms[1](query + self.dropout(cross))
        return self.norms[2](self.feed_forward(query))


class DetectionDecoder(nn.Module):
    """The decoder layers; the head passes its per-layer box branches for the reference-point refinement."""

    def __init__(self, config: DETRHeadSpec):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.head.num_layers)])

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, bev: torch.Tensor, bev_shape: tuple[int, int],
                reference_points: torch.Tensor,
                box_branches: nn.ModuleList) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """query, query_pos (B, K, C); bev (B, Y*X, C); reference_points (B, K, 3) in [0, 1].

        Returns every layer's output states (B, K, C) and the reference points (B, K, 3) each layer's states were
        computed with (the box branches predict relative to them).
        """
        states, references = [], []
        for layer, box_branch in zip(self.layers, box_branches):
            query = layer(query, query_pos, bev, bev_shape, reference_points)
            states.append(query)
            references.append(reference_points)
            reference_points = refine_reference_points(box_branch(query), reference_points).detach()
        return states, references
