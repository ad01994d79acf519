"""Our grid_sample deformable attention against mmcv 2.1.0's own `multi_scale_deformable_attn_pytorch` and its
MultiScaleDeformableAttention module with the same weights (max abs difference <= 1e-5).

Runs only where mmcv imports (the .venv-mmdet3d of `make venv-mmdet3d`):
    .venv-mmdet3d/bin/python -m pytest -m mmdet3d tests/student/test_bevformer_deformable_mmcv.py -q
"""

from __future__ import annotations

import pytest
import torch

mmcv_ops = pytest.importorskip("mmcv.ops.multi_scale_deform_attn",
                               reason="mmcv is not installed; build the optional venv with `make venv-mmdet3d`")

from distillbev.pipeline.heads.detr.deformable import DeformableAttention, deformable_sample  # noqa: E402

pytestmark = pytest.mark.mmdet3d

SHAPES = [(4, 5), (2, 3), (1, 2)]


def test_sampling_matches_mmcv_pytorch_reference():
    generator = torch.Generator().manual_seed(0)
    batch, queries, heads, dims, points = 2, 7, 2, 3, 4
    length = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, length, heads, dims, generator=generator)
    # some locations beyond the map's edges, where both read zeros
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.randn(batch, queries, heads, len(SHAPES) * points, generator=generator).softmax(-1)
    weights = weights.view(batch, queries, heads, len(SHAPES), points)
    ours = deformable_sample(value, SHAPES, locations, weights)
    theirs = mmcv_ops.multi_scale_deformable_attn_pytorch(value, torch.tensor(SHAPES), locations, weights)
    assert ours.shape == theirs.shape == (batch, queries, heads * dims)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_module_matches_mmcv_multi_scale_deformable_attention():
    torch.manual_seed(0)
    embed_dims, heads, points = 8, 2, 3
    theirs = mmcv_ops.MultiScaleDeformableAttention(embed_dims=embed_dims, num_heads=heads, num_levels=len(SHAPES),
                                                    num_points=points, dropout=0.0, batch_first=True)
    ours = DeformableAttention(embed_dims, heads, len(SHAPES), points)
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        for parameter in ("weight", "bias"):
            # random weights, so the offsets and the softmax are not at their initial values
            weight = torch.randn_like(getattr(getattr(ours, name), parameter)) * 0.3
            getattr(getattr(ours, name), parameter).data.copy_(weight)
            getattr(getattr(theirs, name), parameter).data.copy_(weight)
    batch, queries = 2, 5
    length = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, queries, embed_dims)
    value = torch.randn(batch, length, embed_dims)
    reference = torch.rand(batch, queries, 1, 2)
    spatial_shapes = torch.tensor(SHAPES)
    level_start = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    expected = theirs(query, value=value, identity=torch.zeros_like(query),
                      reference_points=reference.expand(-1, -1, len(SHAPES), -1), spatial_shapes=spatial_shapes,
                      level_start_index=level_start)
    output = ours(query, value, reference, SHAPES)
    assert (output - expected).abs().max().item() <= 1e-5
