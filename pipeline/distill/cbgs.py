"""Class-balanced grouping and sampling (CBGS, Zhu et al. 2019) as mmdet3d's `CBGSDataset` does it.

Every sample is listed once under each class it holds a GT box of. With D the total length of those lists and
n_c the length of class c's list, class c's list is resampled (with replacement) to int(n_c * (1/C) / (n_c / D))
entries. Rare classes are thus drawn more often, and the epoch becomes the concatenation of the C lists. The
indices are drawn once per run, from the run's seed, as mmdet3d draws them once when the dataset is built.
"""

from __future__ import annotations

import numpy as np


def cbgs_indices(class_ids: list[np.ndarray], num_classes: int, rng: np.random.Generator) -> list[int]:
    """Resampled dataset indices.

    class_ids: per sample, the class ids of its GT boxes (any order, repeats allowed).
    """
    per_class: list[list[int]] = [[] for _ in range(num_classes)]
    for index, ids in enumerate(class_ids):
        for class_id in np.unique(np.asarray(ids, dtype=np.int64)):
            if 0 <= class_id < num_classes:
                per_class[int(class_id)].append(index)
    listed = sum(len(items) for items in per_class)
    if listed == 0:
        return list(range(len(class_ids)))
    indices: list[int] = []
    for items in per_class:
        if not items:
            continue
        ratio = (1.0 / num_classes) / (len(items) / listed)
        count = int(len(items) * ratio)
        indices += [int(i) for i in rng.choice(np.asarray(items), count)]
    return indices


def dataset_class_ids(dataset) -> list[np.ndarray]:
    """Per sample, the class ids of its GT boxes (from the annotation tables; no sensor data is read)."""
    return [dataset.annotations(index)[1] for index in range(len(dataset))]
