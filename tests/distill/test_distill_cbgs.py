"""Class-balanced grouping and sampling against a hand-worked case, and repeated samples drawing their own views."""

from __future__ import annotations

import numpy as np
from test_distill_replay_schedule_head import FakeCache, FakeDataset

from distillbev.pipeline.distill.cbgs import cbgs_indices
from distillbev.pipeline.distill.targets import DistillationDataset


def test_cbgs_by_hand():
    # samples: 0 {car}, 1 {car, car}, 2 {car, truck}, 3 {bus}; classes 0 car, 1 truck, 2 bus
    class_ids = [np.array([0]), np.array([0, 0]), np.array([0, 1]), np.array([2])]
    # lists: car [0, 1, 2], truck [2], bus [3]; D = 5; ratios (1/3) / (3/5) = 5/9, (1/3) / (1/5) = 5/3 twice
    # counts: int(3 * 5/9) = 1, int(1 * 5/3) = 1, int(1 * 5/3) = 1
    indices = cbgs_indices(class_ids, 3, np.random.default_rng(0))
    assert len(indices) == 3 and indices[0] in (0, 1, 2) and indices[1:] == [2, 3]
    # a rarer class gains more: 6 car-only samples and 1 bus sample, D = 7 -> cars int(6 * (1/2) / (6/7)) =
    # int(3.5) = 3, bus int(1 * (1/2) / (1/7)) = 3
    skewed = cbgs_indices([np.array([0])] * 6 + [np.array([1])], 2, np.random.default_rng(1))
    assert len(skewed) == 6 and skewed[3:] == [6, 6, 6] and all(i < 6 for i in skewed[:3])
    # samples without boxes are never drawn; no box at all keeps the split as it is
    assert 2 not in cbgs_indices([np.array([0]), np.array([1]), np.array([], dtype=np.int64)], 2,
                                 np.random.default_rng(0))
    assert cbgs_indices([np.array([], dtype=np.int64)] * 3, 2, np.random.default_rng(0)) == [0, 1, 2]


def test_repeated_samples_draw_their_own_view():
    tokens = ["a", "b"]
    cache, dataset = FakeCache(tokens), FakeDataset(tokens)
    pairs = DistillationDataset(dataset, mode="cache", cache=cache, seed=5, indices=[1, 1, 1, 1, 0])
    assert len(pairs) == 5
    views = []
    for position in range(5):
        sample, _ = pairs[position]
        views.append(sample.view_index)
        assert sample.token == ("b" if position < 4 else "a")
        assert sample.view_index == int(np.random.default_rng([5, 0, position]).integers(3))
    assert [i for i, _ in dataset.calls] == [1, 1, 1, 1, 0]
    assert views == [2, 2, 0, 2, 0]  # the four copies of "b" do not all replay the same view
