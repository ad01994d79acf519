"""Spatial and channel attention of the DistillBEV loss (distillbev_method.md section 3; BD L1084-1108).

All attention maps are stop-gradient weights: they are computed under no_grad and returned detached.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def spatial_attention(features: Tensor, temperature: float) -> Tensor:
    """A^X (B, Y, X) = Y*X * softmax over all (y, x) of [mean_c |X| / temperature]; its mean over cells is 1.

    features: (B, C, Y, X), the teacher feature or the ADAPTED student feature.
    """
    batch, _, num_y, num_x = features.shape
    pooled = features.detach().float().abs().mean(dim=1).reshape(batch, num_y * num_x)  # (B, Y*X)
    weights = torch.softmax(pooled / temperature, dim=1) * (num_y * num_x)
    return weights.reshape(batch, num_y, num_x)


@torch.no_grad()
def blend_spatial_attention(teacher_attention: Tensor, student_attention: Tensor, student_ratio: float) -> Tensor:
    """A (B, Y, X) = (A^T + r * A^S) / (1 + r) (`spatial_attentions=['teacher_student']`, r = 1: the plain average)."""
    return ((teacher_attention.float() + student_ratio * student_attention.float()) / (1.0 + student_ratio)).detach()


@torch.no_grad()
def channel_attention(teacher_features: Tensor, temperature: float) -> Tensor:
    """Ac (B, C) = C * softmax over c of [mean_(y,x) |T| / temperature]; its mean over channels is 1.

    The released BEVDepth recipe does not weight the fg/bg terms with it (`channel_mask=False`), but the code still
    multiplies it into the false-positive term (BD L1284); the loss keeps that quirk.
    """
    channels = teacher_features.shape[1]
    pooled = teacher_features.detach().float().abs().mean(dim=(2, 3))  # (B, C)
    return torch.softmax(pooled / temperature, dim=1) * channels
