"""The DistillBEV objective: region masks, attention, adaptive scaling, adapters and the multi-layer loss.

    from distillbev.pipeline.losses import DistillBEVLoss, DistillConfig
    loss = DistillBEVLoss(DistillConfig(), student_channels, teacher_channels, student_shapes, teacher_shapes,
                          bev_extent)
    terms = loss(student_features, teacher_features, gt_boxes, teacher_heatmap, gt_heatmap_max)
    kd_loss = sum(terms.values())
"""

from .config import DistillConfig, LayerPairConfig
from .distill import DistillBEVLoss

__all__ = ["DistillBEVLoss", "DistillConfig", "LayerPairConfig"]
