"""Temporal self-attention: the previous BEV aligned by a known ego motion, and the two-frame attention at rest."""

from __future__ import annotations

import torch

from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVRange
from distillbev.pipeline.student.bevformer.temporal_self_attention import (TemporalSelfAttention,
                                                                           align_previous_queries,
                                                                           bev_reference_points)

BEV = BEVRange(x_min=-8.0, x_max=8.0, y_min=-6.0, y_max=6.0, resolution=2.0)  # Y=6, X=8


def ego_moved_forward(metres: float) -> torch.Tensor:
    """(1, 4, 4) previous LiDAR -> current LiDAR after the ego drove `metres` along +x: static points move back."""
    transform = torch.eye(4)
    transform[0, 3] = -metres
    return transform[None]


def test_previous_bev_shifted_by_whole_cells_comes_back_aligned():
    previous = torch.randn(1, 3, 6, 8)  # (B, C, Y, X)
    aligned = align_previous_queries(previous, ego_moved_forward(2 * BEV.resolution), torch.eye(4)[None], BEV)
    aligned = aligned.transpose(1, 2).reshape(1, 3, 6, 8)
    # current column ix shows what the previous frame held two cells further ahead; the last two columns are new
    assert torch.allclose(aligned[..., :6], previous[..., 2:], atol=1e-5)
    assert torch.all(aligned[..., 6:] == 0)


def test_alignment_follows_the_bev_augmentation():
    # Under a flip of x (BEVDet's flip_y) the augmented map shows the scene mirrored, so the same forward motion
    # moves the content the other way: current column ix shows previous column ix - 2.
    previous = torch.randn(1, 3, 6, 8)
    flip = torch.tensor(BEVAugmentation(flip_y=True).matrix(), dtype=torch.float32)[None]
    aligned = align_previous_queries(previous, ego_moved_forward(2 * BEV.resolution), flip, BEV)
    aligned = aligned.transpose(1, 2).reshape(1, 3, 6, 8)
    assert torch.allclose(aligned[..., 2:], previous[..., :6], atol=1e-5)
    assert torch.all(aligned[..., :2] == 0)


def test_reference_points_are_cell_centres_row_major():
    points = bev_reference_points(num_y=2, num_x=4, batch=1)
    assert points.shape == (1, 8, 1, 2)
    assert torch.allclose(points[0, 5, 0], torch.tensor([1.5 / 4, 1.5 / 2]))  # query 5 = row 1, column 1


def test_zero_offsets_average_both_frames_at_the_query_cell():
    # With zero offsets every point samples the query's own cell in both frames, so the output is
    # output_proj(value_proj(mean of the two frames' features at that cell)).
    torch.manual_seed(0)
    module = TemporalSelfAttention(embed_dims=4, num_heads=2, num_points=3)
    with torch.no_grad():
        module.sampling_offsets.bias.zero_()
        module.attention_weights.weight.normal_()  # any weights: each frame's softmax still sums to one
    num_y, num_x = 3, 4
    query, query_pos = torch.randn(2, 12, 4), torch.randn(2, 12, 4)
    previous, current = torch.randn(2, 12, 4), torch.randn(2, 12, 4)
    output = module(query, query_pos, previous, current, bev_reference_points(num_y, num_x, 2), (num_y, num_x))
    expected = module.output_proj(module.value_proj((previous + current) / 2))
    assert torch.allclose(output, expected, atol=1e-5)
