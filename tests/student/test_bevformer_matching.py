"""Hungarian matching and the matching costs on hand-worked cases; the box parametrisation round trip."""

from __future__ import annotations

import math

import numpy as np
import torch

from distillbev.pipeline.heads.detr.box_coder import decode_boxes, encode_boxes
from distillbev.pipeline.heads.detr.matching import assign_queries, box_l1_cost, focal_class_cost, hungarian_assignment


def test_hungarian_finds_the_unique_optimum_of_a_3x3_cost():
    # The six permutations cost 6, 5, 6, 7, 9 and 11; the optimum 0->1, 1->0, 2->2 costs 1 + 2 + 2 = 5, while the
    # greedy choice of the smallest entry (1->1 at 0) leads to a cost of 6.
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = hungarian_assignment(cost)
    assert rows.tolist() == [0, 1, 2]
    assert cols.tolist() == [1, 0, 2]


def test_hungarian_leaves_surplus_queries_unmatched():
    # 3 queries, 2 GT: 0->1, 2->0 costs 0.5; 0->1, 1->0 costs 0.6; 1->0, 2->1 costs 1.1
    cost = torch.tensor([[5.0, 0.1], [0.5, 4.0], [0.4, 0.6]])
    rows, cols = hungarian_assignment(cost)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_focal_class_cost_at_probability_one_half():
    # p = 0.5: positive focal term -log(0.5) * 0.25 * 0.5^2, negative -log(0.5) * 0.75 * 0.5^2
    cost = focal_class_cost(torch.zeros(1, 3), torch.tensor([2]), alpha=0.25, gamma=2.0)
    assert torch.allclose(cost, torch.tensor([[math.log(2.0) * 0.25 * (0.25 - 0.75)]]))


def test_box_codes_keep_the_project_order_and_round_trip():
    boxes = torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.3, 1.0, -1.0]])
    codes = encode_boxes(boxes)
    expected = torch.tensor([[1.0, 2.0, math.log(4.0), math.log(2.0), 0.5, math.log(1.5), math.sin(0.3),
                              math.cos(0.3), 1.0, -1.0]])
    assert torch.allclose(codes, expected)
    assert torch.allclose(decode_boxes(codes), boxes, atol=1e-6)
    # the L1 matching cost ignores the velocity codes
    moved = codes.clone()
    moved[0, 8:] += 5.0
    moved[0, 0] += 0.25
    assert torch.allclose(box_l1_cost(moved, codes), torch.tensor([[0.25]]))


def test_assignment_pairs_each_gt_with_the_query_that_predicts_it():
    gt = encode_boxes(torch.tensor([[10.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0],
                                    [-5.0, 5.0, 0.0, 0.8, 0.6, 1.7, 1.0, 0.0, 0.0]]))
    codes = torch.stack([gt[1] + 0.05, encode_boxes(torch.tensor([0.0, 0.0, 0.0, 1, 1, 1, 0, 0, 0.0])), gt[0]])
    logits = torch.full((3, 10), -4.0)
    logits[0, 8] = logits[2, 0] = 2.0
    assignment = assign_queries(logits, codes, torch.tensor([0, 8]), gt, class_weight=2.0, box_weight=0.25,
                                alpha=0.25, gamma=2.0)
    assert dict(zip(assignment.query_indices.tolist(), assignment.gt_indices.tolist())) == {0: 1, 2: 0}
