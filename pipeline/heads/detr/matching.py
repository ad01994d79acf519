"""One-to-one assignment of object queries to GT boxes (HungarianAssigner3D): cost = focal class cost + L1 cost
on the first 8 box codes (centre, log sizes, sin / cos yaw; not the velocity), solved exactly by
scipy's linear_sum_assignment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

FOCAL_EPS = 1e-12  # keeps the logs finite at probabilities 0 and 1


def focal_class_cost(logits: torch.Tensor, gt_labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """(K, classes) logits, (M,) labels -> (K, M): the focal loss of calling query k positive for gt m's class
    minus that of calling it negative (mmdet's FocalLossCost, before its weight)."""
    probabilities = logits.sigmoid()
    negative = -(1 - probabilities + FOCAL_EPS).log() * (1 - alpha) * probabilities.pow(gamma)
    positive = -(probabilities + FOCAL_EPS).log() * alpha * (1 - probabilities).pow(gamma)
    return positive[:, gt_labels] - negative[:, gt_labels]


def box_l1_cost(codes: torch.Tensor, gt_codes: torch.Tensor) -> torch.Tensor:
    """(K, 10) predicted codes, (M, 10) GT codes -> (K, M) L1 distance over the first 8 codes."""
    return torch.cdist(codes[:, :8], gt_codes[:, :8], p=1)


def hungarian_assignment(cost: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of a (K, M) cost matrix: (rows, cols), min(K, M) pairs, rows ascending."""
    cost = cost.detach().cpu().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


@dataclass
class Assignment:
    """query_indices (P,) matched to gt_indices (P,) (P = min(K, M)); everything else is background."""

    query_indices: torch.Tensor
    gt_indices: torch.Tensor


def assign_queries(logits: torch.Tensor, codes: torch.Tensor, gt_labels: torch.Tensor, gt_codes: torch.Tensor,
                   class_weight: float, box_weight: float, alpha: float, gamma: float) -> Assignment:
    """logits (K, classes), codes (K, 10) of one sample's queries; gt_labels (M,) head labels, gt_codes (M, 10)."""
    device = logits.device
    if len(gt_labels) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Assignment(empty, empty)
    with torch.no_grad():
        cost = (class_weight * focal_class_cost(logits.float(), gt_labels, alpha, gamma)
                + box_weight * box_l1_cost(codes.float(), gt_codes.float()))  # (K, M)
    rows, cols = hungarian_assignment(cost)
    return Assignment(torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device))
