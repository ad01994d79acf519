"""Multi-scale deformable attention on grid_sample against bilinear samples worked out by hand."""

from __future__ import annotations

import torch

from distillbev.pipeline.heads.detr.deformable import DeformableAttention, deformable_sample, sampling_locations

# One level, 2 rows x 3 columns, one head, one channel: value[row, column].
VALUE_MAP = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def normalised(column: float, row: float, height: int = 2, width: int = 3) -> list[float]:
    """Cell-index coordinates (cell centres at integers) -> (x, y) in [0, 1] of the map."""
    return [(column + 0.5) / width, (row + 0.5) / height]


def test_one_point_samples_bilinearly_between_four_cells():
    value = VALUE_MAP.reshape(1, 6, 1, 1)  # (B, H*W, heads, dim), row-major
    location = torch.tensor(normalised(0.75, 0.25)).view(1, 1, 1, 1, 1, 2)  # (B, Q, heads, levels, points, 2)
    weights = torch.ones(1, 1, 1, 1, 1)
    output = deformable_sample(value, [(2, 3)], location, weights)
    # rows 0/1 weigh 0.75/0.25, columns 0/1 weigh 0.25/0.75:
    # 0.75 * (0.25*1 + 0.75*2) + 0.25 * (0.25*4 + 0.75*5) = 1.3125 + 1.1875
    assert output.shape == (1, 1, 1)
    assert torch.allclose(output, torch.tensor([[[2.5]]]))


def test_points_are_summed_with_their_weights_and_outside_samples_read_zero():
    value = VALUE_MAP.reshape(1, 6, 1, 1)
    locations = torch.tensor([normalised(2.0, 1.0), normalised(0.75, 0.25),
                              normalised(-1.0, 0.0)]).view(1, 1, 1, 1, 3, 2)  # a cell centre, between, outside
    weights = torch.tensor([0.25, 0.5, 0.25]).view(1, 1, 1, 1, 3)
    output = deformable_sample(value, [(2, 3)], locations, weights)
    assert torch.allclose(output, torch.tensor([[[0.25 * 6.0 + 0.5 * 2.5 + 0.25 * 0.0]]]))


def test_levels_and_heads_read_their_own_slices_of_the_value():
    # Level 0 is VALUE_MAP, level 1 a 1x2 map; head h reads channel h of every entry.
    level1 = torch.tensor([10.0, 20.0])
    per_head = torch.cat([VALUE_MAP.reshape(6), level1])  # (8,)
    value = torch.stack([per_head, -per_head], dim=-1).view(1, 8, 2, 1)  # (B, L, heads=2, dim=1)
    locations = torch.zeros(1, 1, 2, 2, 1, 2)
    locations[0, 0, :, 0, 0] = torch.tensor(normalised(1.0, 1.0))  # level 0: cell (1, 1) = 5
    locations[0, 0, :, 1, 0] = torch.tensor([0.75, 0.5])  # level 1 (1x2): centre of column 1 = 20
    weights = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2, 1).expand(1, 1, 2, 2, 1)
    output = deformable_sample(value, [(2, 3), (1, 2)], locations, weights)
    assert torch.allclose(output, torch.tensor([[[12.5, -12.5]]]))


def test_offsets_are_cells_of_each_level_and_points_are_dealt_over_the_anchors():
    reference = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).view(1, 1, 2, 2)  # two anchors
    offsets = torch.zeros(1, 1, 1, 2, 4, 2)  # 4 points over 2 anchors, 2 levels
    offsets[0, 0, 0, :, 3] = torch.tensor([1.0, -1.0])  # point 3 = second point of anchor 1: one cell right, up
    locations = sampling_locations(reference, offsets, [(2, 4), (4, 8)])
    anchors = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5], [0.25, 0.75]])
    assert torch.allclose(locations[0, 0, 0, 0, :3], anchors[:3])
    assert torch.allclose(locations[0, 0, 0, 0, 3], torch.tensor([0.25 + 1 / 4, 0.75 - 1 / 2]))
    assert torch.allclose(locations[0, 0, 0, 1, 3], torch.tensor([0.25 + 1 / 8, 0.75 - 1 / 4]))


def test_module_at_init_averages_its_points_around_the_reference():
    # At init the attention weights are uniform; with the value projection set to the identity and the offsets
    # zeroed, every point samples the reference cell, so the output is output_proj of that cell's value.
    torch.manual_seed(0)
    module = DeformableAttention(embed_dims=4, num_heads=2, num_levels=1, num_points=3)
    with torch.no_grad():
        module.value_proj.weight.copy_(torch.eye(4))
        module.sampling_offsets.bias.zero_()
    value = torch.randn(1, 6, 4)  # a 2x3 map
    query = torch.randn(1, 1, 4)
    reference = torch.tensor(normalised(2.0, 0.0)).view(1, 1, 1, 2)  # cell (0, 2) = entry 2
    output = module(query, value, reference, [(2, 3)])
    assert torch.allclose(output, module.output_proj(value[:, 2:3]), atol=1e-6)
